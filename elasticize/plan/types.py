"""The parts of a :class:`~elasticize.plan.core.Plan`, as frozen dataclasses.

Every part is immutable (``frozen=True``; sequences are tuples, mappings are read-only
``MappingProxyType`` views), built only from checked JSON (:func:`elasticize.plan.check.check_plan`)
or by :class:`elasticize.plan.builder.PlanBuilder`, and written back by its ``to_json()`` exactly
as the JSON it was read from or that elasticize wrote before the parts were typed: an optional
key is written only when it differs from its default, in the order the format lists it.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Iterable, Mapping

__all__ = ["Frozen", "Group", "Axis", "Segments", "AxisEntry", "axis_from_json", "Tensor", "Attr", "Stage", "SwitchableNorm",
           "MacTerm", "NotElastic", "frozen_map"]


class Frozen:
    """Base of the frozen records: immutable all the way down, so a copy (``copy.copy``, ``copy.deepcopy``, as of
    an :class:`~elasticize.elastic.ElasticModel` that holds a plan) is the record itself; their read-only
    ``MappingProxyType`` views could not be copied otherwise."""

    __slots__ = ()

    def __copy__(self) -> "Frozen":
        return self

    def __deepcopy__(self, memo: dict) -> "Frozen":
        return self


def frozen_map(items: Mapping[Any, Any] | Iterable[tuple[Any, Any]]) -> Mapping[Any, Any]:
    """A read-only mapping (``MappingProxyType``) of ``items``, keeping their order."""
    return MappingProxyType(dict(items))


@dataclass(frozen=True)
class Group(Frozen):
    """A coupling group: channels (or heads, or parallel modules) that are cut together.

    Attributes:
        name: the group's name.
        kind: ``"width"``, ``"heads"``, ``"modules"`` or ``"hidden"``.
        size: its full size in channels (heads: query rows; modules: parallel modules).
        unit: channels per unit (``head_dim`` for heads, channels per GroupNorm group).
        choices: the nested choices, largest first, in channels for width and hidden, in heads
            for heads, in modules for modules.
        step: units kept together (grouped-query attention: query heads per key/value head).
        constraint: why ``step`` is more than 1 (None: not written).
        sort: False when the group keeps its original order (not sorted by importance).
    """

    name: str
    kind: str
    size: int
    unit: int
    choices: tuple[int, ...]
    step: int = 1
    constraint: str | None = None
    sort: bool = True

    def to_json(self) -> dict[str, Any]:
        """The group's JSON object."""
        d: dict[str, Any] = {"name": self.name, "kind": self.kind, "size": self.size, "unit": self.unit,
                             "choices": list(self.choices)}
        if self.step != 1:
            d["step"] = self.step
        if self.constraint is not None:
            d["constraint"] = self.constraint
        if not self.sort:
            d["sort"] = False
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Group":
        """The group of a checked JSON object."""
        return cls(d["name"], d["kind"], d["size"], d["unit"], tuple(d["choices"]), d.get("step", 1),
                   d.get("constraint"), d.get("sort", True))


@dataclass(frozen=True)
class Axis(Frozen):
    """A tensor axis that follows a group: ``chunks`` equal chunks of ``size // div`` channels each
    (see :data:`elasticize.modules.TensorSpec`)."""

    group: str
    chunks: int = 1
    div: int = 1

    @property
    def groups(self) -> tuple[str, ...]:
        """``(group,)``: the groups the axis follows (as :attr:`Segments.groups`)."""
        return (self.group,)

    def to_json(self) -> list[Any]:
        """``[group, chunks]``, or ``[group, chunks, div]`` when ``div`` is not 1."""
        return [self.group, self.chunks] if self.div == 1 else [self.group, self.chunks, self.div]

    @classmethod
    def from_json(cls, e: list[Any]) -> "Axis":
        """The axis of a checked ``[group, chunks]`` or ``[group, chunks, div]`` entry."""
        return cls(e[0], int(e[1]), int(e[2]) if len(e) > 2 else 1)


@dataclass(frozen=True)
class Segments(Frozen):
    """A tensor axis (or attribute, or MAC factor) that is a concatenation of segments (the input channels
    of a layer that reads ``torch.cat([a, b, ...], 1)`` of different groups, DenseNet's and Inception's
    joins): a sub-network reads each segment's active prefix (:class:`elasticize.modules.SegmentState`).

    Attributes:
        parts: the segments in index order: an :class:`Axis` of a group, or an int: that many channels
            kept whole. At least one is an :class:`Axis`.
    """

    parts: tuple[Axis | int, ...]

    @property
    def groups(self) -> tuple[str, ...]:
        """The names of the groups the segments follow, in index order."""
        return tuple(p.group for p in self.parts if isinstance(p, Axis))

    def to_json(self) -> list[Any]:
        """``[[group, chunks(, div)] or channels, ...]``."""
        return [p if isinstance(p, int) else p.to_json() for p in self.parts]

    @classmethod
    def from_json(cls, e: list[Any]) -> "Segments":
        """The segments of a checked segmented entry."""
        return cls(tuple(s if isinstance(s, int) else Axis.from_json(s) for s in e))


