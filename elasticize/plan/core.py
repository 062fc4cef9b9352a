"""The plan: a JSON-native record of what is elastic, replayed to rebuild an elastic model.

``Analysis -> Plan`` (:mod:`elasticize.plan.build`; every plan is written by
:class:`elasticize.plan.builder.PlanBuilder`) chooses the dimensions and their nested choices;
:func:`elasticize.plan.apply.apply_plan` performs the surgery on a model (the converted
one, or a freshly built base model when a checkpoint is loaded), so conversion and loading share
one code path. A plan read from a file is checked first (:mod:`elasticize.plan.check`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .check import check_plan

__all__ = ["Plan", "PLAN_VERSION", "DIMENSIONS", "KIND_DIM", "NORM_TENSORS", "NORM_SITES", "axis_entry", "is_segmented",
           "segment_entries", "entry_groups", "stage_ranks", "stage_outputs"]

PLAN_VERSION = 1
#: The elastic dimensions elasticize knows. ``"hidden"`` (a transformer's residual-stream
#: width) is opt-in and offered by the transformers adapter; its group sits in the width table.
DIMENSIONS = ("width", "heads", "depth", "modules", "hidden")
#: group kind -> the dimension (search-space table) it belongs to
KIND_DIM = {"width": "width", "heads": "heads", "modules": "modules", "hidden": "width"}
NORM_TENSORS = ("weight", "bias", "running_mean", "running_var")
NORM_SITES = ("batchnorm", "layernorm", "groupnorm", "rmsnorm")


def axis_entry(entry: list[Any]) -> tuple[str, int, int]:
    """``(group, chunks, div)`` of a plan tensor-axis entry ``[group, chunks]`` or ``[group, chunks, div]``."""
    return entry[0], int(entry[1]), int(entry[2]) if len(entry) > 2 else 1


def is_segmented(entry: Any) -> bool:
    """Whether a plan tensor-axis (or attribute, or MAC factor) entry is a list of segments: the axis is a
    concatenation of groups (``[[group, chunks], 24, [group, chunks, div], ...]``)."""
    return isinstance(entry, list) and bool(entry) and not isinstance(entry[0], str)


def segment_entries(entry: list[Any]) -> list[tuple[str, int, int] | int]:
    """The segments of a segmented entry, in index order: ``(group, chunks, div)`` for a segment that
    follows a group (:func:`axis_entry`), or an int: that many channels kept whole."""
    return [s if isinstance(s, int) else axis_entry(s) for s in entry]


def entry_groups(entry: Any) -> list[str]:
    """The group names a tensor-axis entry (plain or segmented) or a MAC factor follows."""
    if isinstance(entry, str):
        return [entry]
    if is_segmented(entry):
        return [s[0] for s in segment_entries(entry) if not isinstance(s, int)]
    return [entry[0]]


def stage_ranks(stage: dict[str, Any]) -> list[int]:
    """Rank of each block of a plan stage in its keep order: block ``i`` runs at depth ``d`` iff ``rank[i] < d``.

    Without an ``order`` the stage keeps a prefix (SortedNet); with one (e.g. evenly spread
    layer dropping) ``order`` lists the block indices from the most to the least kept.
    """
    order = stage.get("order") or list(range(len(stage["blocks"])))
    rank = [0] * len(order)
    for r, i in enumerate(order):
        rank[i] = r
    return rank


def stage_outputs(stages: list[dict[str, Any]]) -> dict[str, tuple[str, int]]:
    """Group -> ``(stage, rank)`` of the dense-stage block whose output it is: at stage depth ``d`` the group's
    segments are read at its active width while ``rank < d`` and at 0 channels otherwise (a skipped dense
    layer's segment leaves every concatenation; see :mod:`elasticize.graph.dense`)."""
    out: dict[str, tuple[str, int]] = {}
    for st in stages:
        for gs, r in zip(st.get("outputs") or (), stage_ranks(st)):
            out.update(dict.fromkeys(gs, (st["name"], r)))
    return out


@dataclass
class Plan:
    """Everything needed to make a base model elastic again, as JSON-native values.

    Attributes:
        version: plan format version.
        tracer: ``"fx"`` or ``"export"``.
        dims: the elastic dimensions in use (subset of ``("width", "heads", "depth", "modules")``).
        depth_mode: ``"prefix"`` (SortedNet) or ``"skippable"`` (Adaptive Depth Networks).
        groups: one dict per coupling group: ``name, kind, size, unit, choices`` (choices in
            channels for width, in heads for heads, in parallel modules for modules, largest first).
        tensors: tensor fqn -> ``{"shape", "param", "axes": {axis: [group, chunks] or [group, chunks, div]}}``
            (``div``: see :data:`elasticize.modules.TensorSpec`); an axis that is a concatenation of
            groups holds a list of segments instead (:func:`segment_entries`: each ``[group, chunks]``,
            ``[group, chunks, div]`` or an int of channels kept whole), of which a sub-network reads
            each segment's active prefix; plus ``"persistent": false`` for a
            non-persistent buffer that is sliced (timm BEiT's ``k_bias``): not in the file, the model
            builds it, a sub-network takes its slice of the built one.
        attrs: module path -> attribute -> ``[group, kind, mul, div]`` (the group may be a list of
            segments, as a tensor axis: the attribute follows their active sum).
        sites: module path -> rule name, for every module a rule handled.
        stages: one dict per stage: ``name, blocks, n_mandatory, first_skippable, choices``, and
            optionally ``order`` (keep order of the blocks, see :func:`stage_ranks`) and
            ``drop`` (``"identity"``, the default: an extracted sub-network has ``nn.Identity`` for a
            dropped block; ``"remove"``: the block is deleted from its ``nn.ModuleList``), and
            ``skip_tuple`` (blocks that return ``(hidden_states, None, ...)`` of that many items: a
            skipped one returns its input in that shape, see :class:`elasticize.modules.GateMixin`). A dense
            stage (:mod:`elasticize.graph.dense`) has ``outputs`` (per block, the groups whose segments its skip
            removes from every concatenation, :func:`stage_outputs`) and, for dense layers, ``skip_empty: 1``
            (a skipped layer returns its first input cut to 0 channels). A stage of
            the stacked layers inside one module (an ``nn.LSTM``'s ``num_layers``, prefix depth) has
            ``module`` (its path), ``attr`` (its attribute that reads the active depth) and
            ``tensors`` (per block, the fqns of that layer's tensors); its blocks are the names
            ``<module>:l<k>``, and an extracted sub-network keeps the module with the dropped
            layers' tensors deleted (see :meth:`elasticize.rules.Rule.densify`).
        switchable: module path -> ``{"stage", "tensors"}`` for skip-aware norms.
        mac_terms: ``[owner, macs per sample, [factor, ...]]``, each factor a group or a list of
            segments (scaled by the active channels of the segments over their full size).
        not_elastic: ``[where, reason]`` for everything that stayed fixed.
    """

    version: int = PLAN_VERSION
    tracer: str = "fx"
    dims: list[str] = field(default_factory=lambda: list(DIMENSIONS))
    depth_mode: str = "prefix"
    groups: list[dict[str, Any]] = field(default_factory=list)
    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)
    attrs: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    sites: dict[str, str] = field(default_factory=dict)
    stages: list[dict[str, Any]] = field(default_factory=list)
    switchable: dict[str, dict[str, Any]] = field(default_factory=dict)
    mac_terms: list[list[Any]] = field(default_factory=list)
    not_elastic: list[list[str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The plan as a JSON-native dict."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Plan":
        """Rebuild a plan from its JSON, checked strictly first (:func:`elasticize.plan.check.check_plan`).

        Raises:
            ValueError: (:class:`elasticize.plan.parse.ManifestError`) a plan written by a newer format
                version, or one with a missing, unknown, mistyped or inconsistent key (named).
        """
        check_plan(data, version=PLAN_VERSION, kind_dim=KIND_DIM, dimensions=DIMENSIONS, norm_tensors=NORM_TENSORS)
        return cls(**{k: v for k, v in data.items() if k in {f.name for f in fields(cls)}})

    def group(self, name: str) -> dict[str, Any]:
        """The group dict called ``name``.

        Raises:
            KeyError: if there is none; the message lists the group names.
        """
        for g in self.groups:
            if g["name"] == name:
                return g
        raise KeyError(f"no group {name!r}; groups: {[g['name'] for g in self.groups]}")
