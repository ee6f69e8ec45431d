"""crossmodal: language-selective units in multilingual speech-text models, step by step.

Implements the method of arXiv 2601.17387 (docs/method.md; code layout in docs/design.md):
collect per-decoding-step unit statistics, reduce them to selectivity, roles and
cross-modal overlap, and steer generation by forcing selected units.
"""

__version__ = "0.1.0"
