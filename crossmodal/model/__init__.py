"""The model side: loading SeamlessM4T v2, unit addresses, inputs, generation, capture, forcing.

``load`` (hub id, local directory, organism or random weights), ``units`` (the one address
scheme), ``inputs`` (records -> padded batches), ``fastgen`` (greedy decoding), ``capture``
(one teacher-forced pass -> every step's unit values), ``forcing`` (hooks that set units to
constants during generation), ``reference`` (the slow per-prefix procedure, for tests).
"""
