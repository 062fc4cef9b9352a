"""The manifest of an elasticize file (metadata key ``elasticize``), as a frozen, typed record.

:func:`elasticize.fileformat.manifest.check_manifest` builds a :class:`Manifest` only from a
manifest it checked in full and migrated to the current format
(:data:`elasticize.plan.migrate.MANIFEST_FORMAT`); the readers (``load``, ``load_subnet``,
``elasticize inspect``) use its attributes, never the raw keys. The free-form JSON values (the
recipe, a preset's configuration, metrics) are frozen too (:func:`freeze`: read-only mappings and
tuples); :func:`thaw` gives a plain copy where a value is handed on to code that may change it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from .core import Plan
from .types import Frozen, frozen_map

__all__ = ["Manifest", "Preset", "StoredFile", "BiasCompensation", "freeze", "thaw"]


def _empty() -> Mapping[str, Any]:
    return frozen_map({})


def freeze(v: Any) -> Any:
    """A JSON value made immutable: objects as read-only mappings, lists as tuples (deeply)."""
    if isinstance(v, Mapping):
        return MappingProxyType({k: freeze(x) for k, x in v.items()})
    if isinstance(v, (list, tuple)):
        return tuple(freeze(x) for x in v)
    return v


def thaw(v: Any) -> Any:
    """A plain, mutable copy of a (frozen) JSON value: dicts and lists."""
    if isinstance(v, Mapping):
        return {k: thaw(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [thaw(x) for x in v]
    return v


@dataclass(frozen=True)
class Preset(Frozen):
    """A named sub-network of a super-network file: its configuration, MACs per sample, parameters,
    the bytes its tensors hold (None: not written) and its measured metrics."""

    config: Mapping[str, Any]
    macs: int
    params: int
    bytes: int | None = None
    metrics: Mapping[str, float] = field(default_factory=_empty)

    def to_json(self) -> dict[str, Any]:
        """The preset's manifest entry (without its tensor table, which is stored apart)."""
        d: dict[str, Any] = {"config": thaw(self.config), "macs": self.macs, "params": self.params}
        if self.bytes is not None:
            d["bytes"] = self.bytes
        d["metrics"] = dict(self.metrics)
        return d


@dataclass(frozen=True)
class StoredFile(Frozen):
    """A small file (a tokenizer's) carried as the uint8 tensor ``tensor`` of ``bytes`` bytes."""

    tensor: str
    bytes: int
    sha256: str


@dataclass(frozen=True)
class BiasCompensation(Frozen):
    """The stored tensors of bias compensation (:mod:`elasticize.calibration`; format 4), checked by
    :func:`elasticize.fileformat.measurements.check_compensation`.

    Attributes:
        means: consumer weight fqn -> stored name of its float32 ``(in,)`` calibration means.
        presets: preset -> bias fqn -> stored name of that preset's compensated bias.
    """

    means: Mapping[str, str] = field(default_factory=_empty)
    presets: Mapping[str, Mapping[str, str]] = field(default_factory=_empty)

    def __bool__(self) -> bool:
        return bool(self.means or self.presets)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "BiasCompensation":
        """The compensation of a checked ``bias_compensation`` object."""
        return cls(frozen_map(d.get("means", {})), frozen_map((p, frozen_map(t)) for p, t in d.get("presets", {}).items()))


@dataclass(frozen=True)
class Manifest(Frozen):
    """A checked manifest, migrated to the current format version.

    Attributes:
        format_version: the version the file was written in (1 to 4; see the file format page).
        library_version: the elasticize that wrote it.
        kind: ``"super-network"`` or ``"sub-network"``.
        recipe: how to build the base model (adapter, name, kwargs), frozen.
        plan: the typed :class:`~elasticize.plan.core.Plan`.
        search_space: the plan's choices per dimension, as written.
        input_shapes: the example inputs' shapes.
        importance: how the units were sorted (``order``, ``calibration_batches``), or None.
        aliases: tensor name -> the stored tensor it shares.
        presets: name -> :class:`Preset` (a super-network file).
        bn_stats: preset -> BatchNorm buffer fqn -> stored name of its calibrated statistic.
        files: file name -> :class:`StoredFile`.
        config: the sub-network's configuration (a sub-network file), else None.
        macs: its MACs per sample (a sub-network file), else None.
        params: its parameters (a sub-network file), else None.
        measurements: what ``elasticize eval`` measured, per device and batch size (format 4; checked by
            :func:`elasticize.fileformat.measurements.check_measurements`), frozen.
        bias_compensation: the stored tensors of bias compensation (:class:`BiasCompensation`; format 4).
        layout: the nested byte layout (format 4; checked by :func:`elasticize.fileformat.layout.check_layout`,
            which gives the reader's :class:`~elasticize.fileformat.layout.Layout`), frozen, or None.
    """

    format_version: int
    library_version: str
    kind: str
    recipe: Mapping[str, Any]
    plan: Plan
    search_space: Mapping[str, Any]
    input_shapes: tuple[tuple[int, ...], ...] = ()
    importance: Mapping[str, Any] | None = None
    aliases: Mapping[str, str] = field(default_factory=_empty)
    presets: Mapping[str, Preset] = field(default_factory=_empty)
    bn_stats: Mapping[str, Mapping[str, str]] = field(default_factory=_empty)
    files: Mapping[str, StoredFile] = field(default_factory=_empty)
    config: Mapping[str, Any] | None = None
    macs: int | None = None
    params: int | None = None
    measurements: Mapping[str, Any] = field(default_factory=_empty)
    bias_compensation: BiasCompensation = field(default_factory=BiasCompensation)
    layout: Mapping[str, Any] | None = None

    @property
    def is_sub_network(self) -> bool:
        """Whether the file holds one dense sub-network (not a super-network)."""
        return self.kind == "sub-network"

    @classmethod
    def from_json(cls, m: Mapping[str, Any], plan: Plan) -> "Manifest":
        """The manifest of checked, migrated JSON ``m`` whose plan is ``plan``."""
        return cls(
            format_version=m["format_version"], library_version=m["library_version"], kind=m["kind"],
            recipe=freeze(m["recipe"] or {}), plan=plan, search_space=freeze(m["search_space"]),
            input_shapes=tuple(tuple(s) for s in m.get("input_shapes", [])), importance=freeze(m.get("importance")),
            aliases=frozen_map(m.get("aliases", {})),
            presets=frozen_map((n, Preset(freeze(p["config"]), p["macs"], p["params"], p.get("bytes"),
                                          frozen_map(p.get("metrics", {}))))
                               for n, p in m.get("presets", {}).items()),
            bn_stats=frozen_map((p, frozen_map(t)) for p, t in m.get("bn_stats", {}).items()),
            files=frozen_map((n, StoredFile(e["tensor"], e["bytes"], e["sha256"])) for n, e in m.get("files", {}).items()),
            config=freeze(m.get("config")), macs=m.get("macs"), params=m.get("params"),
            measurements=freeze(m.get("measurements", {})),
            bias_compensation=BiasCompensation.from_json(m.get("bias_compensation", {})), layout=freeze(m.get("layout")))
