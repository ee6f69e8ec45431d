"""The one record format every data source yields.

FLEURS (raw TSV + audio, or its Parquet copy) and the model organism's synthetic corpus
both produce :class:`Record` objects, so everything downstream (capture, collect, steer)
is written once against this type.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

TARGET_SAMPLING_RATE = 16_000
"""SeamlessM4T's feature extractor expects 16 kHz mono audio."""


@dataclass(frozen=True)
class Record:
    """One utterance: a sentence in one language, with its text and (optionally) audio.

    Attributes:
        id: sentence id shared by the parallel versions of the same sentence in every
            language (FLEURS ``id``); records of different languages join on it.
        language: Seamless language code (``eng``, ``deu``, ``cmn``, ...).
        text: the transcription / sentence text.
        audio: mono float32 waveform in [-1, 1], or ``None`` for text-only records.
        sampling_rate: sampling rate of ``audio`` in Hz, or ``None`` without audio.
        split: ``train``, ``dev`` or ``test``.
    """

    id: str
    language: str
    text: str
    audio: np.ndarray | None = field(default=None, repr=False, compare=False)
    sampling_rate: int | None = None
    split: str = "test"

    @property
    def has_audio(self) -> bool:
        return self.audio is not None
