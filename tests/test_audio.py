"""Audio decoding without FFmpeg: formats, downmix, resampling, and one-line errors.

Tricky cases: a WAV cut short (libsndfile silently returns the short read), a header-only
WAV, a 0-byte file, text bytes, NaN samples, float samples beyond [-1, 1], 8/24/32-bit PCM
through the stdlib fallback, a tar.gz that breaks off mid-stream.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from fleurs_fixture import tone, wav_bytes
from scipy.signal import resample_poly

from crossmodal.data.audio import (
    AudioError,
    decode_audio,
    iter_audio_files,
    iter_tar_audio,
    load_audio,
    resample,
    to_mono,
)


def peak_hz(audio: np.ndarray, sr: int = 16_000) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    return float(np.fft.rfftfreq(len(audio), 1 / sr)[np.argmax(spectrum)])


def decoded(data: bytes) -> np.ndarray:
    """The file's samples as libsndfile decodes them (the input scipy resamples)."""
    return sf.read(io.BytesIO(data), dtype="float64")[0]


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "OGG"])
def test_formats_from_path_and_bytes(tmp_path: Path, fmt: str) -> None:
    data = wav_bytes(440.0, 16_000, fmt=fmt)
    path = tmp_path / f"tone.{fmt.lower()}"
    path.write_bytes(data)
    from_path, from_bytes = load_audio(path), load_audio(data)
    np.testing.assert_array_equal(from_path, from_bytes)
    assert from_path.dtype == np.float32 and from_path.shape == (4000,)
    assert peak_hz(from_path) == 440.0
    if fmt != "OGG":  # lossless: the tone to within one PCM16 step
        np.testing.assert_allclose(from_path, tone(440.0, 16_000), atol=1 / 32768)


def test_stereo_downmix_is_the_channel_mean() -> None:
    audio, sr = decode_audio(wav_bytes(440.0, 16_000, stereo=True))
    assert audio.shape == (4000, 2) and sr == 16_000
    np.testing.assert_allclose(to_mono(audio), audio.mean(axis=1), atol=1e-7)
    np.testing.assert_array_equal(load_audio(wav_bytes(440.0, 16_000, stereo=True)), to_mono(audio))


@pytest.mark.parametrize(
    ("sr", "up", "down"), [(8_000, 2, 1), (22_050, 320, 441), (44_100, 160, 441), (48_000, 1, 3)]
)
def test_resampling_matches_scipy_and_keeps_the_frequency(sr: int, up: int, down: int) -> None:
    data = wav_bytes(1_000.0, sr)
    out = load_audio(data)
    reference = resample_poly(decoded(data), up, down)
    np.testing.assert_allclose(out, reference, atol=2e-6)
    assert len(out) == 4000 and peak_hz(out) == 1_000.0


def test_resample_identity_clip_and_bad_rates() -> None:
    x = np.linspace(-2, 2, 9, dtype=np.float32)
    np.testing.assert_array_equal(resample(x, 16_000, 16_000), np.clip(x, -1, 1))
    for bad in (0, -8000, 16000.5, "16k"):
        with pytest.raises(
            ValueError, match=r"^orig_sr must be a positive integer in Hz, got .*; e.g. 16000$"
        ):
            resample(x, bad)  # type: ignore[arg-type]


def test_float_wav_beyond_unit_range_is_clipped() -> None:
    buf = io.BytesIO()
    sf.write(buf, np.array([0.0, 1.5, -3.0, 0.25]), 16_000, format="WAV", subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(buf.getvalue()), [0.0, 1.0, -1.0, 0.25])


@pytest.mark.parametrize("subtype", ["PCM_U8", "PCM_16", "PCM_24", "PCM_32"])
def test_stdlib_wave_backend_agrees_with_soundfile(subtype: str) -> None:
    buf = io.BytesIO()
    sf.write(buf, tone(300.0, 8_000, stereo=True), 8_000, format="WAV", subtype=subtype)
    a, sr_a = decode_audio(buf.getvalue(), backend="soundfile")
    b, sr_b = decode_audio(buf.getvalue(), backend="wave")
    assert sr_a == sr_b == 8_000 and a.shape == b.shape == (2000, 2)
    np.testing.assert_allclose(a, b, atol=1e-6)


def _truncated() -> bytes:
    data = wav_bytes(440.0, 16_000)
    return data[: 44 + 1000]


def _header_only() -> bytes:
    return wav_bytes(440.0, 16_000)[:44]


def _no_frames() -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(0), 16_000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _nan_wav() -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.array([0.0, np.nan, 0.5]), 16_000, format="WAV", subtype="FLOAT")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("data", "problem", "pattern"),
    [
        (
            _truncated(),
            "truncated",
            r"^clip: truncated \(header declares 4000 frames, file holds 500\)$",
        ),
        (_header_only(), "truncated", r"^clip: truncated"),
        (b"", "empty", r"^clip: empty file \(0 bytes\)$"),
        (_no_frames(), "empty", r"^clip: no audio samples$"),
        (
            b"just some text, not audio\n" * 4,
            "undecodable",
            r"^clip: not decodable audio \(Format not recognised.\)$",
        ),
        (_nan_wav(), "nonfinite", r"^clip: contains NaN or infinite samples$"),
    ],
)
def test_bad_audio_raises_one_line(data: bytes, problem: str, pattern: str) -> None:
    with pytest.raises(AudioError, match=pattern) as info:
        load_audio(data, name="clip")
    assert info.value.problem == problem and "\n" not in str(info.value)


def test_missing_file_and_bad_backend(tmp_path: Path) -> None:
    with pytest.raises(AudioError, match=r"nope\.wav: file not found$") as info:
        load_audio(tmp_path / "nope.wav")
    assert info.value.problem == "missing"
    with pytest.raises(AudioError, match=r"^x\.flac: not a PCM WAV file"):
        decode_audio(wav_bytes(440.0, 16_000, fmt="FLAC"), name="x.flac", backend="wave")
    with pytest.raises(
        ValueError, match=r"^backend must be one of \['auto', 'soundfile', 'wave'\], got 'ffmpeg'"
    ):
        decode_audio(b"RIFF", backend="ffmpeg")


def test_iter_audio_files_and_tar(tmp_path: Path) -> None:
    good, bad = wav_bytes(440.0, 8_000), b"not audio" * 10
    (tmp_path / "good.wav").write_bytes(good)
    (tmp_path / "bad.wav").write_bytes(bad)
    got = dict(iter_audio_files(tmp_path, {"good.wav", "bad.wav", "absent.wav"}))
    assert set(got) == {"good.wav", "bad.wav"}  # absent names are not yielded
    assert peak_hz(got["good.wav"]) == 440.0 and isinstance(got["bad.wav"], AudioError)

    archive = tmp_path / "a.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in [
            ("split/good.wav", good),
            ("split/bad.wav", bad),
            ("split/other.wav", good),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    got = dict(iter_tar_audio(archive, {"good.wav", "bad.wav", "absent.wav"}))
    assert set(got) == {"good.wav", "bad.wav"}
    np.testing.assert_array_equal(got["good.wav"], load_audio(good))
    assert got["bad.wav"].problem == "undecodable"

    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(archive.read_bytes()[:100])
    got = dict(iter_tar_audio(broken, {"good.wav", "absent.wav"}))
    assert {k: v.problem for k, v in got.items()} == {
        "good.wav": "unreadable",
        "absent.wav": "unreadable",
    }
    assert str(got["good.wav"]).startswith(f"{broken}: unreadable archive (")