#: A tensor axis entry: one group's :class:`Axis`, or :class:`Segments` of a concatenation.
AxisEntry = Axis | Segments


def axis_from_json(e: list[Any]) -> AxisEntry:
    """The :class:`Axis` of a checked ``[group, chunks(, div)]`` entry, or the :class:`Segments` of a
    checked segmented entry (a list whose first item is not a group name)."""
    return Axis.from_json(e) if isinstance(e[0], str) else Segments.from_json(e)


def _factor_json(f: "str | Segments") -> Any:
    return f if isinstance(f, str) else f.to_json()


def _factor_from_json(f: Any) -> "str | Segments":
    return f if isinstance(f, str) else Segments.from_json(f)


@dataclass(frozen=True)
class Tensor(Frozen):
    """A tensor of the model.

    Attributes:
        shape: its full shape.
        param: whether it is a parameter.
        axes: axis index -> :class:`Axis` (or :class:`Segments` for a concatenation), for its elastic
            axes (empty: not elastic).
        persistent: False for a non-persistent buffer that is sliced (timm BEiT's ``k_bias``): not
            in the file, the model builds it, a sub-network takes its slice of the built one.
    """

    shape: tuple[int, ...]
    param: bool
    axes: Mapping[int, AxisEntry]
    persistent: bool = True

    def to_json(self) -> dict[str, Any]:
        """The tensor's JSON object (axis keys as strings)."""
        d: dict[str, Any] = {"shape": list(self.shape), "param": self.param,
                             "axes": {str(ax): a.to_json() for ax, a in self.axes.items()}}
        if not self.persistent:
            d["persistent"] = False
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Tensor":
        """The tensor of a checked JSON object."""
        return cls(tuple(d["shape"]), d["param"], frozen_map((int(ax), axis_from_json(e)) for ax, e in d["axes"].items()),
                   d.get("persistent", True) is not False)


@dataclass(frozen=True)
class Attr(Frozen):
    """A module attribute that follows a group: its active size ``* mul // div`` (``kind`` ``"int"``,
    or ``"shape"`` for a 1-tuple such as ``normalized_shape``). ``group`` may be :class:`Segments`
    (a convolution's ``in_channels`` over a concatenation): the attribute follows their active sum."""

    group: str | Segments
    kind: str = "int"
    mul: int = 1
    div: int = 1

    def to_json(self) -> list[Any]:
        """``[group, kind, mul, div]``."""
        return [_factor_json(self.group), self.kind, self.mul, self.div]

    @classmethod
    def from_json(cls, e: list[Any]) -> "Attr":
        """The attribute of a checked ``[group, kind, mul, div]`` entry."""
        return cls(_factor_from_json(e[0]), e[1], int(e[2]), int(e[3]))


