"""The plan: a JSON-native record of what is elastic, replayed to rebuild an elastic model.

``Analysis -> Plan`` (:mod:`elasticize.plan.build`; every plan is written by
:class:`elasticize.plan.builder.PlanBuilder`) chooses the dimensions and their nested choices;
:func:`elasticize.plan.apply.apply_plan` performs the surgery on a model (the converted
one, or a freshly built base model when a checkpoint is loaded), so conversion and loading share
one code path. A plan read from a file is checked first (:mod:`elasticize.plan.check`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from .check import check_plan
from .migrate import PLAN_FORMAT
from .types import (Attr, Axis, Frozen, Group, MacTerm, NotElastic, Segments, Stage, SwitchableNorm, Tensor,
                    frozen_map)

__all__ = ["Plan", "PLAN_VERSION", "DIMENSIONS", "KIND_DIM", "NORM_TENSORS", "NORM_SITES", "axis_entry", "is_segmented",
           "segment_entries", "entry_groups", "stage_ranks", "stage_outputs"]

#: The plan format version this elasticize writes (older ones migrate on read, see
#: :data:`elasticize.plan.migrate.PLAN_FORMAT`).
PLAN_VERSION = PLAN_FORMAT.current
#: The elastic dimensions elasticize knows. ``"hidden"`` (a transformer's residual-stream
#: width) is opt-in and offered by the transformers adapter; its group sits in the width table.
DIMENSIONS = ("width", "heads", "depth", "modules", "hidden")
#: group kind -> the dimension (search-space table) it belongs to
KIND_DIM = {"width": "width", "heads": "heads", "modules": "modules", "hidden": "width"}
NORM_TENSORS = ("weight", "bias", "running_mean", "running_var")
NORM_SITES = ("batchnorm", "layernorm", "groupnorm", "rmsnorm")


def axis_entry(entry: list[Any]) -> tuple[str, int, int]:
    """``(group, chunks, div)`` of a raw JSON tensor-axis entry ``[group, chunks]`` or ``[group, chunks, div]``
    (a typed plan has :class:`~elasticize.plan.types.Axis`)."""
    return entry[0], int(entry[1]), int(entry[2]) if len(entry) > 2 else 1


def is_segmented(entry: Any) -> bool:
    """Whether a tensor-axis (or attribute, or MAC factor) entry is a list of segments: the axis is a
    concatenation of groups (typed: :class:`~elasticize.plan.types.Segments`; raw JSON:
    ``[[group, chunks], 24, [group, chunks, div], ...]``)."""
    return isinstance(entry, Segments) or (isinstance(entry, list) and bool(entry) and not isinstance(entry[0], str))


def segment_entries(entry: list[Any]) -> list[tuple[str, int, int] | int]:
    """The segments of a raw segmented JSON entry, in index order: ``(group, chunks, div)`` for a segment that
    follows a group (:func:`axis_entry`), or an int: that many channels kept whole (a typed plan has
    :attr:`Segments.parts <elasticize.plan.types.Segments.parts>`)."""
    return [s if isinstance(s, int) else axis_entry(s) for s in entry]


def entry_groups(entry: Any) -> list[str]:
    """The group names a tensor-axis entry (an :class:`~elasticize.plan.types.Axis` or
    :class:`~elasticize.plan.types.Segments`, or their raw JSON) or a MAC factor follows."""
    if isinstance(entry, str):
        return [entry]
    if isinstance(entry, (Axis, Segments)):
        return list(entry.groups)
    if is_segmented(entry):
        return [s[0] for s in segment_entries(entry) if not isinstance(s, int)]
    return [entry[0]]


def stage_ranks(stage: Stage) -> list[int]:
    """Rank of each block of a plan stage in its keep order (:meth:`elasticize.plan.types.Stage.ranks`)."""
    return stage.ranks()


def stage_outputs(stages: Iterable[Stage]) -> dict[str, tuple[str, int]]:
    """Group -> ``(stage, rank)`` of the dense-stage block whose output it is
    (:meth:`elasticize.plan.types.Stage.output_of` over all stages): at stage depth ``d`` the group's segments are
    read at its active width while ``rank < d`` and at 0 channels otherwise (a skipped dense layer's segment leaves
    every concatenation; see :mod:`elasticize.graph.dense`)."""
    out: dict[str, tuple[str, int]] = {}
    for st in stages:
        out.update((g, (st.name, r)) for g, r in st.output_of().items())
    return out



def _named(items: tuple[Any, ...], name: str, what: str) -> Any:
    """The item of ``items`` whose ``.name`` is ``name``; KeyError listing the names otherwise."""
    for item in items:
        if item.name == name:
            return item
    raise KeyError(f"no {what} {name!r}; {what}s: {[item.name for item in items]}")

@dataclass(frozen=True)
class Plan(Frozen):
    """Everything needed to make a base model elastic again; frozen, built by
    :class:`~elasticize.plan.builder.PlanBuilder` or from checked JSON (:meth:`from_json`).

    Attributes:
        version: plan format version.
        tracer: ``"fx"``, ``"export"`` or ``"structure"``.
        dims: the elastic dimensions in use (subset of :data:`DIMENSIONS`).
        depth_mode: ``"prefix"`` (SortedNet), ``"spaced"`` or ``"skippable"`` (Adaptive Depth Networks).
        groups: the coupling groups (:class:`~elasticize.plan.types.Group`), in the order they were added;
            :meth:`group` finds one by name.
        tensors: tensor fqn -> :class:`~elasticize.plan.types.Tensor` (its shape and elastic axes; an axis
            that is a concatenation of groups has :class:`~elasticize.plan.types.Segments`).
        attrs: module path -> attribute -> :class:`~elasticize.plan.types.Attr` (its group may be
            :class:`~elasticize.plan.types.Segments`: the attribute follows their active sum).
        sites: module path -> rule name, for every module a rule handled.
        stages: the depth stages (:class:`~elasticize.plan.types.Stage`); :meth:`stage` finds one by name.
        switchable: module path -> :class:`~elasticize.plan.types.SwitchableNorm` for skip-aware norms.
        mac_terms: the MAC terms (:class:`~elasticize.plan.types.MacTerm`; a factor may be
            :class:`~elasticize.plan.types.Segments`).
        not_elastic: everything that stayed fixed, and why (:class:`~elasticize.plan.types.NotElastic`).
    """

    version: int = PLAN_VERSION
    tracer: str = "fx"
    dims: tuple[str, ...] = DIMENSIONS
    depth_mode: str = "prefix"
    groups: tuple[Group, ...] = ()
    tensors: Mapping[str, Tensor] = field(default_factory=lambda: frozen_map({}))
    attrs: Mapping[str, Mapping[str, Attr]] = field(default_factory=lambda: frozen_map({}))
    sites: Mapping[str, str] = field(default_factory=lambda: frozen_map({}))
    stages: tuple[Stage, ...] = ()
    switchable: Mapping[str, SwitchableNorm] = field(default_factory=lambda: frozen_map({}))
    mac_terms: tuple[MacTerm, ...] = ()
    not_elastic: tuple[NotElastic, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The plan as a JSON-native dict, exactly as the file format writes it."""
        return {"version": self.version, "tracer": self.tracer, "dims": list(self.dims), "depth_mode": self.depth_mode,
                "groups": [g.to_json() for g in self.groups],
                "tensors": {fqn: t.to_json() for fqn, t in self.tensors.items()},
                "attrs": {m: {k: a.to_json() for k, a in attrs.items()} for m, attrs in self.attrs.items()},
                "sites": dict(self.sites), "stages": [s.to_json() for s in self.stages],
                "switchable": {m: sw.to_json() for m, sw in self.switchable.items()},
                "mac_terms": [t.to_json() for t in self.mac_terms],
                "not_elastic": [n.to_json() for n in self.not_elastic]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Plan":
        """Rebuild a plan from its JSON: checked strictly first (:func:`elasticize.plan.check.check_plan`),
        migrated from an older plan version (:data:`elasticize.plan.migrate.PLAN_FORMAT`), then typed.

        Raises:
            ValueError: (:class:`elasticize.plan.parse.ManifestError`) a plan written by a newer format
                version, or one with a missing, unknown, mistyped or inconsistent key (named).
        """
        check_plan(data, version=PLAN_VERSION, kind_dim=KIND_DIM, dimensions=DIMENSIONS, norm_tensors=NORM_TENSORS)
        d = PLAN_FORMAT.migrate(data, data["version"])
        return cls(version=d["version"], tracer=d.get("tracer", "fx"), dims=tuple(d.get("dims", DIMENSIONS)),
                   depth_mode=d.get("depth_mode", "prefix"), groups=tuple(Group.from_json(g) for g in d["groups"]),
                   tensors=frozen_map((f, Tensor.from_json(t)) for f, t in d["tensors"].items()),
                   attrs=frozen_map((m, frozen_map((k, Attr.from_json(e)) for k, e in a.items()))
                                    for m, a in d.get("attrs", {}).items()),
                   sites=frozen_map(d.get("sites", {})), stages=tuple(Stage.from_json(s) for s in d.get("stages", [])),
                   switchable=frozen_map((m, SwitchableNorm.from_json(sw)) for m, sw in d.get("switchable", {}).items()),
                   mac_terms=tuple(MacTerm.from_json(t) for t in d.get("mac_terms", [])),
                   not_elastic=tuple(NotElastic.from_json(n) for n in d.get("not_elastic", [])))

    def group(self, name: str) -> Group:
        """The group called ``name``.

        Raises:
            KeyError: if there is none; the message lists the group names.
        """
        return _named(self.groups, name, "group")

    def stage(self, name: str) -> Stage:
        """The stage called ``name``.

        Raises:
            KeyError: if there is none; the message lists the stage names.
        """
        return _named(self.stages, name, "stage")

    def noted(self, where: str, why: str) -> "Plan":
        """A copy of the plan with ``(where, why)`` added to :attr:`not_elastic`."""
        return dataclasses.replace(self, not_elastic=self.not_elastic + (NotElastic(where, why),))
