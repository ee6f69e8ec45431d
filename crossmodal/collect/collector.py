"""One model replica of the collect stage: runs a pilot or a work unit and writes its region.

A :class:`Collector` is a callable class: ``__init__`` loads the model and builds the
:class:`~crossmodal.model.capture.Capturer` once; each call runs ONE job, a
:class:`~crossmodal.collect.plan.PilotUnit` (exact values of a pilot sample -> histogram
edges, written to ``edges[task, modality]``) or a :class:`~crossmodal.collect.plan.WorkUnit`
(statistics kept on the model's device, written to ``parts[part]``, plus the per-layer Gini
sums of :mod:`crossmodal.stats.concentration` in ``concentration/<family>/parts[part]``), and
returns a small JSON-ready summary. It runs without Ray; the driver
(:mod:`crossmodal.collect.driver`) runs replicas of it as actors.

Edges are shared by the modalities of a task: the driver sends all pilots of one task as ONE
job, whose speech and text values together choose the edges of the decoder families, written
to ``edges[task, modality]`` of every modality (encoder families only ever see their own
modality). So speech and text histograms of a task can be compared (the modality-selective
units of :mod:`crossmodal.reduce.modality`); a single :class:`PilotUnit` gives one modality's.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from crossmodal.collect.config import CollectConfig
from crossmodal.collect.plan import PilotUnit, WorkUnit, applies
from crossmodal.data.records import Record
from crossmodal.data.sources import open_source
from crossmodal.fleet.faults import FaultPoint
from crossmodal.stats.concentration import GiniStats, LayerGini, concentration_family
from crossmodal.stats.running import UnitStats, choose_edges
from crossmodal.store.layout import (
    UnitCoords,
    has_concentration,
    read_edges,
    write_concentration,
    write_edges,
    write_part,
)
from crossmodal.store.location import zarr_store

Cell = tuple[int, str]
"""A (step, pooling) pair: one value per example and unit."""


def _batches(records: Sequence[Record], size: int) -> Iterator[Sequence[Record]]:
    for start in range(0, len(records), size):
        yield records[start : start + size]


class Collector:
    """One model replica: ``collector(job)`` runs a pilot or a work unit and writes its region.

    Args:
        config: the validated run config.
        store: path of the store, created by the driver.
        device: default ``cuda`` when ``config.actors.num_gpus > 0``, else ``cpu``.
    """

    def __init__(self, config: CollectConfig, store: str | Path, device: str | None = None) -> None:
        from crossmodal.model.capture import Capturer
        from crossmodal.model.load import load_model

        self.config = config
        self.store = str(store)
        use_gpu = config.actors.num_gpus > 0 and torch.cuda.is_available()
        self.device = torch.device(device or ("cuda" if use_gpu else "cpu"))
        self.loaded = load_model(
            config.model, device=self.device, dtype=config.dtype, revision=config.revision
        )
        self.capturer = Capturer(
            self.loaded,
            config.families,
            config.steps,
            config.poolings,
            config.max_new_tokens,
            generator=config.generator,
        )
        index = self.capturer.index
        counts = index.counts("family")  # families are contiguous, in order
        ends = np.cumsum([counts[f] for f in index.families])
        self.slices = {
            f: slice(int(e - counts[f]), int(e)) for f, e in zip(index.families, ends, strict=True)
        }
        self.cells: list[Cell] = [(s, p) for s in config.steps for p in config.poolings]
        self.conc_family = concentration_family(index.families)
        self.layer_gini = None
        if self.conc_family is not None:
            layers = UnitCoords.from_index(index, self.conc_family).unit_arrays()
            self.layer_gini = LayerGini(layers["unit_layer"], self.device)
        self._records: OrderedDict[tuple, tuple[list[Record], int]] = OrderedDict()
        self._skips: dict[tuple, dict[str, list[str]]] = {}
        self._fault = FaultPoint("collector", self.store)  # CROSSMODAL_FAULT, see fleet/faults.py

    def __call__(self, job: WorkUnit | PilotUnit | tuple[PilotUnit, ...]) -> dict[str, Any]:
        return self.run(job) if isinstance(job, WorkUnit) else self.pilot(job)

    # ------------------------------------------------------------------ data

    def load_records(
        self, language: str, modality: str, ids: tuple[str, ...]
    ) -> tuple[list[Record], int]:
        """Records of ``ids`` (in that order) and how many were skipped; a 2-entry cache
        serves the pivot inputs that en2x runs once per target. The skipped ids by reason
        (bad or too long audio, text past the bounds) are in :meth:`skipped_ids`."""
        key = (language, modality, ids)
        if key not in self._records:
            data = self.config.data
            source = open_source(
                data.source,
                path=data.path,
                audio=modality == "speech",
                audio_root=data.audio_root,
                n_sentences=data.examples_per_language,
                seed=self.config.seed,
                bounds=data.bounds,
            )
            by_id = {r.id: r for r in source.records(language, data.split, ids=ids)}
            records = [by_id[i] for i in ids if i in by_id]
            wanted = set(ids) - set(by_id)  # skipped examples, not replaced recordings
            skips = {
                reason: [x for x in labels if x.rsplit("/", 1)[-1] in wanted]
                for reason, labels in source.skipped.ids.items()
            }
            self._skips[key] = {k: v for k, v in skips.items() if v}
            self._records[key] = (records, len(ids) - len(records))
            while len(self._records) > 2:
                dropped, _ = self._records.popitem(last=False)
                self._skips.pop(dropped, None)
        return self._records[key]

    def skipped_ids(self, language: str, modality: str, ids: tuple[str, ...]) -> dict:
        """``{reason: [language/split/id, ...]}`` of the examples of ``ids`` the source
        skipped (after :meth:`load_records`); recorded per work unit in the manifest."""
        return dict(self._skips.get((language, modality, ids), {}))

    def capture(self, records: Sequence[Record], modality: str, target: str) -> Iterator[Any]:
        from crossmodal.model.inputs import make_batch

        for batch in _batches(records, self.config.batch_size):
            inputs = make_batch(
                batch, modality, self.loaded, speech_last_frame=self.config.speech_last_frame
            )
            yield self.capturer.run(inputs, tgt_lang=target)

    def _families(self, modality: str) -> list[str]:
        return [f for f in self.config.families if applies(f, modality)]

    # ------------------------------------------------------------------ pilots

    def pilot(self, job: PilotUnit | tuple[PilotUnit, ...]) -> dict[str, Any]:
        """Exact pilot values -> ``choose_edges`` per (family, step, pooling) -> ``edges``.

        ``job``: one pilot, or the pilots of every modality of one task (the driver's job):
        a family then takes its edges from the values of every modality it applies to and
        writes them to each of them, so they are shared across modalities.
        """
        start = time.time()
        pilots = (job,) if isinstance(job, PilotUnit) else tuple(job)
        task = pilots[0].task
        if any(p.task != task for p in pilots):
            raise ValueError(
                f"pilots must be one of [one task's], got {[p.task for p in pilots]!r}"
            )
        modalities = [p.modality for p in pilots]
        values, n_examples, skipped = self._pilot_values(pilots)
        fallback = self._write_edges(task, modalities, values)
        return {
            "kind": "pilot",
            "task": task,
            "modality": modalities[0],
            "modalities": modalities,
            "n_examples": n_examples,
            "n_skipped": skipped,
            "edges_from_all_steps": sorted(set(fallback)),
            "seconds": time.time() - start,
        }

    def _pilot_values(
        self, pilots: Sequence[PilotUnit]
    ) -> tuple[dict[tuple[str, int, str], list[torch.Tensor]], int, int]:
        """Exact values per (family, step, pooling) of every pilot example, and the number
        of examples run and skipped."""
        values: dict[tuple[str, int, str], list[torch.Tensor]] = {}
        n_examples = skipped = 0
        for cond, ids in (item for p in pilots for item in p.items):
            records, n_skip = self.load_records(cond.source, cond.modality, ids)
            n_examples, skipped = n_examples + len(records), skipped + n_skip
            for res in self.capture(records, cond.modality, cond.target):
                for step, pooling in self.cells:
                    v = res.values[(pooling, step)]
                    for f in self._families(cond.modality):
                        values.setdefault((f, step, pooling), []).append(v[:, self.slices[f]])
        return values, n_examples, skipped

    def _write_edges(
        self,
        task: str,
        modalities: Sequence[str],
        values: dict[tuple[str, int, str], list[torch.Tensor]],
    ) -> list[int]:
        """Choose and write the edges of every family the pilots reach; returns the steps
        whose edges came from every step's values (no pilot output reached them)."""
        cfg, fallback = self.config, []
        families = [f for f in cfg.families if any(applies(f, m) for m in modalities)]
        for f in families:
            for step, pooling in self.cells:
                rows = torch.cat(values.get((f, step, pooling), []) or [torch.zeros(0, 0)])
                if rows.shape[0] == 0:  # no pilot output reached this step: use every step's
                    fallback.append(step)
                    every = [x for s in cfg.steps for x in values.get((f, s, pooling), [])]
                    rows = torch.cat(every or [rows])  # still empty: choose_edges says so
                edges = choose_edges(rows, cfg.n_bins).cpu().numpy()
                for mod in (m for m in modalities if applies(f, m)):  # one at a time: bounded RAM
                    write_edges(self.store, f, task, mod, {(step, pooling): edges})
        return fallback

    # ------------------------------------------------------------------ work units

    def run(self, unit: WorkUnit) -> dict[str, Any]:
        """All batches of one work unit into on-device :class:`UnitStats`, then ``parts``."""
        start, cond = time.time(), unit.condition
        families = self._families(cond.modality)
        stats = self._empty_stats(families, cond.task, cond.modality)
        collected = has_concentration(
            zarr.open_group(zarr_store(self.store), mode="r")
        )  # older stores: no
        gini = self._empty_gini() if collected and self.conc_family else None
        records, skipped = self.load_records(cond.source, cond.modality, unit.example_ids)
        n_rows, n_ended = [0] * len(self.config.steps), [0] * len(self.config.steps)
        texts: list[str] = []
        for res in self.capture(records, cond.modality, cond.target):
            texts.extend(res.texts[: max(0, 3 - len(texts))])
            for si, step in enumerate(self.config.steps):
                n_rows[si] += len(res.rows[step])
                n_ended[si] += res.n_ended[step]
            self._update(res, families, stats, gini)
            self._fault.tick()
        self._write_part(unit.index, stats, gini)
        return {
            "kind": "part",
            "part": unit.index,
            "key": unit.key,
            "n_examples": len(records),
            "n_skipped": skipped,
            "skipped": self.skipped_ids(cond.source, cond.modality, unit.example_ids),
            "n_rows": n_rows,
            "n_ended": n_ended,
            "dropped": sum(int(s.dropped) for s in stats.values()),
            "texts": texts,
            "seconds": time.time() - start,
            "provenance": self.loaded.provenance(),
        }

    def _empty_stats(
        self, families: Sequence[str], task: str, modality: str
    ) -> dict[tuple[str, int, str], UnitStats]:
        """Empty statistics per (family, step, pooling) on the pilot's edges."""
        stats = {}
        for f in families:
            edges = read_edges(self.store, f, task, modality)
            for cell in self.cells:
                values = torch.as_tensor(edges[cell], device=self.device)
                stats[(f, *cell)] = UnitStats.empty(values, self.device)
        return stats

    def _empty_gini(self) -> dict[Cell, GiniStats]:
        """Empty per-layer Gini sums per (step, pooling)."""
        n_layers = len(self.layer_gini.layers)
        return {cell: GiniStats.empty(n_layers, self.device) for cell in self.cells}

    def _update(
        self,
        res: Any,
        families: Sequence[str],
        stats: dict[tuple[str, int, str], UnitStats],
        gini: dict[Cell, GiniStats] | None,
    ) -> None:
        """Add one batch's values to the statistics (and the layer Gini sums)."""
        for step, pooling in self.cells:
            v = res.values[(pooling, step)]
            if not len(v):  # update() needs >= 1 row
                continue
            for f in families:
                stats[(f, step, pooling)].update(v[:, self.slices[f]])
            if gini is not None:
                gini[(step, pooling)].update(self.layer_gini(v[:, self.slices[self.conc_family]]))

    def _write_part(
        self,
        part: int,
        stats: dict[tuple[str, int, str], UnitStats],
        gini: dict[Cell, GiniStats] | None,
    ) -> None:
        """``parts[part]`` of every family, and the concentration part when collected."""
        for (f, *cell), s in stats.items():  # one (step, pooling) at a time: bounded host RAM
            write_part(self.store, f, part, {tuple(cell): s.to_numpy()})
        if gini is not None:  # [step, pooling, layer] per name: one chunk per array
            arrays = {cell: g.to_numpy() for cell, g in gini.items()}
            shape = (len(self.config.steps), len(self.config.poolings), -1)
            names = next(iter(arrays.values()))
            stacked = {
                k: np.stack([arrays[cell][k] for cell in self.cells]).reshape(shape) for k in names
            }
            write_concentration(self.store, self.conc_family, part, stacked)