@dataclass(frozen=True)
class Stage(Frozen):
    """A depth stage: blocks that run or not, by the active depth.

    Attributes:
        name: the stage's name.
        blocks: the blocks' module paths (``<module>:l<k>`` for the stacked layers of one module).
        n_mandatory: leading blocks that always run.
        first_skippable: the first block that can be skipped (skippable depth).
        choices: the depths offered, largest first.
        order: the blocks' keep order, most kept first (None: a prefix, SortedNet); see :meth:`ranks`.
        drop: ``"identity"``: an extracted sub-network has ``nn.Identity`` for a dropped block;
            ``"remove"``: the block is deleted from its ``nn.ModuleList``.
        skip_tuple: the blocks return ``(hidden_states, None, ...)`` of that many items, and a
            skipped one returns its input in that shape (see :class:`elasticize.modules.GateMixin`).
        module: for the stacked layers inside one module (an ``nn.LSTM``'s ``num_layers``), its path.
        attr: that module's attribute that reads the active depth.
        tensors: per block, the fqns of that layer's tensors (an extracted sub-network deletes the
            dropped layers' tensors, see :meth:`elasticize.rules.Rule.densify`).
        outputs: for a dense stage (:mod:`elasticize.graph.dense`), per block the groups whose segments its
            skip removes from every concatenation that reads them (None: not a dense stage); see
            :meth:`output_of`.
        skip_empty: a skipped block returns its first input cut to 0 channels along axis 1 (a dense layer,
            whose output is only concatenated), not its input; written as ``"skip_empty": 1``.
    """

    name: str
    blocks: tuple[str, ...]
    n_mandatory: int
    first_skippable: int
    choices: tuple[int, ...]
    order: tuple[int, ...] | None = None
    drop: str = "identity"
    skip_tuple: int | None = None
    module: str | None = None
    attr: str | None = None
    tensors: tuple[tuple[str, ...], ...] | None = None
    outputs: tuple[tuple[str, ...], ...] | None = None
    skip_empty: bool = False

    def output_of(self) -> dict[str, int]:
        """Group -> rank of the block whose output it is (:attr:`outputs`; empty for a stage that is not dense):
        at depth ``d`` the group's segments have 0 channels iff ``rank >= d``."""
        return {g: r for gs, r in zip(self.outputs or (), self.ranks()) for g in gs}

    def ranks(self) -> list[int]:
        """Rank of each block in the keep order: block ``i`` runs at depth ``d`` iff ``rank[i] < d``."""
        order = self.order or range(len(self.blocks))
        rank = [0] * len(self.blocks)
        for r, i in enumerate(order):
            rank[i] = r
        return rank

    def to_json(self) -> dict[str, Any]:
        """The stage's JSON object."""
        d: dict[str, Any] = {"name": self.name, "blocks": list(self.blocks), "n_mandatory": self.n_mandatory,
                             "first_skippable": self.first_skippable, "choices": list(self.choices)}
        if self.order is not None:
            d["order"] = list(self.order)
        if self.module is not None:
            d.update(module=self.module, attr=self.attr, tensors=[list(t) for t in self.tensors or ()])
        if self.skip_tuple is not None:
            d["skip_tuple"] = self.skip_tuple
        if self.drop != "identity":
            d["drop"] = self.drop
        if self.outputs is not None:
            d["outputs"] = [list(gs) for gs in self.outputs]
        if self.skip_empty:
            d["skip_empty"] = 1
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Stage":
        """The stage of a checked JSON object."""
        order, tensors, outputs = d.get("order"), d.get("tensors"), d.get("outputs")
        return cls(d["name"], tuple(d["blocks"]), d["n_mandatory"], d["first_skippable"], tuple(d["choices"]),
                   None if order is None else tuple(order), d.get("drop", "identity"), d.get("skip_tuple"),
                   d.get("module"), d.get("attr"), None if tensors is None else tuple(tuple(t) for t in tensors),
                   None if outputs is None else tuple(tuple(gs) for gs in outputs), d.get("skip_empty", 0) == 1)


@dataclass(frozen=True)
class SwitchableNorm(Frozen):
    """A skip-aware norm (Adaptive Depth Networks, arXiv 2312.16392, Section 3): a second set of its
    ``tensors`` (names such as ``"weight"``), used while ``stage``'s skippable blocks are skipped."""

    stage: str
    tensors: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        """``{"stage", "tensors"}``."""
        return {"stage": self.stage, "tensors": list(self.tensors)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "SwitchableNorm":
        """The norm of a checked JSON object."""
        return cls(d["stage"], tuple(d["tensors"]))


@dataclass(frozen=True)
class MacTerm(Frozen):
    """``macs`` multiply-accumulates per sample of ``owner`` at full size, scaled at a sub-network by
    the active fraction of each factor in ``factors``: a group's name, or :class:`Segments` (their active
    channels over their full size)."""

    owner: str
    macs: int | float
    factors: tuple[str | Segments, ...]

    def to_json(self) -> list[Any]:
        """``[owner, macs, [factor, ...]]``."""
        return [self.owner, self.macs, [_factor_json(f) for f in self.factors]]

    @classmethod
    def from_json(cls, e: list[Any]) -> "MacTerm":
        """The term of a checked ``[owner, macs, [factor, ...]]`` entry."""
        return cls(e[0], e[1], tuple(_factor_from_json(f) for f in e[2]))


@dataclass(frozen=True)
class NotElastic(Frozen):
    """Something that stayed fixed (a module, group or stage), and why."""

    where: str
    why: str

    def __iter__(self):
        """``where, why``: a pair, so ``dict(plan.not_elastic)`` maps each place to its reason."""
        return iter((self.where, self.why))

    def to_json(self) -> list[str]:
        """``[where, why]``."""
        return [self.where, self.why]

    @classmethod
    def from_json(cls, e: list[Any]) -> "NotElastic":
        """The entry of a checked ``[where, why]`` pair."""
        return cls(e[0], e[1])
