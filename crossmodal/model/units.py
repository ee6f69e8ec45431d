"""Unit families and the one address scheme for units, used by every stage.

A *site* is one module output that is captured (``decoder.layers.3.ffn.fc1``); a *unit* is one
output feature of a site, addressed as ``(site, feature)`` and stored under a flat unit index
(``site.offset + feature``). Capture, statistics, Zarr coordinates, reducers and reports all
use the :class:`UnitIndex` built here, so a unit has the same name everywhere.

Families (docs/method.md, "Units"):
  * ``decoder``: every Linear and LayerNorm output of ``text_decoder`` (fc1 BEFORE the ReLU),
    plus the final ``text_decoder.layer_norm``: the reference study's decoder units (it keeps
    modules whose class is named Linear, Conv1d, LayerNorm, Embedding or GLU; in
    ``text_decoder`` only Linear and LayerNorm ones exist, its token embedding's class being
    ``SeamlessM4Tv2ScaledWordEmbedding``).
  * ``ffn_act``: the output of ``text_decoder.layers[i].ffn.act`` (post-ReLU). Not
    ``layers[i].activation_fn``: that module exists but is never called
    (docs/platform.md, "transformers and SeamlessM4T v2").
  * ``speech_encoder`` / ``text_encoder``: Linear, LayerNorm, Conv1d and GLU outputs of each
    encoder, pooled over input positions (step-independent); ``encoder`` means both.

Site names are the module path with ``text_decoder`` shortened to ``decoder``. The adapter's
GLU runs twice per forward (on ``residual_conv`` and on ``self_attn_conv``), so it gives two
sites, ``...activation@residual_conv`` and ``...activation@self_attn_conv``.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

if TYPE_CHECKING:  # pandas stays off `crossmodal bench`'s import path
    import pandas as pd

FAMILIES = ("decoder", "ffn_act", "speech_encoder", "text_encoder")
ALIASES = {"encoder": ("speech_encoder", "text_encoder")}
COMPONENTS = {"decoder": "text_decoder", "ffn_act": "text_decoder"}
SHORT = {
    "text_decoder": "decoder",
    "speech_encoder": "speech_encoder",
    "text_encoder": "text_encoder",
}
_CAPTURED = (nn.Linear, nn.LayerNorm, nn.Conv1d, nn.GLU)
# Modules that run more than once per forward: (parent class suffix, attribute) -> call names.
_MULTI_CALL = {("ConformerAdapterLayer", "activation"): ("residual_conv", "self_attn_conv")}


@dataclass(frozen=True)
class Site:
    """One captured module output.

    Attributes:
        name: the site's address (``decoder.layers.3.ffn.fc1``).
        module_path: the module in ``model.named_modules()``.
        family: one of :data:`FAMILIES`.
        component: ``text_decoder``, ``speech_encoder`` or ``text_encoder``.
        layer: index in its layer stack, or ``None`` outside one (final norms, projections).
        submodule: ``self_attn``, ``cross_attn``, ``ffn``, ``final_norm``, ``conv``, ``adapter``,
            ``feature_projection`` or ``layer_norm``.
        module_type: ``Linear``, ``LayerNorm``, ``Conv1d``, ``GLU`` or ``ReLU``.
        n_features: units at this site.
        offset: flat index of feature 0.
        positions: what the output's sequence axis runs over: ``decoder`` (decoding
            positions), ``encoder_output`` (cross-attention k/v over encoder frames),
            ``speech`` or ``text`` (encoder input positions).
        subsample: adapter strides applied before this output (speech sites only).
        call: which call of a module that runs several times per forward.
        channels_first: output is ``[batch, feature, position]`` (Conv1d, GLU).
    """

    name: str
    module_path: str
    family: str
    component: str
    layer: int | None
    submodule: str
    module_type: str
    n_features: int
    offset: int
    positions: str
    subsample: int = 0
    call: int = 0
    channels_first: bool = False

    @property
    def units(self) -> range:
        return range(self.offset, self.offset + self.n_features)

    @property
    def step_invariant(self) -> bool:
        """Whether the site's value cannot depend on the decoding step: it is computed from
        the encoder output alone (cross-attention ``k_proj``/``v_proj``) or is an encoder
        site, so every step sees the same value (docs/method.md, "Units")."""
        return self.positions != "decoder"


def resolve_families(families: str | Iterable[str]) -> tuple[str, ...]:
    """Expand aliases and put families in the canonical order (same set -> same index).

    Raises:
        ValueError: an unknown family, or none at all.
    """
    names = [families] if isinstance(families, str) else list(families)
    allowed = sorted([*FAMILIES, *ALIASES])
    wanted: set[str] = set()
    for name in names:
        if name not in FAMILIES and name not in ALIASES:
            raise ValueError(f"family must be one of {allowed}, got {name!r}; pick unit families")
        wanted.update(ALIASES.get(name, (name,)))
    if not wanted:
        raise ValueError(f"families must be one of non-empty subsets of {allowed}, got {names!r}")
    return tuple(f for f in FAMILIES if f in wanted)


def declared_width(module: nn.Module) -> int | None:
    """Output width when the module declares it (Linear, LayerNorm, Conv1d), else None."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.LayerNorm):
        return int(module.normalized_shape[-1])
    if isinstance(module, nn.Conv1d):
        return module.out_channels
    return None


