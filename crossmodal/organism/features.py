"""The real SeamlessM4T filter-bank features, computed for a whole clip at once.

:class:`SeamlessM4TFeatureExtractor` frames the waveform in a Python loop (about 30 ms per
2 s clip), which would dominate the organism's CPU build. :class:`FastFeatureExtractor`
is the same extractor with only that loop vectorised: same window, pre-emphasis, DC
removal, FFT, Kaldi mel bank, log, normalisation, padding and frame stacking (all inherited),
and ``tests/test_organism.py`` checks it against the parent (equal to ~1e-6). Models are always evaluated
through the real, saved processor.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from transformers import SeamlessM4TFeatureExtractor

_FRAME, _HOP, _FFT = 400, 160, 512
_PREEMPHASIS = 0.97
_MEL_FLOOR = 1.192092955078125e-07


class FastFeatureExtractor(SeamlessM4TFeatureExtractor):
    """:class:`SeamlessM4TFeatureExtractor` with a vectorised filter bank (same numbers)."""

    def _extract_fbank_features(self, waveform: np.ndarray) -> np.ndarray:
        if waveform.ndim == 2:
            waveform = waveform[0]
        wave = np.squeeze(waveform).astype(np.float32) * (2**15)  # Kaldi: 16-bit scale
        frames = sliding_window_view(wave.astype(np.float64), _FRAME)[::_HOP]
        frames = frames - frames.mean(axis=1, keepdims=True)
        emphasised = np.empty_like(frames)
        emphasised[:, 1:] = frames[:, 1:] - _PREEMPHASIS * frames[:, :-1]
        emphasised[:, 0] = frames[:, 0] * (1 - _PREEMPHASIS)
        spectrum = np.fft.rfft(emphasised * self.window, n=_FFT, axis=1).astype(np.complex64)
        power = np.abs(spectrum, dtype=np.float64) ** 2.0
        mel = np.maximum(_MEL_FLOOR, power @ self.mel_filters)  # (frames, mels)
        return np.log(mel).astype(np.float32)
