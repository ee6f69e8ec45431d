"""Decode WAV/FLAC/OGG into 16 kHz mono float32 without FFmpeg.

``datasets``' audio decoding needs torchcodec + FFmpeg, which are often absent
(docs/platform.md, "FLEURS and audio"); FLEURS ships plain WAV, so libsndfile (``soundfile``) is enough, with the
stdlib ``wave`` module as a fallback for PCM WAV when ``soundfile`` is not installed.

Every failure is an :class:`AudioError` whose message is one line naming the file and the
problem, so data loaders can count it as a skip reason and carry on. ``iter_tar_audio`` and
``iter_audio_files`` decode many named files (from a .tar.gz stream or a directory) that way.
"""

from __future__ import annotations

import io
import re
import struct
import tarfile
import wave
import zlib
from collections.abc import Iterator
from math import gcd
from pathlib import Path, PurePosixPath

import numpy as np
from scipy.signal import resample_poly

from crossmodal.data.records import TARGET_SAMPLING_RATE

BACKENDS = ("auto", "soundfile", "wave")
AUDIO_PROBLEMS = (
    "missing",
    "unreadable",
    "empty",
    "undecodable",
    "truncated",
    "nonfinite",
    "too_long",
)


class AudioError(ValueError):
    """Missing, truncated, empty or undecodable audio; one line naming the file.

    ``problem`` (one of :data:`AUDIO_PROBLEMS`) lets loaders count skips by kind.
    """

    def __init__(self, message: str, problem: str = "undecodable") -> None:
        super().__init__(message)
        self.problem = problem


def load_audio(
    source: str | Path | bytes,
    *,
    name: str | None = None,
    target_sr: int = TARGET_SAMPLING_RATE,
    backend: str = "auto",
) -> np.ndarray:
    """Decode a file path or in-memory bytes to mono float32 in [-1, 1] at ``target_sr``.

    Args:
        source: a path to a WAV/FLAC/OGG file, or the file's bytes.
        name: what to call the audio in error messages (defaults to the path, or "<bytes>").
        target_sr: output sampling rate in Hz.
        backend: ``auto`` (soundfile if importable, else wave), ``soundfile`` or ``wave``.

    Raises:
        AudioError: the file is missing, truncated, empty or not audio.
    """
    if isinstance(source, bytes | bytearray):
        label, data = name or "<bytes>", bytes(source)
    else:
        label = name or str(source)
        try:
            data = (source if hasattr(source, "read_bytes") else Path(source)).read_bytes()
        except FileNotFoundError:
            raise AudioError(f"{label}: file not found", "missing") from None
        except OSError as err:
            raise AudioError(
                f"{label}: cannot read file ({err.strerror or err})", "unreadable"
            ) from None
    audio, sr = decode_audio(data, name=label, backend=backend)
    return resample(to_mono(audio), sr, target_sr)


