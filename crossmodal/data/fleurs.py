"""FLEURS as :class:`~crossmodal.data.records.Record` streams: the raw layout and a Parquet copy.

Raw layout of the ``google/fleurs`` dataset repository (checked against its loading script):

- ``ROOT/data/<config>/<split>.tsv``: no header, tab-separated: id, file name, raw
  transcription, normalised transcription, space-separated characters/words, number of
  samples, gender. Several rows (recordings) can share an id.
- ``ROOT/data/<config>/audio/<split>.tar.gz``: the WAVs, streamed out member by member
  (nothing is extracted to disk), or an extracted ``ROOT/data/<config>/audio/<split>/``.

Parquet copy (the Hub's conversion): ``ROOT/<config>/<split>/*.parquet`` (also
``<split>.parquet``, ``<split>-*.parquet``; ``dev`` also as ``validation``), columns id, path,
audio{bytes, path}, transcription, raw_transcription (see :class:`ParquetColumns`), read
batch by batch, never whole.

Alternative audio root (single-speaker re-synthesised speech, as in the reference study):
``AUDIO_ROOT/<seamless code or fleurs config>/<split>/<id>.wav``, one file per sentence id;
it replaces the original recordings and the text still comes from FLEURS.

Recordings: by default one record per id, the first recording by file name that decodes
(a bad one is counted and the next is tried). Yield order follows the source (TSV order of
ids, or tar/Parquet order); sort with :func:`crossmodal.data.sources.join_by_id`.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow.parquet as pq

from crossmodal.data.audio import AudioError, iter_audio_files, iter_tar_audio, try_load_audio
from crossmodal.data.languages import SEAMLESS_TO_FLEURS, validate_language
from crossmodal.data.records import TARGET_SAMPLING_RATE, Record
from crossmodal.data.sources import Bounds, DataError, SkipReport, validate_split
from crossmodal.store.location import is_url, upath

TEXT_FIELDS = ("raw", "normalized")
AUDIO_LAYOUTS = ("auto", "extracted", "tar")
_TSV_COLUMNS = 7


@dataclass(frozen=True)
class _Row:
    id: str
    file_name: str
    text: str


@dataclass(frozen=True)
class ParquetColumns:
    """Column names of a Parquet copy (defaults: the Hub's FLEURS conversion).

    ``audio`` may be a struct with ``bytes`` and ``path`` fields or a plain binary column;
    the recording's file name comes from ``audio.path``, else from ``path``.
    """

    id: str = "id"
    raw_text: str = "raw_transcription"
    normalized_text: str = "transcription"
    audio: str = "audio"
    path: str = "path"


def _parquet(path: Path) -> pq.ParquetFile:
    """A Parquet file; one at a URL through s3fs (ranged reads: its footer, then only the
    row groups and columns read)."""
    return pq.ParquetFile(path.open("rb") if is_url(path) else path)


def _fail(field: str, allowed: object, got: object, fix: str) -> DataError:
    return DataError(f"{field} must be one of {allowed}, got {got!r}; {fix}")


class _FleursLoader:
    """Row selection, skip counting and audio choice shared by both FLEURS layouts."""

    def __init__(
        self,
        root: str | Path,
        *,
        audio: bool,
        text_field: str,
        audio_root: str | Path | None,
        one_per_id: bool,
        bounds: Bounds,
    ) -> None:
        if text_field not in TEXT_FIELDS:
            raise _fail("text_field", list(TEXT_FIELDS), text_field, "'raw' keeps punctuation")
        self.root = upath(root)  # a URL: s3fs, with the registered storage_options
        self.audio = audio
        self.text_field = text_field
        self.audio_root = None if audio_root is None else upath(audio_root)
        self.one_per_id = one_per_id
        self.bounds = bounds
        self.skipped = SkipReport()
        if self.audio_root is not None and not self.audio_root.is_dir():
            raise _fail("audio_root", "an existing directory", str(audio_root), "check the path")

    # Backends implement: _config_dir (a config's directory), _check_split (raise one line if
    # the split's metadata or needed audio is absent), _rows (text-screened metadata rows) and
    # _fetch (yield (file name, audio or AudioError) once per wanted name found).
    def _config_dir(self, config: str) -> Path:
        raise NotImplementedError

    def _check_split(self, config: str, split: str) -> None:
        raise NotImplementedError

    def _rows(self, config: str, split: str, language: str) -> Iterator[_Row]:
        raise NotImplementedError

    def _fetch(self, config: str, split: str, wanted: set[str]) -> Iterator[tuple[str, object]]:
        raise NotImplementedError

    def available_languages(self) -> list[str]:
        """Seamless codes whose FLEURS config is present under the root."""
        return sorted(
            code for code, config in SEAMLESS_TO_FLEURS.items() if self._config_dir(config).is_dir()
        )

    def records(
        self, language: str, split: str, *, ids: Collection[str] | None = None
    ) -> Iterator[Record]:
        """Records of Seamless language ``language`` in ``split`` (train/dev/test).

        Configuration is checked here, before iteration starts; bad examples found while
        iterating are skipped and counted in :attr:`skipped`.

        Args:
            ids: keep only these sentence ids (e.g. the ids a text-only join kept).

        Raises:
            DataError / ValueError: unknown split or language, or missing dataset files.
        """
        split = validate_split(split)
        validate_language(language, SEAMLESS_TO_FLEURS)
        config = SEAMLESS_TO_FLEURS[language]
        if not self._config_dir(config).is_dir():
            fix = f"{self._config_dir(config)} not found (FLEURS config {config!r})"
            raise _fail("language", self.available_languages(), language, fix)
        self._check_split(config, split)
        audio_dir = None
        if self.audio and self.audio_root is not None:
            audio_dir = self._audio_root_dir(language, config, split)
        return self._records(language, config, split, ids, audio_dir)

    def _records(
        self,
        language: str,
        config: str,
        split: str,
        ids: Collection[str] | None,
        audio_dir: Path | None,
    ) -> Iterator[Record]:
        keep = None if ids is None else {str(i) for i in ids}
        groups: dict[str, list[_Row]] = {}  # key -> candidate recordings
        for row in self._rows(config, split, language):
            key = row.id if self.one_per_id else row.file_name  # a repeated name: one recording
            if (keep is None or row.id in keep) and (self.one_per_id or key not in groups):
                groups.setdefault(key, []).append(row)
        for rows in groups.values():
            rows.sort(key=lambda r: r.file_name)
        if not self.audio:
            for rows in groups.values():
                yield Record(rows[0].id, language, rows[0].text, split=split)
        elif audio_dir is not None:
            yield from self._from_audio_root(audio_dir, language, split, groups)
        else:
            yield from self._choose_recordings(language, config, split, groups)

    def _choose_recordings(
        self, language: str, config: str, split: str, pending: dict[str, list[_Row]]
    ) -> Iterator[Record]:
        """Per key, the first candidate by file name that decodes; one fetch pass per round."""
        while pending:
            wanted = {rows[0].file_name: key for key, rows in pending.items()}
            found: dict[str, np.ndarray | AudioError] = {}
            for name, fetched in self._fetch(config, split, set(wanted)):
                key = wanted[name]
                result = self._bounded(fetched, name)
                if isinstance(result, AudioError):
                    found[name] = result
                    continue
                row = pending.pop(key)[0]
                del wanted[name]
                yield Record(row.id, language, row.text, result, TARGET_SAMPLING_RATE, split)
            for name, key in wanted.items():
                row = pending[key].pop(0)
                err = found.get(
                    name, AudioError(f"{name}: not in the audio for {config}/{split}", "missing")
                )
                self.skipped.add(f"audio_{err.problem}", f"{language}/{split}/{row.id} ({err})")
                if not pending[key]:
                    del pending[key]

    def _audio_root_dir(self, language: str, config: str, split: str) -> Path:
        """``AUDIO_ROOT/<code>/<split>`` or ``AUDIO_ROOT/<config>/<split>``, whichever exists."""
        root = self.audio_root or upath(".")
        for directory in (root / language / split, root / config / split):
            if directory.is_dir():
                return directory
        fix = f"no {language}/{split}/ or {config}/{split}/ directory there"
        raise _fail("audio_root", "AUDIO_ROOT/<code or config>/<split>/<id>.wav", str(root), fix)

    def _from_audio_root(
        self, directory: Path, language: str, split: str, groups: dict[str, list[_Row]]
    ) -> Iterator[Record]:
        done: set[str] = set()
        for rows in groups.values():
            row = rows[0]
            if row.id in done:  # one_per_id=False: one re-synthesised file per id
                continue
            done.add(row.id)
            audio = self._bounded(try_load_audio(directory / f"{row.id}.wav"), f"{row.id}.wav")
            if isinstance(audio, AudioError):
                self.skipped.add(f"audio_{audio.problem}", f"{language}/{split}/{row.id} ({audio})")
            else:
                yield Record(row.id, language, row.text, audio, TARGET_SAMPLING_RATE, split)

    def _bounded(self, audio: np.ndarray | AudioError, name: str) -> np.ndarray | AudioError:
        """``audio``, or an ``AudioError`` (``too_long``) past ``max_audio_seconds``: a long
        recording is skipped like a bad one, before any model sees it."""
        if isinstance(audio, AudioError):
            return audio
        why = self.bounds.audio_problem(len(audio), TARGET_SAMPLING_RATE)
        return audio if why is None else AudioError(f"{name}: {why}", "too_long")

    def _keep_text(
        self, text: str | bytes | None, language: str, split: str, row_id: str
    ) -> str | None:
        """The stripped text, or None after counting an empty, too long or non-UTF-8 one."""
        label = f"{language}/{split}/{row_id}"
        if isinstance(text, bytes):  # a binary column: decoded strictly, never with U+FFFD
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError:
                self.skipped.add("text_not_utf8", label)
                return None
        text = (text or "").strip()
        if not text:
            self.skipped.add("text_empty", label)
            return None
        problem = self.bounds.text_problem(text)
        if problem is not None:
            self.skipped.add(problem, label)
            return None
        return text


class FleursSource(_FleursLoader):
    """FLEURS from the raw repository layout (TSV metadata + tar.gz or extracted WAVs).

    Args:
        root: the dataset repository root (holding ``data/<config>/``).
        audio: decode audio; ``False`` loads text only and never opens audio files.
        text_field: ``raw`` transcription (default) or ``normalized``.
        audio_root: alternative audio root replacing the recordings (see module docstring).
        one_per_id: one record per sentence id (default) or one per recording.
        audio_layout: ``auto`` (extracted directory if present, else tar.gz), ``extracted``
            or ``tar``.
        bounds: longest audio and text used; longer examples are skipped and counted
            (``audio_too_long``: the next recording of the id is tried, like a bad one).
    """

    def __init__(
        self,
        root: str | Path,
        *,
        audio: bool = True,
        text_field: str = "raw",
        audio_root: str | Path | None = None,
        one_per_id: bool = True,
        audio_layout: str = "auto",
        bounds: Bounds = Bounds(),  # noqa: B008 - frozen, so safe to share
    ) -> None:
        super().__init__(
            root,
            audio=audio,
            text_field=text_field,
            audio_root=audio_root,
            one_per_id=one_per_id,
            bounds=bounds,
        )
        if audio_layout not in AUDIO_LAYOUTS:
            raise _fail("audio_layout", list(AUDIO_LAYOUTS), audio_layout, "'auto' finds it")
        if not (self.root / "data").is_dir():
            fix = "point it at a copy of the google/fleurs dataset repository"
            raise _fail("FLEURS root", "a directory with data/<config>/<split>.tsv", str(root), fix)
        self.audio_layout = audio_layout

    def _config_dir(self, config: str) -> Path:
        return self.root / "data" / config

    def _check_split(self, config: str, split: str) -> None:
        path = self._config_dir(config) / f"{split}.tsv"
        if not path.is_file():
            raise _fail("split file", f"{config}/<split>.tsv", str(path), "this split is missing")
        if self.audio and self.audio_root is None:
            self._audio_source(config, split)

    def _audio_source(self, config: str, split: str) -> tuple[Path, bool]:
        """(path, is_directory) of the split's audio, per ``audio_layout``."""
        audio_dir = self._config_dir(config) / "audio"
        extracted, archive = audio_dir / split, audio_dir / f"{split}.tar.gz"
        if self.audio_layout in ("auto", "extracted") and extracted.is_dir():
            return extracted, True
        if self.audio_layout in ("auto", "tar") and archive.is_file():
            return archive, False
        raise DataError(
            f"audio must be one of [{archive}, {extracted}/], got neither (audio_layout="
            f"{self.audio_layout!r}); download it, change audio_layout, or pass audio=False"
        )

    def _rows(self, config: str, split: str, language: str) -> Iterator[_Row]:
        path = self._config_dir(config) / f"{split}.tsv"
        text_col = 2 if self.text_field == "raw" else 3
        with path.open("rb") as lines:  # decoded per line, strictly: no U+FFFD in model input
            for n, raw in enumerate(lines, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    row_id = raw.split(b"\t", 1)[0].decode("ascii", "replace")
                    self.skipped.add("text_not_utf8", f"{language}/{split}/{row_id}")
                    continue
                cols = line.rstrip("\r\n").split("\t")
                if len(cols) != _TSV_COLUMNS or not cols[0].isdigit() or not cols[1].strip():
                    if line.strip():
                        self.skipped.add("row_malformed", f"{language}/{split} {path.name}:{n}")
                    continue
                text = self._keep_text(cols[text_col], language, split, cols[0])
                if text is not None:
                    yield _Row(cols[0], cols[1].strip(), text)

    def _fetch(
        self, config: str, split: str, wanted: set[str]
    ) -> Iterator[tuple[str, np.ndarray | AudioError]]:
        path, is_dir = self._audio_source(config, split)
        return iter_audio_files(path, wanted) if is_dir else iter_tar_audio(path, wanted)


class FleursParquetSource(_FleursLoader):
    """FLEURS from a Parquet copy (same fields as the raw layout), read batch by batch.

    Args:
        root: directory holding ``<config>/<split>/*.parquet`` (see module docstring).
        columns: column names, if they differ from the Hub conversion's.
        batch_size: rows per Arrow batch (bounds memory: at most this many audio blobs).
        audio, text_field, audio_root, one_per_id, bounds: as :class:`FleursSource`.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        audio: bool = True,
        text_field: str = "raw",
        audio_root: str | Path | None = None,
        one_per_id: bool = True,
        columns: ParquetColumns = ParquetColumns(),  # noqa: B008 - frozen, so safe to share
        batch_size: int = 64,
        bounds: Bounds = Bounds(),  # noqa: B008 - frozen, so safe to share
    ) -> None:
        super().__init__(
            root,
            audio=audio,
            text_field=text_field,
            audio_root=audio_root,
            one_per_id=one_per_id,
            bounds=bounds,
        )
        if not self.root.is_dir():
            raise _fail("Parquet root", "a directory with <config>/<split>/", str(root), "check it")
        self.columns = columns
        self.batch_size = batch_size

    def _config_dir(self, config: str) -> Path:
        return self.root / config

    def _check_split(self, config: str, split: str) -> None:
        c = self.columns
        needed = [c.id, c.raw_text if self.text_field == "raw" else c.normalized_text]
        needed += [c.audio] if self.audio and self.audio_root is None else []
        for path in self._files(config, split):
            names = _parquet(path).schema_arrow.names
            for col in needed:
                if col not in names:
                    raise _fail("column", names, col, f"set ParquetColumns for {path}")

    def _files(self, config: str, split: str) -> list[Path]:
        base = self._config_dir(config)
        for name in (split, "validation") if split == "dev" else (split,):
            for files in (
                sorted((base / name).glob("*.parquet")),
                [base / f"{name}.parquet"] if (base / f"{name}.parquet").is_file() else [],
                sorted(base.glob(f"{name}-*.parquet")),
            ):
                if files:
                    return files
        raise _fail("split file", f"{config}/{split}/*.parquet", str(base / split), "it is missing")

    def _batches(
        self, config: str, split: str, with_audio: bool
    ) -> Iterator[tuple[str, str, object]]:
        """(id, file name, text or audio bytes) per row, reading only the columns needed."""
        c = self.columns
        text_col = c.raw_text if self.text_field == "raw" else c.normalized_text
        for path in self._files(config, split):
            handle = _parquet(path)
            names = handle.schema_arrow.names
            value_col = c.audio if with_audio else text_col  # present: see _check_split
            is_struct = c.audio in names and handle.schema_arrow.field(c.audio).type.num_fields > 0
            columns = [c.id, value_col] + [c.path] * (c.path in names)
            columns += [f"{c.audio}.path"] if is_struct and not with_audio else []
            batches = handle.iter_batches(batch_size=self.batch_size, columns=columns)
            for n_batch, batch in enumerate(batches):
                for n_row, row in enumerate(batch.to_pylist()):
                    blob = row.get(c.audio)
                    inner = blob.get("path") if isinstance(blob, dict) else None
                    source_name = inner or row.get(c.path)
                    # Without any path column, a row's position names it (same in both passes).
                    name = (
                        PurePosixPath(source_name).name
                        if source_name
                        else f"{path.name}#{n_batch}:{n_row}"
                    )
                    if with_audio:
                        value = blob.get("bytes") if isinstance(blob, dict) else blob
                    else:
                        value = row.get(text_col)
                    yield str(row[c.id]), name, value

    def _rows(self, config: str, split: str, language: str) -> Iterator[_Row]:
        for row_id, name, text in self._batches(config, split, with_audio=False):
            kept = self._keep_text(text, language, split, row_id)
            if kept is not None:
                yield _Row(row_id, name, kept)

    def _fetch(
        self, config: str, split: str, wanted: set[str]
    ) -> Iterator[tuple[str, np.ndarray | AudioError]]:
        remaining = set(wanted)
        for _, name, data in self._batches(config, split, with_audio=True):
            if name not in remaining:
                continue
            remaining.discard(name)
            label = f"{config}/{split}:{name}"
            missing = AudioError(f"{label}: no audio bytes in the Parquet row", "missing")
            yield name, try_load_audio(data, label) if data else missing