def _n_features(module: nn.Module, parent: nn.Module) -> int:
    width = declared_width(module)
    if width is not None:
        return width
    if isinstance(module, nn.GLU):
        # A GLU halves the output of the first Conv1d of its block (pointwise_conv1, residual_conv).
        conv = next(m for m in parent.children() if isinstance(m, nn.Conv1d))
        return conv.out_channels // 2
    return parent.fc1.out_features  # ffn.act: as wide as fc1


def _layer_of(parts: list[str]) -> int | None:
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def _decoder_submodule(parts: list[str]) -> str:
    if len(parts) == 2:  # text_decoder.layer_norm
        return "final_norm"
    head = parts[3]
    if head.startswith("self_attn"):
        return "self_attn"
    if head.startswith("cross_attention"):
        return "cross_attn"
    return "ffn"


def _speech_layout(parts: list[str], n_adapters: int) -> tuple[str, int]:
    """(submodule, subsample) of a speech-encoder module path."""
    if parts[1] == "feature_projection":
        return "feature_projection", 0
    if parts[1] == "inner_layer_norm":
        return "final_norm", n_adapters
    if parts[1] == "intermediate_ffn":
        return "ffn", 0
    if parts[1] == "adapter":
        k = int(parts[3])
        before = parts[4] in ("residual_layer_norm", "self_attn_layer_norm")
        return "adapter", k if before else k + 1
    if len(parts) == 3:  # speech_encoder.encoder.layer_norm
        return "final_norm", 0
    head = parts[4]
    if head.startswith("ffn"):
        return "ffn", 0
    if head.startswith("self_attn"):
        return "self_attn", 0
    if head == "conv_module":
        return "conv", 0
    return "layer_norm", 0


def _text_encoder_submodule(parts: list[str]) -> str:
    if len(parts) == 2:
        return "final_norm"
    return "self_attn" if parts[3].startswith("self_attn") else "ffn"


def _family_sites(model: nn.Module, family: str) -> list[dict[str, Any]]:
    """Site fields (without offset) of one family, in module registration order."""
    component = COMPONENTS.get(family, family)
    modules = dict(model.named_modules())
    adapter = getattr(getattr(model, "speech_encoder", None), "adapter", None)
    n_adapters = 0 if adapter is None else len(adapter.layers)
    out = []
    for path, module in modules.items():
        parts = path.split(".")
        if parts[0] != component or len(parts) < 2:
            continue
        parent = modules[".".join(parts[:-1])]
        if family == "ffn_act":
            if not (parts[-1] == "act" and parts[-2] == "ffn" and _layer_of(parts) is not None):
                continue
        elif not isinstance(module, _CAPTURED):
            continue
        row: dict[str, Any] = dict(
            module_path=path,
            family=family,
            component=component,
            layer=_layer_of(parts),
            module_type=type(module).__name__,
            n_features=_n_features(module, parent),
            positions="decoder",
            channels_first=isinstance(module, (nn.Conv1d, nn.GLU)),
        )
        if component == "text_decoder":
            row["submodule"] = _decoder_submodule(parts)
            if row["submodule"] == "cross_attn" and parts[-1] in ("k_proj", "v_proj"):
                row["positions"] = "encoder_output"
        elif component == "speech_encoder":
            row["submodule"], row["subsample"] = _speech_layout(parts, n_adapters)
            row["positions"] = "speech"
            if parts[1] == "adapter":
                row["layer"] = int(parts[3])
        else:
            row["submodule"], row["positions"] = _text_encoder_submodule(parts), "text"
        name = SHORT[component] + path[len(component) :]
        calls = next(
            (
                v
                for (cls, attr), v in _MULTI_CALL.items()
                if type(parent).__name__.endswith(cls) and parts[-1] == attr
            ),
            None,
        )
        for call, label in enumerate(calls or (None,)):
            suffix = f"@{label}" if label else ""
            out.append(dict(row, name=name + suffix, call=call))
    return out


