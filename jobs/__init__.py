"""Ray job entry points: each is a ``crossmodal`` subcommand run as ``python -m jobs.NAME``.

Recipes only: the library (``crossmodal``) never imports them.
"""
