"""Ops that join or split tensors: concatenation, stacking, splitting, chunking and indexing.

A concatenation of copies of one index space is a *repeated* slot (sliced alike in each
copy); a concatenation of different groups is a *segmented* slot (each input keeps its group,
see :meth:`elasticize.graph.coupling.Coupling.segmented`). Equal chunks of an axis are repeated
slots too; equal chunks of a segmented axis that each hold whole segments of one layout keep
them; other splits and partial slices fix the axis.
"""

from __future__ import annotations

from typing import Sequence

import torch.fx as fx

from ..propagator import Propagator, Value
from .registry import op

__all__: list[str] = []


@op("cat")
def cat(p: Propagator, node: fx.Node) -> Value:
    """The other axes join; the joined axis is a repeated slot for copies of one index space, else a segmented
    slot: each input keeps its group, and a consumer reads the concatenation of each segment's active prefix."""
    tensors = node.args[0]
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    out_shape = p.shape(node)
    dim %= len(out_shape)
    vals = [p.env.get(t) for t in tensors]
    if len(vals) == 1 and isinstance(vals[0], tuple):
        return vals[0]
    if (len(vals) > 1 and all(isinstance(v, tuple) and len(v) == len(out_shape) for v in vals)
            and len({p.c.find(v[dim]) for v in vals}) == 1 and p.c.flat_segments(vals[0][dim]) is None):
        # copies of one index space side by side (torchvision's patch merging): sliced alike in each
        return _join(p, [v[:dim] + v[dim + 1:] for v in vals], out_shape, dim,
                     p.c.repeated(vals[0][dim], len(vals)))
    if vals and all(isinstance(v, tuple) and len(v) == len(out_shape) for v in vals):
        return _join(p, [v[:dim] + v[dim + 1:] for v in vals], out_shape, dim, p.c.segmented([v[dim] for v in vals]))
    out = []
    reason = f"concatenated along axis {dim} at {node.name}"
    for a in range(len(out_shape)):
        if a == dim:
            for v in vals:
                if isinstance(v, tuple):
                    p.c.fix(v[a], reason)
            out.append(p.c.new(out_shape[a], reason))
            continue
        slot = None
        for v in vals:
            if isinstance(v, tuple):
                slot = v[a] if slot is None else p.c.union(slot, v[a])
        out.append(slot if slot is not None else p.c.new(out_shape[a]))
    return tuple(out)


def _join(p: Propagator, others: list[tuple[int, ...]], out_shape: Sequence[int], dim: int, slot: int) -> Value:
    """The output of joining values along ``dim`` into ``slot``: their other axes are one slot each."""
    base = others[0]
    for v in others[1:]:
        base = tuple(p.c.union(x, y) for x, y in zip(base, v))
    return base[:dim] + (slot,) + base[dim:]


@op("_patch_merging_pad")
def patch_merging_pad(p: Propagator, node: fx.Node) -> Value:
    """torchvision Swin's fx-wrapped ``_patch_merging_pad``: ``(..., H, W, C)`` -> ``(..., H/2, W/2, 4 C)``,
    the four 2x2 neighbours' channels side by side (each a copy of the input's index space)."""
    x = p.env.get(node.args[0])
    out_shape = p.shape(node)
    if not isinstance(x, tuple) or len(x) != len(out_shape) or out_shape[-1] != 4 * p.shape(node.args[0])[-1]:
        return p.unsupported(node, "unsupported op _patch_merging_pad")
    return x[:-3] + (p.c.new(out_shape[-3]), p.c.new(out_shape[-2]), p.c.repeated(x[-1], 4))


@op("stack")
def stack(p: Propagator, node: fx.Node) -> Value:
    """The inputs' axes join; the new axis is a new slot."""
    vals = [p.env.get(t) for t in node.args[0]]
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    out_shape = p.shape(node)
    dim %= len(out_shape)
    base = None
    for v in vals:
        if isinstance(v, tuple):
            base = v if base is None else tuple(p.c.union(x, y) for x, y in zip(base, v))
    if base is None:
        return p.fresh(node, None)
    return base[:dim] + (p.c.new(out_shape[dim]),) + base[dim:]