def decode_audio(
    data: bytes, *, name: str = "<bytes>", backend: str = "auto"
) -> tuple[np.ndarray, int]:
    """Decode file bytes to float32 ``[frames]`` or ``[frames, channels]`` and the file's rate.

    Raises:
        AudioError: as :func:`load_audio`; a WAV holding fewer frames than its header
            declares is reported as truncated (libsndfile silently returns the short read).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}; use 'auto'")
    if not data:
        raise AudioError(f"{name}: empty file (0 bytes)", "empty")
    if backend == "auto":
        backend = "soundfile" if _soundfile() is not None else "wave"
    audio, sr = (
        _decode_soundfile(data, name) if backend == "soundfile" else _decode_wave(data, name)
    )
    declared = _wav_declared_frames(data)
    if declared is not None and audio.shape[0] < declared:
        raise AudioError(
            f"{name}: truncated (header declares {declared} frames, file holds {audio.shape[0]})",
            "truncated",
        )
    if audio.shape[0] == 0:
        raise AudioError(f"{name}: no audio samples", "empty")
    if not np.isfinite(audio).all():
        raise AudioError(f"{name}: contains NaN or infinite samples", "nonfinite")
    return audio, sr


def iter_audio_files(
    directory: Path, names: set[str], target_sr: int = TARGET_SAMPLING_RATE
) -> Iterator[tuple[str, np.ndarray | AudioError]]:
    """Decode ``directory/<name>`` for each name that exists (sorted); errors are yielded."""
    for name in sorted(names):
        if (directory / name).is_file():
            yield name, try_load_audio(directory / name, None, target_sr)


def iter_tar_audio(
    archive: Path, names: set[str], target_sr: int = TARGET_SAMPLING_RATE
) -> Iterator[tuple[str, np.ndarray | AudioError]]:
    """Stream a .tar.gz once and decode the members whose base name is in ``names``.

    Nothing is extracted to disk and only one member is held at a time. Names absent from
    the archive are not yielded; if the archive itself breaks off (truncated or corrupt),
    every name not yet found is yielded with an ``unreadable`` error.
    """
    remaining = set(names)
    try:
        with archive.open("rb") as raw, tarfile.open(fileobj=raw, mode="r|gz") as tar:
            for member in tar:
                name = PurePosixPath(member.name).name
                if not member.isfile() or name not in remaining:
                    continue
                handle = tar.extractfile(member)
                data = handle.read() if handle is not None else b""
                remaining.discard(name)  # only now: a read that breaks off counts as unreadable
                yield name, try_load_audio(data, f"{archive.name}:{member.name}", target_sr)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        broken = AudioError(f"{archive}: unreadable archive ({_one_line(err)})", "unreadable")
        for name in sorted(remaining):
            yield name, broken


def try_load_audio(
    source: str | Path | bytes, name: str | None = None, target_sr: int = TARGET_SAMPLING_RATE
) -> np.ndarray | AudioError:
    """:func:`load_audio`, returning the :class:`AudioError` instead of raising it."""
    try:
        return load_audio(source, name=name, target_sr=target_sr)
    except AudioError as err:
        return err


def to_mono(audio: np.ndarray) -> np.ndarray:
    """Average the channels of ``[frames, channels]`` audio; pass ``[frames]`` through."""
    if audio.ndim == 1:
        return audio
    return audio.mean(axis=1, dtype=np.float64).astype(np.float32)


def resample(audio: np.ndarray, orig_sr: int, target_sr: int = TARGET_SAMPLING_RATE) -> np.ndarray:
    """Polyphase-resample mono audio by the exact rational factor ``target_sr / orig_sr``.

    Returns float32 clipped to [-1, 1] (the anti-aliasing filter can overshoot slightly).
    """
    for field, value in (("orig_sr", orig_sr), ("target_sr", target_sr)):
        if not isinstance(value, int | np.integer) or value <= 0:
            raise ValueError(f"{field} must be a positive integer in Hz, got {value!r}; e.g. 16000")
    if orig_sr != target_sr:
        g = gcd(int(orig_sr), int(target_sr))
        audio = resample_poly(audio.astype(np.float64), int(target_sr) // g, int(orig_sr) // g)
    return np.clip(audio, -1.0, 1.0).astype(np.float32)


def _soundfile():  # noqa: ANN202 - returns the module or None
    try:
        import soundfile
    except (ImportError, OSError):  # OSError: the libsndfile shared library is missing
        return None
    return soundfile


def _decode_soundfile(data: bytes, name: str) -> tuple[np.ndarray, int]:
    sf = _soundfile()
    if sf is None:
        raise AudioError(f"{name}: the soundfile backend is not installed; use backend='wave'")
    try:
        audio, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=False)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as err:
        raise AudioError(f"{name}: not decodable audio ({_one_line(err)})") from None
    return audio, int(sr)


def _decode_wave(data: bytes, name: str) -> tuple[np.ndarray, int]:
    """PCM WAV (8/16/24/32-bit integer) with the standard library only."""
    try:
        with wave.open(io.BytesIO(data)) as wav:
            width, channels, sr = wav.getsampwidth(), wav.getnchannels(), wav.getframerate()
            raw = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError, struct.error) as err:
        raise AudioError(f"{name}: not a PCM WAV file ({_one_line(err) or 'bad header'})") from None
    raw = raw[: len(raw) - len(raw) % (width * channels)]
    if width == 1:  # 8-bit WAV is unsigned
        ints = np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0
        scale = 128.0
    elif width == 3:  # 24-bit: widen each little-endian triple to int32
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        ints = ((b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8 >> 8).astype(np.float32)
        scale = float(2**23)
    elif width in (2, 4):
        ints = np.frombuffer(raw, dtype=f"<i{width}").astype(np.float32)
        scale = float(2 ** (8 * width - 1))
    else:
        raise AudioError(f"{name}: unsupported WAV sample width {width} bytes")
    audio = (ints / scale).reshape(-1, channels)
    return (audio[:, 0] if channels == 1 else audio), int(sr)


def _wav_declared_frames(data: bytes) -> int | None:
    """Frames a RIFF/WAVE header promises, or None (not a WAV, or a streaming-size header)."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    pos, block_align = 12, None
    while pos + 8 <= len(data):
        chunk_id, size = data[pos : pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        if chunk_id == b"fmt " and pos + 22 <= len(data):
            block_align = struct.unpack_from("<H", data, pos + 20)[0]
        elif chunk_id == b"data":
            if not block_align or size in (0, 0xFFFFFFFF):
                return None
            return size // block_align
        pos += 8 + size + (size & 1)
    return None


def _one_line(err: BaseException) -> str:
    """The error text on one line, without libsndfile's "Error opening <BytesIO ...>:" prefix."""
    text = re.sub(r"Error opening <[^>]*>:\s*", "", str(err))
    return " ".join(text.split())