@dataclass(frozen=True)
class UnitIndex:
    """The captured sites of a model, in a deterministic order, with flat unit offsets.

    Build with :meth:`from_model`; store with :meth:`to_records` / :meth:`from_records`.
    """

    sites: tuple[Site, ...]
    families: tuple[str, ...]

    @classmethod
    def from_model(
        cls, model: nn.Module, families: str | Iterable[str] = ("decoder",)
    ) -> UnitIndex:
        """Index the sites of ``families`` in ``model`` (works on the meta device).

        Raises:
            ValueError: an unknown family, or a family with no module in ``model``.
        """
        fams = resolve_families(families)
        sites: list[Site] = []
        offset = 0
        for family in fams:
            rows = _family_sites(model, family)
            if not rows:
                raise ValueError(
                    f"family must be one of families present in the model, got {family!r}; "
                    f"{COMPONENTS.get(family, family)} has no capturable module"
                )
            for row in rows:
                sites.append(Site(offset=offset, **row))
                offset += row["n_features"]
        return cls(tuple(sites), fams)

    @classmethod
    def from_records(cls, records: Sequence[dict[str, Any]]) -> UnitIndex:
        """Inverse of :meth:`to_records`."""
        sites = tuple(Site(**r) for r in records)
        fams = tuple(f for f in FAMILIES if any(s.family == f for s in sites))
        return cls(sites, fams)

    def to_records(self) -> list[dict[str, Any]]:
        """JSON-serialisable site rows, to store with every result."""
        return [asdict(s) for s in self.sites]

    @property
    def n_units(self) -> int:
        last = self.sites[-1]
        return last.offset + last.n_features

    def __len__(self) -> int:
        return self.n_units

    def site(self, name: str) -> Site:
        """The site called ``name``.

        Raises:
            KeyError: one line naming the site and a few close names.
        """
        found = self._by_name.get(name)
        if found is None:
            close = difflib.get_close_matches(name, list(self._by_name), n=3)
            raise KeyError(f"site must be one of the index's sites, got {name!r}; close: {close}")
        return found

    @cached_property
    def _by_name(self) -> dict[str, Site]:
        return {s.name: s for s in self.sites}

    def units_of(self, pattern: str) -> np.ndarray:
        """Unit indices of every site whose name matches ``pattern`` (a name or a glob).

        Example: ``index.units_of("decoder.layers.3.*")`` is all of layer 3's decoder units.

        Raises:
            KeyError: no site matches.
        """
        sites = [s for s in self.sites if fnmatch.fnmatchcase(s.name, pattern)]
        if not sites:
            raise KeyError(f"pattern must match one of the index's sites, got {pattern!r}")
        return np.concatenate([np.arange(s.offset, s.offset + s.n_features) for s in sites])

    def select(
        self,
        *,
        families: Iterable[str] | None = None,
        layers: Iterable[int] | None = None,
        submodules: Iterable[str] | None = None,
    ) -> np.ndarray:
        """Unit indices of the sites that pass every given filter (``None`` keeps all).

        Example: ``index.select(submodules=["self_attn", "cross_attn"])`` = attention units.
        """
        fams = None if families is None else set(resolve_families(families))
        lays = None if layers is None else set(layers)
        subs = None if submodules is None else set(submodules)
        keep = [
            np.arange(s.offset, s.offset + s.n_features)
            for s in self.sites
            if (fams is None or s.family in fams)
            and (lays is None or s.layer in lays)
            and (subs is None or s.submodule in subs)
        ]
        return np.concatenate(keep) if keep else np.zeros(0, dtype=np.int64)

    def address(self, unit: int) -> tuple[str, int]:
        """``(site name, feature)`` of a flat unit index."""
        if not 0 <= unit < self.n_units:
            raise IndexError(f"unit must be one of [0..{self.n_units - 1}], got {unit!r}")
        site = self.sites[int(np.searchsorted(self._offsets, unit, side="right")) - 1]
        return site.name, unit - site.offset

    @cached_property
    def _offsets(self) -> np.ndarray:
        return np.fromiter((s.offset for s in self.sites), dtype=np.int64)

    def unit(self, site: str, feature: int) -> int:
        """Flat unit index of ``(site, feature)``."""
        s = self.site(site)
        if not 0 <= feature < s.n_features:
            raise IndexError(f"feature must be one of [0..{s.n_features - 1}], got {feature!r}")
        return s.offset + feature

    def table(self, level: str = "site") -> pd.DataFrame:
        """One row per site, or per unit (``level="unit"``: ``unit``, ``feature`` columns
        added); ``step_invariant`` marks the sites whose value no decoding step changes."""
        import pandas as pd

        sites = pd.DataFrame(self.to_records())
        sites["layer"] = sites["layer"].astype("Int64")
        sites["step_invariant"] = [s.step_invariant for s in self.sites]
        if level == "site":
            return sites
        if level != "unit":
            raise ValueError(f"level must be one of ['site', 'unit'], got {level!r}")
        counts = sites["n_features"].to_numpy()
        units = sites.loc[np.repeat(np.arange(len(sites)), counts)].reset_index(drop=True)
        units.insert(0, "unit", np.arange(self.n_units, dtype=np.int64))
        units.insert(1, "feature", units["unit"].to_numpy() - units["offset"].to_numpy())
        return units.drop(columns=["offset", "n_features"])

    def counts(self, by: str = "family") -> dict[Any, int]:
        """Units per value of a site field (``family``, ``submodule``, ``layer``...)."""
        out: dict[Any, int] = {}
        for s in self.sites:
            key = getattr(s, by)
            out[key] = out.get(key, 0) + s.n_features
        return out