def _split(p: Propagator, node: fx.Node, dim: int, removes_axis: bool, by_count: bool = False) -> Value:
    x = p.env.get(node.args[0])
    metas = node.meta.get("tensor_meta", node.meta.get("val"))
    dim %= len(x)
    in_shape = p.shape(node.args[0])
    sizes = {tuple(m.shape)[dim] for m in metas}
    segs = None if removes_axis or len(metas) < 2 else p.c.flat_segments(x[dim])
    if segs is not None:
        pieces = _cut_segments(p, segs, [tuple(m.shape)[dim] for m in metas]) if by_count else None
        if pieces is None:
            reason = (f"a concatenation is split ({node.name}) " + ("inside a segment" if by_count else
                      "in literal sizes, which a sub-network's segments would not follow"))
            for sg in segs:
                p.c.fix(sg, reason)
        else:
            return [x[:dim] + (piece,) + x[dim + 1:] for piece in pieces]
    if not removes_axis and len(metas) > 1 and len(sizes) == 1 and len(metas) * sizes.pop() == in_shape[dim]:
        # equal chunks (a gated MLP's x1, x2 = fc1(x).chunk(2, -1)): the axis is that many copies of one
        # index space, sliced alike in each chunk, as the fused q/k/v rows of an attention projection are
        part = p.c.new(in_shape[dim] // len(metas))
        p.c.union(x[dim], p.c.repeated(part, len(metas)))
        return [x[:dim] + (part,) + x[dim + 1:] for _ in metas]
    out = []
    for m in metas:
        shp = tuple(m.shape)
        if removes_axis:
            out.append(x[:dim] + x[dim + 1:])
        elif shp[dim] == in_shape[dim]:
            out.append(x)
        else:
            p.c.fix(x[dim], f"split along axis {dim} at {node.name}")
            out.append(x[:dim] + (p.c.new(shp[dim], "split"),) + x[dim + 1:])
    return out


def _cut_segments(p: Propagator, segs: list[int], lengths: list[int]) -> list[int] | None:
    """The equal chunks of a segmented axis, when each holds whole segments of one layout: the chunks' segments
    join position by position (each chunk is then one copy of the same layout, and shrinks alike); None when a cut
    falls inside a segment or the chunks' layouts differ."""
    held: list[list[int]] = []
    i = 0
    for n in lengths:
        part, total = [], 0
        while total < n and i < len(segs):
            part.append(segs[i])
            total += p.c.size[segs[i]]
            i += 1
        if total != n:
            return None
        held.append(part)
    if len({tuple(p.c.size[s] for s in part) for part in held}) != 1:
        return None
    for part in held[1:]:
        for a, b in zip(held[0], part):
            p.c.union(a, b)
    return [part[0] if len(part) == 1 else p.c.segmented(part) for part in held]


@op("unbind")
def unbind(p: Propagator, node: fx.Node) -> Value:
    """Each output keeps the input's slots without the removed axis."""
    return _split(p, node, node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0), True)


@op("chunk")
def chunk(p: Propagator, node: fx.Node) -> Value:
    """Equal chunks make the axis a repeated slot, each chunk one copy; unequal parts fix it. Chunks of a
    concatenation that each hold whole segments of one layout keep them (their segments join position by
    position); any other chunking of a concatenation fixes its segments."""
    return _split(p, node, node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0), False, True)


@op("split", "split_with_sizes", "tensor_split")
def split(p: Propagator, node: fx.Node) -> Value:
    """As ``chunk``: equal parts make the axis a repeated slot; unequal parts fix it; a split of a concatenation
    in literal sizes fixes its segments (a sub-network's segments would not follow the sizes)."""
    return _split(p, node, node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0), False)


@op("getitem", any_value=True)
def getitem(p: Propagator, node: fx.Node) -> Value:
    """An element of a sequence keeps its slots; a tensor index keeps whole axes and fixes partially sliced ones.

    ``None`` adds a size-1 slot, an int removes the axis, ``...`` keeps the axes it spans;
    indexing with a tensor is unsupported.
    """
    base, idx = node.args[0], node.args[1]
    v = p.env.get(base) if isinstance(base, fx.Node) else None
    if isinstance(v, list):
        return v[idx] if isinstance(idx, int) else None
    if not isinstance(v, tuple) or not p.is_tensor(node):
        return None
    idx = idx if isinstance(idx, tuple) else (idx,)
    if any(isinstance(i, fx.Node) for i in idx):
        return p.unsupported(node, "tensor indexing")
    in_shape, out_shape = p.shape(base), p.shape(node)
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    out: list[int] = []
    a = 0
    for i in idx:
        if i is Ellipsis:
            for _ in range(len(in_shape) - n_real):
                out.append(v[a]); a += 1
        elif i is None:
            out.append(p.c.new(1))
        elif isinstance(i, int):
            a += 1
        elif isinstance(i, slice):
            k = len(out)
            if k < len(out_shape) and out_shape[k] == in_shape[a]:
                out.append(v[a])
            else:
                reason = f"partial slice at {node.name}"
                p.c.fix(v[a], reason)
                out.append(p.c.new(out_shape[k] if k < len(out_shape) else 1, reason))
            a += 1
        else:
            return p.unsupported(node, f"index {type(i).__name__}")
    out.extend(v[a:])
    if len(out) != len(out_shape):
        return p.unsupported(node, "indexing")
    return tuple(out)
