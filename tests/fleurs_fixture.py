"""A tiny FLEURS-shaped dataset written by the tests (no download), in three layouts.

- ``root/data/<config>/test.tsv`` in the real 7-column layout (no header), with audio as
  ``audio/test.tar.gz`` and/or an extracted ``audio/test/`` directory:
  en_us has both, de_de only the tar, cmn_hans_cn only the directory.
- ``parquet/<config>/test/0000.parquet``: the same rows as the Hub's Parquet conversion
  (id, num_samples, path, audio{bytes,path}, transcription, raw_transcription, gender, ...),
  written in row groups of 2 rows.
- ``resynth/``: an alternative audio root, ``eng/test/<id>.wav`` (by Seamless code) and
  ``de_de/test/<id>.wav`` (by FLEURS config), 1 kHz tones at 16 kHz.

en_us holds every kind of bad example once: a corrupt (non-audio) file, a missing file, a
truncated WAV, a whitespace-only text, a malformed TSV line, and a repeated id whose first
recording (by file name) is corrupt. Audio is short pure tones whose frequency identifies the
recording, at 8 kHz, 16 kHz and 22.05 kHz (one stereo), so resampling can be checked.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf

DURATION_S = 0.25


@dataclass(frozen=True)
class Clip:
    """What a fixture WAV holds: a tone (or bad bytes) and how it was written."""

    freq: float = 440.0
    sr: int = 16_000
    stereo: bool = False
    kind: str = "ok"  # ok | corrupt | missing | truncated


@dataclass(frozen=True)
class Row:
    id: str
    file_name: str
    raw: str
    clip: Clip = field(default_factory=Clip)

    @property
    def normalized(self) -> str:
        return "".join(ch for ch in self.raw.lower() if ch.isalnum() or ch == " ").strip()


# Expected: en_us yields ids 1001, 1002 (b_1.wav), 1003, 1008 (h_2.wav) with audio.
ROWS: dict[str, list[Row]] = {
    "en_us": [
        Row("1001", "a.wav", "Hello world.", Clip(440.0)),
        Row("1002", "b_2.wav", "The second sentence!", Clip(500.0)),
        Row("1002", "b_1.wav", "The second sentence.", Clip(300.0, sr=8_000)),
        Row("1003", "c.wav", "A stereo clip.", Clip(440.0, sr=22_050, stereo=True)),
        Row("1004", "d.wav", "Corrupt audio.", Clip(kind="corrupt")),
        Row("1005", "e.wav", "Missing audio.", Clip(kind="missing")),
        Row("1006", "f.wav", "Truncated audio.", Clip(kind="truncated")),
        Row("1007", "g.wav", "   ", Clip(600.0)),
        Row("1008", "h_1.wav", "Fallback sentence.", Clip(kind="corrupt")),
        Row("1008", "h_2.wav", "Fallback sentence.", Clip(700.0)),
    ],
    "de_de": [
        Row("1001", "x1.wav", "Hallo Welt.", Clip(520.0)),
        Row("1002", "x2.wav", "Der zweite Satz.", Clip(540.0)),
        Row("1003", "x3.wav", "Ein Stereo-Clip.", Clip(560.0, sr=22_050, stereo=True)),
        Row("1008", "x8.wav", "Ersatzsatz.", Clip(580.0)),
    ],
    "cmn_hans_cn": [
        Row("1001", "z1.wav", "你好，世界。", Clip(620.0)),
        Row("1003", "z3.wav", "立体声片段。", Clip(640.0)),
        Row("1008", "z8.wav", "备用句子。", Clip(660.0)),
        Row("1009", "z9.wav", "只有中文。", Clip(680.0)),
    ],
}
CODES = {"en_us": "eng", "de_de": "deu", "cmn_hans_cn": "cmn"}
MALFORMED_LINE = "not\ta\tvalid\trow"
RESYNTH_FREQ = 1_000.0
RESYNTH_IDS = {"eng": ["1001", "1002", "1003"], "de_de": ["1001", "1003", "1008"]}


def tone(freq: float, sr: int, stereo: bool = False) -> np.ndarray:
    """A DURATION_S sine at amplitude 0.5 (left) / 0.1 (right, when stereo)."""
    t = np.arange(int(sr * DURATION_S)) / sr
    left = 0.5 * np.sin(2 * np.pi * freq * t)
    return np.stack([left, 0.2 * left], axis=1) if stereo else left


def wav_bytes(freq: float, sr: int, stereo: bool = False, fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    subtype = "PCM_16" if fmt in ("WAV", "FLAC") else None
    sf.write(buf, tone(freq, sr, stereo), sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def clip_bytes(clip: Clip) -> bytes | None:
    """The file's bytes, or None for a missing file."""
    if clip.kind == "missing":
        return None
    if clip.kind == "corrupt":
        return b"this is not audio at all, just some text " * 8
    data = wav_bytes(clip.freq, clip.sr, clip.stereo)
    return data[: 44 + (len(data) - 44) // 2] if clip.kind == "truncated" else data


@dataclass(frozen=True)
class FleursFixture:
    root: Path
    parquet_root: Path
    audio_root: Path


def _tsv_line(row: Row) -> str:
    n = int(row.clip.sr * DURATION_S)
    chars = " ".join(row.normalized.replace(" ", "|"))
    gender = "FEMALE" if int(row.id) % 2 else "MALE"
    return "\t".join([row.id, row.file_name, row.raw, row.normalized, chars, str(n), gender])


def _write_raw(root: Path) -> None:
    for config, rows in ROWS.items():
        cfg = root / "data" / config
        (cfg / "audio").mkdir(parents=True)
        lines = [_tsv_line(r) for r in rows]
        if config == "en_us":
            lines.insert(3, MALFORMED_LINE)
        (cfg / "test.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
        files = {r.file_name: clip_bytes(r.clip) for r in rows}
        if config in ("en_us", "cmn_hans_cn"):
            (cfg / "audio" / "test").mkdir()
            for name, data in files.items():
                if data is not None:
                    (cfg / "audio" / "test" / name).write_bytes(data)
        if config in ("en_us", "de_de"):
            with tarfile.open(cfg / "audio" / "test.tar.gz", "w:gz") as tar:
                for name, data in sorted(files.items(), reverse=True):  # not sorted by name
                    if data is not None:
                        info = tarfile.TarInfo(f"test/{name}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))


def _write_parquet(root: Path) -> None:
    for config, rows in ROWS.items():
        table = pa.table(
            {
                "id": pa.array([int(r.id) for r in rows], pa.int32()),
                "num_samples": [int(r.clip.sr * DURATION_S) for r in rows],
                "path": [None] * len(rows),
                "audio": [
                    {"bytes": clip_bytes(r.clip), "path": f"test/{r.file_name}"} for r in rows
                ],
                "transcription": [r.normalized for r in rows],
                "raw_transcription": [r.raw for r in rows],
                "gender": [int(r.id) % 2 for r in rows],
                "lang_id": [0] * len(rows),
                "language": [config] * len(rows),
            }
        )
        out = root / config / "test"
        out.mkdir(parents=True)
        pq.write_table(table, out / "0000.parquet", row_group_size=2)


def _write_resynth(root: Path) -> None:
    for lang, ids in RESYNTH_IDS.items():
        out = root / lang / "test"
        out.mkdir(parents=True)
        for i in ids:
            (out / f"{i}.wav").write_bytes(wav_bytes(RESYNTH_FREQ, 16_000))


def build_fleurs(tmp: Path) -> FleursFixture:
    """Write all three layouts under ``tmp`` and return their roots."""
    fx = FleursFixture(tmp / "fleurs", tmp / "parquet", tmp / "resynth")
    _write_raw(fx.root)
    _write_parquet(fx.parquet_root)
    _write_resynth(fx.audio_root)
    return fx
