"""Elastic modules: the original modules, with sliced views of their own parameters.

Surgery never rebuilds a layer. Each module that owns an elastic tensor is given a
dynamic subclass of its own class (``module.__class__ = Elastic<Name>``), so
``isinstance`` still holds, the parameters stay the same ``nn.Parameter`` objects
under the same names, and the module's own ``forward`` still runs. Two hooks do
the work:

* ``__getattr__`` returns, for an elastic tensor, a prefix view of it along each
  elastic axis (``narrow``, no copy); a chunked axis such as the fused q/k/v rows
  of an attention projection keeps the same prefix in each chunk.
* class-level properties shadow the plain attributes that a forward reads
  (``groups`` of a depthwise convolution, ``normalized_shape``, ``num_heads``),
  computing them from the active sub-network.

The active sub-network lives in shared :class:`GroupState` and :class:`StageState`
objects, so switching sub-networks sets a few integers and never touches a weight
(SortedNet, arXiv 2309.00255, Section 3: nested sub-networks share the super-network's
parameters). Residual blocks get a gate that returns the block input when the block
is skipped (SortedNet depth; Adaptive Depth Networks, arXiv 2312.16392, Section 3.1).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

__all__ = [
    "GroupState",
    "SegmentState",
    "StageState",
    "TensorSpec",
    "make_elastic",
    "restore",
    "is_elastic",
    "SWITCH_PREFIX",
    "axis_ranges",
    "segment_ranges",
    "cut_axis",
    "prefix_view",
]

#: Prefix of every tensor elasticize adds to a model (switchable norms).
SWITCH_PREFIX = "elastic_skip_"


class GroupState:
    """Active size of one coupling group (width or heads), shared by its members.

    Attributes:
        name: the group's name in the plan.
        size: full size in channels.
        unit: granularity in channels (1 for width, ``head_dim`` for heads).
        active: active size in channels, a multiple of ``unit``.
    """

    __slots__ = ("name", "size", "unit", "active")

    def __init__(self, name: str, size: int, unit: int = 1) -> None:
        self.name = name
        self.size = size
        self.unit = unit
        self.active = size

    def __repr__(self) -> str:
        return f"GroupState({self.name!r}, active={self.active}/{self.size})"


class SegmentState:
    """Active size of an axis that is a concatenation of segments (the input channels of a layer that
    reads ``torch.cat([a, b, ...], 1)`` of different groups, DenseNet's and Inception's joins).

    Each segment is ``(group, chunks, div)`` (the group's active prefix in each chunk, as
    :func:`axis_ranges`) or an int: that many channels kept whole. It stands in for a
    :class:`GroupState` in a :data:`TensorSpec` (with ``chunks = div = 1``) and in an attribute
    that follows the axis (a convolution's ``in_channels``: the sum of the active segments).

    Attributes:
        parts: the segments, in index order.
    """

    __slots__ = ("parts", "size")

    def __init__(self, parts: list[tuple[GroupState, int, int] | int]) -> None:
        self.parts = tuple(parts)
        self.size = sum(p if isinstance(p, int) else p[1] * (p[0].size // p[2]) for p in self.parts)

    @property
    def active(self) -> int:
        """Active channels along the axis: each segment's active prefix, summed."""
        return sum(p if isinstance(p, int) else p[1] * (p[0].active // p[2]) for p in self.parts)

    def ranges(self) -> tuple[tuple[int, int], ...]:
        """The ``[start, stop)`` ranges the active sub-network uses (:func:`segment_ranges`)."""
        return segment_ranges(tuple(p if isinstance(p, int) else (p[0].size, p[0].active, p[1], p[2])
                                    for p in self.parts))

    def __repr__(self) -> str:
        return f"SegmentState(active={self.active}/{self.size}, {len(self.parts)} segments)"


class StageState:
    """Active depth of one stage of residual blocks.

    ``depth`` is the number of blocks kept from the start of the stage (SortedNet
    prefix depth; with Adaptive Depth Networks' skippable sub-paths it is either the
    whole stage or its mandatory part). ``skip`` is True when any block is dropped;
    switchable norms read their second set of tensors then.
    """

    __slots__ = ("name", "size", "depth", "skip", "first_skippable")

    def __init__(self, name: str, size: int, first_skippable: int) -> None:
        self.name = name
        self.size = size
        self.depth = size
        self.skip = False
        self.first_skippable = first_skippable

    def set(self, depth: int) -> None:
        """Keep the first ``depth`` blocks."""
        self.depth = depth
        self.skip = depth < self.size


#: One elastic axis of a tensor: (axis, group state, number of chunks along it, divisor).
#: Each chunk holds ``group.size // div`` entries of which the first ``group.active // div``
#: are used; ``div > 1`` serves the key/value projections of grouped-query attention,
#: whose rows are ``1 / (query heads per key/value head)`` of the query rows. A segmented axis
#: (a concatenation of groups) has a :class:`SegmentState` in place of the group, ``chunks = div = 1``.
TensorSpec = tuple[tuple[int, "GroupState | SegmentState", int, int], ...]


@functools.lru_cache(maxsize=4096)
def axis_ranges(size: int, active: int, chunks: int = 1, div: int = 1) -> tuple[tuple[int, int], ...]:
    """The ``[start, stop)`` ranges of one elastic axis that the active sub-network uses.

    The one place this arithmetic lives: the forward's sliced views (:func:`prefix_view`), the
    per-tensor ranges of extraction, of the manifest's per-preset tables and of
    :func:`elasticize.load_subnet` (:func:`elasticize.plan.tensor_ranges`) all come from it.
    The axis holds ``chunks`` equal chunks (e.g. the fused q/k/v rows of an attention
    projection) of ``size // div`` entries each, of which each keeps its first ``active // div``.

    Args:
        size: the group's full size in channels.
        active: its active size in channels.
        chunks: chunks along the axis.
        div: divisor of the group's size along this axis (grouped-query attention's key/value rows).

    Returns:
        One ``(start, stop)`` per chunk, in index order.
    """
    period, keep = size // div, active // div
    return tuple((k * period, k * period + keep) for k in range(chunks))


@functools.lru_cache(maxsize=4096)
def segment_ranges(parts: tuple[tuple[int, int, int, int] | int, ...]) -> tuple[tuple[int, int], ...]:
    """The ``[start, stop)`` ranges of a segmented axis that the active sub-network uses.

    Args:
        parts: per segment, ``(size, active, chunks, div)`` of its group (its ranges are
            :func:`axis_ranges` of them, offset by the segments before it), or an int: a
            segment of that many channels, used whole.

    Returns:
        The ranges in index order, adjacent ones merged.
    """
    out: list[tuple[int, int]] = []
    offset = 0
    for p in parts:
        if isinstance(p, int):
            rs, span = ((0, p),), p
        else:
            rs, span = axis_ranges(*p), p[2] * (p[0] // p[3])
        for a, b in rs:
            if b <= a:
                continue
            if out and out[-1][1] == offset + a:
                out[-1] = (out[-1][0], offset + b)
            else:
                out.append((offset + a, offset + b))
        offset += span
    return tuple(out) or ((0, 0),)


def cut_axis(t: torch.Tensor, axis: int, ranges: tuple[tuple[int, int], ...] | list[tuple[int, int]]) -> torch.Tensor:
    """``t`` restricted to ``ranges`` along ``axis``: a view (``narrow``) for one range, else the
    ranges concatenated in order (a copy)."""
    if len(ranges) == 1:
        a, b = ranges[0]
        return t.narrow(axis, a, b - a)
    return torch.cat([t.narrow(axis, a, b - a) for a, b in ranges], dim=axis)


def prefix_view(t: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    """``t`` as the active sub-network reads it: each elastic axis of ``spec`` cut to its
    :func:`axis_ranges` (a view without copy, unless an axis has several chunks).

    Runs on every read of an elastic tensor in a forward: a full-size axis costs one comparison,
    a cut one a cached :func:`axis_ranges` lookup and a ``narrow``.
    """
    for axis, g, chunks, div in spec:
        if g.active != g.size:
            ranges = g.ranges() if type(g) is SegmentState else axis_ranges(g.size, g.active, chunks, div)
            if len(ranges) == 1:
                start, stop = ranges[0]
                t = t.narrow(axis, start, stop - start)
            else:
                t = cut_axis(t, axis, ranges)
    return t


class ElasticMixin:
    """Slicing behaviour added in front of the module's own class."""

    def __getattr__(self, name: str) -> Any:
        d = self.__dict__
        spec = d["_el_tensors"].get(name)
        if spec is None:
            return super().__getattr__(name)  # type: ignore[misc]
        switch = d["_el_switch"]
        if switch is not None and name in switch[1] and switch[0].skip:
            t = super().__getattr__(SWITCH_PREFIX + name)  # type: ignore[misc]
        else:
            t = super().__getattr__(name)  # type: ignore[misc]
        if t is None:
            return None
        return prefix_view(t, spec)

    def extra_repr(self) -> str:
        """The module's own description at the active sub-network's sizes (``Conv2d(64, 96, ...)``
        reads its sizes from ``__dict__``, which holds the full ones)."""
        d = self.__dict__
        full = {name: d[name] for name in d["_el_attrs"] if name in d}
        try:
            for name in full:
                d[name] = getattr(self, name)
            return super().extra_repr()  # type: ignore[misc]
        finally:
            d.update(full)


class GateMixin:
    """Skips a residual block: returns its input unchanged when the block is off (as the first
    of ``arity`` outputs, the rest None, for a block that returns a tuple such as
    ``(hidden_states, attention_weights)``)."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        stage, index, arity = self.__dict__["_el_gate"]
        if index >= stage.depth:  # index is the block's rank in the stage's keep order
            x = args[0] if args else next(iter(kwargs.values()))
            return (x,) + (None,) * (arity - 1) if arity else x
        return super().forward(*args, **kwargs)  # type: ignore[misc]

    def __repr__(self) -> str:
        """One line for a block its stage skips at the active sub-network, else the module's own repr."""
        stage, index, _ = self.__dict__["_el_gate"]
        if index >= stage.depth:
            return f"{self._get_name()}(skipped)"  # type: ignore[attr-defined]
        return super().__repr__()


def _attr_property(name: str) -> property:
    def get(self: nn.Module) -> Any:
        d = self.__dict__
        spec = d["_el_attrs"].get(name)
        if spec is None:
            return d[name]
        g, kind, mul, div = spec
        n = (g.depth if kind == "depth" else g.active) * mul // div
        return (n,) if kind == "shape" else n

    def set_(self: nn.Module, value: Any) -> None:
        self.__dict__[name] = value

    return property(get, set_)


_CLASS_CACHE: dict[tuple, type] = {}


def _elastic_class(base: type, attrs: tuple[str, ...], gate: bool, extra: tuple[type, ...]) -> type:
    key = (base, attrs, gate, extra)
    cls = _CLASS_CACHE.get(key)
    if cls is None:
        bases = (*extra, *((GateMixin,) if gate else ()), ElasticMixin, base)
        ns = {name: _attr_property(name) for name in attrs}
        ns["_el_base"] = base
        ns["__module__"] = base.__module__
        cls = type(f"Elastic{base.__name__}", bases, ns)
        _CLASS_CACHE[key] = cls
    return cls


def is_elastic(module: nn.Module) -> bool:
    """Whether ``module`` was given an elastic class by :func:`make_elastic`."""
    return isinstance(module, ElasticMixin)


def make_elastic(
    module: nn.Module,
    *,
    tensors: dict[str, TensorSpec] | None = None,
    attrs: dict[str, tuple[GroupState | StageState, str, int, int]] | None = None,
    gate: tuple[StageState, int] | tuple[StageState, int, int] | None = None,
    switch: tuple[StageState, tuple[str, ...]] | None = None,
    mixins: tuple[type, ...] = (),
) -> nn.Module:
    """Give ``module`` elastic behaviour in place; parameters are neither copied nor renamed.

    Args:
        module: the module to change; its class becomes a dynamic subclass of its class.
        tensors: parameter or buffer name -> elastic axes (axis, group, chunks, div); an empty
            tuple for a tensor that is only switchable.
        attrs: plain attribute name -> (group, kind, mul, div); kind ``"int"`` gives
            ``active * mul // div``, ``"shape"`` gives ``(active * mul // div,)``; kind ``"depth"``
            takes a :class:`StageState` instead of the group and gives ``depth * mul // div``
            (an ``nn.LSTM``'s ``num_layers`` following its layer stage).
        gate: (stage, rank) for a residual block that the stage's depth may skip: the block runs
            while ``rank < stage.depth`` (rank = position in the stage's keep order); (stage,
            rank, arity) for a block that returns a tuple: a skipped one returns its input as the
            first of ``arity`` outputs, the rest None.
        switch: (stage, names) for switchable norms: when the stage's skippable
            sub-path is skipped, ``names`` are read from ``elastic_skip_<name>``
            (Adaptive Depth Networks, arXiv 2312.16392, skip-aware BatchNorm).
        mixins: extra classes placed in front, for rules that need their own forward.

    Returns:
        The same module object.

    Raises:
        TypeError: if ``module`` is already elastic.
    """
    if is_elastic(module):
        raise TypeError(f"{type(module).__name__} is already elastic; call restore() first")
    d = module.__dict__
    d["_el_tensors"] = dict(tensors or {})
    d["_el_attrs"] = dict(attrs or {})
    d["_el_switch"] = switch
    if gate is not None:
        d["_el_gate"] = (*gate, 0) if len(gate) == 2 else tuple(gate)
    module.__class__ = _elastic_class(type(module), tuple(sorted(d["_el_attrs"])), gate is not None, mixins)
    return module


def restore(module: nn.Module, *, freeze_attrs: bool) -> nn.Module:
    """Give an elastic module its original class back.

    Args:
        module: an elastic module.
        freeze_attrs: if True, the elastic attributes keep their active values
            (used by extraction); if False they return to their full values.

    Returns:
        The same module object, no longer elastic.
    """
    if not is_elastic(module):
        return module
    d = module.__dict__
    if freeze_attrs:
        for name in d["_el_attrs"]:
            d[name] = getattr(module, name)
    base = type(module)._el_base  # type: ignore[attr-defined]
    for key in ("_el_tensors", "_el_attrs", "_el_switch", "_el_gate"):
        d.pop(key, None)
    module.__class__ = base
    return module
