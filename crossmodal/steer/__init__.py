"""Stage 3, steer: the intervention grid, its workers, output-language ID and metrics.

``grid`` (config and cells) -> ``units`` (which units a cell forces) -> ``worker`` (generate,
measure, write a part) -> ``parts`` (the files of finished tasks) -> ``driver`` (the fleet,
resume, consolidated tables); ``lid`` and ``metrics`` measure each output.
"""
