"""Speech for the organism: 16 kHz waveforms synthesised word by word.

Every word is one syllable: an optional consonant-like noise burst, then a voiced chirp (a
harmonic tone shaped by two formants, the "vowel", with a pitch level and a glide), then
a short pause. Each word of a language has its own (vowel, burst, glide, level) template,
distinct from every other word of the language, so words are reliably audible; one
syllable per word with clear pauses is what lets a ~1M-parameter model reach near-perfect
recognition after a few minutes of CPU training. The language sets the voice: pitch range,
spectral tilt (timbre), vocal-tract scale and tempo, so language is audible, as in real
speech. Each utterance adds its own variation (pitch, tempo, loudness, pauses) and light
noise, drawn from a seed: the same call gives the same waveform.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np

from crossmodal.data.records import TARGET_SAMPLING_RATE
from crossmodal.organism.grammar import LEXICON_SEED, ORGANISM_LANGUAGES, lexicon

SR = TARGET_SAMPLING_RATE
_VOWELS = (  # (F1, F2) in Hz, a shared vowel inventory
    (280, 2250), (400, 2000), (700, 1250), (450, 850), (310, 870),
    (560, 1800), (600, 950), (290, 1750), (420, 1450), (520, 1350),
)  # fmt: skip
_BURSTS = (None, (3500, 6500), (1800, 3200), (500, 7000))  # none, /s/, /sh/, plosive-like
_GLIDES = (-4.0, 0.0, 4.0)  # semitones over the syllable: falling, level, rising
_LEVELS = (0.0, 0.5, 1.0)  # position in the voice's pitch span
_MAX_HARMONIC_HZ = 7000.0


@dataclass(frozen=True)
class Voice:
    """A language's acoustics.

    Attributes:
        f0: base pitch in Hz.
        tilt_db: spectral tilt in dB per octave of harmonic number (timbre).
        formant_scale: vocal-tract scale applied to the formant frequencies.
        syllable_s: duration of the voiced part of a word in seconds (tempo).
        pitch_span: semitones between the lowest and highest pitch level.
    """

    f0: float
    tilt_db: float
    formant_scale: float
    syllable_s: float
    pitch_span: float


VOICES: dict[str, Voice] = {
    "eng": Voice(120.0, -9.0, 1.00, 0.055, 7.0),
    "deu": Voice(105.0, -6.0, 0.94, 0.060, 6.0),
    "spa": Voice(140.0, -10.0, 1.05, 0.048, 7.0),
    "fra": Voice(165.0, -12.0, 1.10, 0.052, 6.0),
    "jpn": Voice(210.0, -8.0, 1.15, 0.045, 8.0),
    "cmn": Voice(185.0, -7.0, 1.02, 0.050, 9.0),
}


@dataclass(frozen=True)
class Syllable:
    """The acoustic template of one word."""

    vowel: int
    burst: int
    glide: float
    level: float


@cache
def word_templates(lang: str) -> dict[str, Syllable]:
    """The template of every word of ``lang``; no two words of a language share one."""
    combos = list(itertools.product(range(len(_VOWELS)), range(len(_BURSTS)), _GLIDES, _LEVELS))
    rng = np.random.default_rng([LEXICON_SEED, ORGANISM_LANGUAGES.index(lang)])
    order = rng.permutation(len(combos))
    words = list(lexicon()[lang].values())
    return {word: Syllable(*combos[order[i]]) for i, word in enumerate(words)}


def _burst(rng: np.random.Generator, band: tuple[int, int], n: int) -> np.ndarray:
    noise = rng.standard_normal(n)
    spectrum = np.fft.rfft(noise)
    freqs = np.fft.rfftfreq(n, 1 / SR)
    spectrum[(freqs < band[0]) | (freqs > band[1])] = 0
    out = np.fft.irfft(spectrum, n)
    return out * np.hanning(n) / (np.abs(out).max() + 1e-9) * 0.5


def _voiced(syl: Syllable, voice: Voice, f0: float, n: int) -> np.ndarray:
    t = np.arange(n) / SR
    track = f0 * 2.0 ** ((syl.level * voice.pitch_span + syl.glide * t / t[-1]) / 12.0)
    phase = 2 * np.pi * np.cumsum(track) / SR
    f1, f2 = (f * voice.formant_scale for f in _VOWELS[syl.vowel])
    k = np.arange(1, int(_MAX_HARMONIC_HZ / track.max()) + 1)
    gain = _formants(k * track.mean(), f1, f2) * 10 ** (voice.tilt_db * np.log2(k) / 20.0)
    keep = gain > 0.03 * gain.max()  # the audible harmonics only: 3-5x faster, same sound
    k = k[keep][:, None]
    amp = _formants(k * track[None, :], f1, f2) * 10 ** (voice.tilt_db * np.log2(k) / 20.0)
    wave = (amp * np.sin(k * phase[None, :])).sum(0)
    fade = np.minimum(1.0, np.minimum(np.arange(n), np.arange(n)[::-1]) / (0.006 * SR))
    return wave * fade / (np.sqrt(np.mean(wave**2)) + 1e-9) * 0.3  # equal loudness (RMS)


def _formants(freqs: np.ndarray, f1: float, f2: float) -> np.ndarray:
    """Two resonances (Lorentzian peaks) at the vowel's formants."""
    return 1.0 / (1 + ((freqs - f1) / 90.0) ** 2) + 0.7 / (1 + ((freqs - f2) / 120.0) ** 2)


def synthesize(
    words: Sequence[str], lang: str, seed: int | Sequence[int] = 0, noise_db: float = -45.0
) -> np.ndarray:
    """A mono float32 waveform at 16 kHz speaking ``words`` in ``lang``'s voice.

    Args:
        words: the words of the utterance (tokens of the organism's languages).
        lang: the language whose voice speaks them (one of :data:`VOICES`).
        seed: utterance seed (speaker variation and noise); the same seed, the same audio.
        noise_db: level of the added white noise relative to full scale (speech peaks at
            -1 to -5 dB, so about 30 dB SNR by default).

    Raises:
        ValueError: for a language without a voice.
    """
    if lang not in VOICES:
        raise ValueError(f"lang must be one of {sorted(VOICES)}, got {lang!r}")
    voice, templates = VOICES[lang], word_templates(lang)
    unknown = [w for w in words if w not in templates]
    if unknown:
        raise ValueError(
            f"words must be words of {lang!r}, got {unknown[0]!r}; synthesise organism sentences only"
        )
    rng = np.random.default_rng(seed)
    f0 = voice.f0 * 2 ** (rng.uniform(-0.5, 0.5) / 12)
    tempo = rng.uniform(0.93, 1.07)
    voiced_n = int(voice.syllable_s * tempo * SR)
    pieces = [np.zeros(int(rng.uniform(0.03, 0.06) * SR))]
    for word in words:
        syl = templates[word]
        band = _BURSTS[syl.burst]
        if band is not None:
            pieces.append(_burst(rng, band, int(0.012 * SR)))
        pieces.append(_voiced(syl, voice, f0, voiced_n) * rng.uniform(0.8, 1.0))
        pieces.append(np.zeros(int(rng.uniform(0.025, 0.035) * tempo * SR)))
    pieces.append(np.zeros(int(rng.uniform(0.03, 0.06) * SR)))
    wave = np.concatenate(pieces)
    wave *= rng.uniform(0.55, 0.9) / (np.abs(wave).max() + 1e-9)
    wave += rng.standard_normal(wave.size) * 10 ** (noise_db / 20)
    return np.clip(wave, -1.0, 1.0).astype(np.float32)
