"""Ops that move, mix or reorder channels: per-channel activations, channel splits, channel <-> space
rearrangements, order-dependent ops along an axis, and the sampling and bag ops.

A channel <-> space rearrangement keeps whole units: ``pixel_shuffle`` by ``r`` gives each output
channel ``r * r`` consecutive input channels, so the input's group moves in units of ``r * r`` and the
output's channels are one entry per unit (:meth:`elasticize.graph.coupling.Coupling.per_entry`). An op
whose result depends on the channels' order (``roll``, ``flip``, ``cumsum``, ``local_response_norm``)
either fixes the axis or keeps the group's order (not sorted by importance).
"""

from __future__ import annotations

import torch.fx as fx

from ..propagator import Propagator, Value
from .registry import as_tuple, call_args, canonical, op

__all__: list[str] = []


def _attr(p: Propagator, tensor: fx.Node, name: str, slot: int) -> None:
    """The owner of the parameter ``tensor`` has an int attribute ``name`` that follows ``slot``."""
    owner = p.owner(tensor)
    if owner and isinstance(getattr(p.root.get_submodule(owner), name, None), int):
        p.c.attrs.append((owner, name, slot, "int", 1, 1))


@op("prelu")
def prelu(p: Propagator, node: fx.Node) -> Value:
    """``F.prelu(x, w)``: a per-channel ``w`` (``num_parameters > 1``) joins the channels (axis 1), and its
    module's ``num_parameters`` follows; the output keeps the input's slots."""
    x, w = p.env.get(node.args[0]), p.env.get(node.args[1])
    if isinstance(x, tuple) and isinstance(w, tuple) and len(w) == 1 and p.c.size[w[0]] > 1:
        p.c.union(x[1 if len(x) > 1 else 0], w[0])
        _attr(p, node.args[1], "num_parameters", w[0])
    return x


@op("glu")
def glu(p: Propagator, node: fx.Node) -> Value:
    """``F.glu(x, dim)``: ``a * sigmoid(b)`` of the two halves along ``dim``, which are two copies of the output's
    index space (a repeated slot, sliced alike in each half); halves of a concatenation fix it."""
    x = p.env.get(node.args[0])
    dim = call_args(node, ("input", "dim"))[1]
    dim = -1 if dim is None else dim
    if not isinstance(x, tuple):
        return p.fresh(node, None)
    d = dim % len(x)
    if p.c.flat_segments(x[d]) is not None:
        return p.unsupported(node, "glu of a concatenation")
    half = p.c.new(p.c.size[x[d]] // 2)
    p.c.union(x[d], p.c.repeated(half, 2))
    return x[:d] + (half,) + x[d + 1:]


def _space(p: Propagator, node: fx.Node, x: tuple, channel: int) -> Value:
    """The output of a channel <-> space op: batch axes kept, ``channel`` as its channel slot, new spatial axes."""
    out_shape = p.shape(node)
    lead = len(out_shape) - 3
    return x[:lead] + (channel,) + tuple(p.c.new(n) for n in out_shape[lead + 1:])


@op("pixel_shuffle")
def pixel_shuffle(p: Propagator, node: fx.Node) -> Value:
    """``(..., C r^2, H, W) -> (..., C, H r, W r)``: the input's channels move in units of ``r^2``, and each output
    channel is one unit of them (one entry per unit); the spatial axes are new."""
    x, r = p.env.get(node.args[0]), call_args(node, ("input", "upscale_factor"))[1]
    if not isinstance(x, tuple) or not isinstance(r, int):
        return p.unsupported(node, "pixel_shuffle with a computed factor")
    return _space(p, node, x, p.c.per_entry(x[-3], r * r))


@op("pixel_unshuffle")
def pixel_unshuffle(p: Propagator, node: fx.Node) -> Value:
    """``(..., C, H, W) -> (..., C r^2, H / r, W / r)``: the output's channels move in units of ``r^2``, and each
    input channel is one unit of them; the spatial axes are new."""
    x, r = p.env.get(node.args[0]), call_args(node, ("input", "downscale_factor"))[1]
    if not isinstance(x, tuple) or not isinstance(r, int):
        return p.unsupported(node, "pixel_unshuffle with a computed factor")
    out = p.c.new(p.c.size[x[-3]] * r * r)
    p.c.union(x[-3], p.c.per_entry(out, r * r))
    return _space(p, node, x, out)


@op("channel_shuffle", "native_channel_shuffle")
def channel_shuffle(p: Propagator, node: fx.Node) -> Value:
    """``(N, g m, ...)`` with channel ``i m + j`` moved to ``j g + i``: when the input is ``g`` copies of one
    index space (a repeated slot, e.g. two equal chunks), the output moves in units of ``g`` channels, one unit
    per channel of that space; any other input's channels are fixed (a prefix would not stay a prefix)."""
    x, g = p.env.get(node.args[0]), call_args(node, ("input", "groups"))[1]
    if not isinstance(x, tuple):
        return p.fresh(node, None)
    root = p.c.find(x[1])
    base = next((b for s, (b, k) in p.c.derived.items() if p.c.find(s) == root and k == g), None)
    if base is None:
        reason = f"channel_shuffle of channels that are not {g} copies of one index space at {node.name}"
        p.c.fix(x[1], reason)
        return x[:1] + (p.c.new(p.c.size[x[1]], reason),) + x[2:]
    out = p.c.new(p.c.size[x[1]])
    p.c.union(base, p.c.per_entry(out, g))
    return x[:1] + (out,) + x[2:]


def _axes_arg(node: fx.Node, name: str, pos: int) -> tuple:
    a = node.kwargs.get(name, node.args[pos] if len(node.args) > pos else None)
    if node.op == "call_method" and name == "dims" and canonical(node) == "flip" and len(node.args) > 2:
        a = node.args[1:]
    return () if a is None else as_tuple(a)


@op("roll", "flip", "fliplr", "flipud")
def reorder(p: Propagator, node: fx.Node) -> Value:
    """``roll`` / ``flip`` along ``dims``: the axes they reorder are fixed (a prefix of the output is not a
    prefix of the input), the others keep their slots; ``roll`` without ``dims`` flattens, fixing every axis."""
    x = p.env.get(node.args[0])
    if not isinstance(x, tuple):
        return p.fresh(node, None)
    name = canonical(node)
    dims = {"fliplr": (1,), "flipud": (0,)}.get(name) or _axes_arg(node, "dims", 2 if name == "roll" else 1)
    if not dims:
        return p.unsupported(node, f"{name} of the flattened tensor")
    reason = f"{name} reorders the axis at {node.name}"
    for d in dims:
        if isinstance(d, int):
            p.c.fix(x[d % len(x)], reason)
    return x


@op("cumsum", "cumprod", "cummax", "cummin", "logcumsumexp", "local_response_norm")
def ordered(p: Propagator, node: fx.Node) -> Value:
    """The output keeps the input's slots; the axis the op runs along (``dim``; the channels for
    ``local_response_norm``) keeps its order, since each output depends on its neighbours or predecessors:
    a prefix of it is the op on a prefix, but importance sorting would change it."""
    x = p.env.get(node.args[0])
    if not isinstance(x, tuple):
        return p.fresh(node, None)
    name = canonical(node)
    dim = 1 if name == "local_response_norm" else node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    if isinstance(dim, int) and len(x):
        p.c.ordered.setdefault(x[dim % len(x)], f"{name} along it at {node.name} depends on the channels' order")
    out = p.fresh(node, None)
    if isinstance(out, list):  # cummax / cummin: (values, indices)
        return [x, x]
    return x


@op("normalize")
def normalize(p: Propagator, node: fx.Node) -> Value:
    """``F.normalize(x, p, dim)``: each vector along ``dim`` divided by its norm; the output keeps the input's
    slots (a sub-network normalises over its active channels, as its extraction does)."""
    return p.env.get(node.args[0])


@op("instance_norm")
def instance_norm(p: Propagator, node: fx.Node) -> Value:
    """``F.instance_norm(x, running_mean, running_var, weight, bias, ...)``: the statistics and affine tensors
    join the channels (axis 1), and the owner's ``num_features`` follows; the output keeps the input's slots."""
    x = p.env.get(node.args[0])
    a = call_args(node, ("input", "running_mean", "running_var", "weight", "bias"))
    for t in a[1:]:
        v = p.env.get(t) if isinstance(t, fx.Node) else None
        if isinstance(v, tuple) and isinstance(x, tuple):
            p.c.union(x[1], v[0])
            _attr(p, t, "num_features", v[0])
    return x


@op("embedding_bag")
def embedding_bag(p: Propagator, node: fx.Node) -> Value:
    """``F.embedding_bag(idx, W, offsets, ...)``: ``(bags, D)``, with ``D`` ``W``'s columns (a width produced
    there, its module's ``embedding_dim`` following); the bags axis is the index's first axis for a 2-D index."""
    idx_node, w_node = call_args(node, ("input", "weight"))
    idx, w = p.env.get(idx_node), p.env.get(w_node)
    if not isinstance(w, tuple):
        return p.unsupported(node, "embedding_bag of an untracked table")
    p.c.producer.add(w[1])
    _attr(p, w_node, "embedding_dim", w[1])
    bags = p.shape(node)[0]
    lead = idx[0] if isinstance(idx, tuple) and len(idx) == 2 else p.c.new(bags)
    return (lead, w[1])


@op("one_hot")
def one_hot(p: Propagator, node: fx.Node) -> Value:
    """``F.one_hot(idx, num_classes)``: the index's slots, then a new axis of classes (not a width)."""
    idx = p.env.get(node.args[0])
    if not isinstance(idx, tuple):
        return p.fresh(node, None)
    return idx + (p.c.new(p.shape(node)[-1], f"one_hot classes at {node.name}"),)


@op("unfold")
def unfold(p: Propagator, node: fx.Node) -> Value:
    """``F.unfold(x, k)``: ``(N, C, H, W) -> (N, C k, L)`` (``k`` the kernel's positions), channel ``c`` giving
    rows ``[c k, (c + 1) k)``: the output moves in units of ``k`` rows, one unit per input channel; ``L`` is new.
    ``Tensor.unfold(dim, size, step)`` (a sliding window) keeps the other axes and fixes ``dim``."""
    x = p.env.get(node.args[0])
    if not isinstance(x, tuple):
        return p.fresh(node, None)
    out_shape = p.shape(node)
    if node.op == "call_method" or len(out_shape) != 3 or len(x) != 4:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dimension", 0)
        if len(out_shape) != len(x) + 1 or not isinstance(dim, int):
            return p.unsupported(node, "unfold")
        p.c.fix(x[dim], f"a sliding window along the axis at {node.name}")
        return x[:dim] + (p.c.new(out_shape[dim]),) + x[dim + 1:] + (p.c.new(out_shape[-1]),)
    out = p.c.new(out_shape[1])
    p.c.union(x[1], p.c.per_entry(out, out_shape[1] // p.c.size[x[1]]))
    return (x[0], out, p.c.new(out_shape[2]))


@op("fold")
def fold(p: Propagator, node: fx.Node) -> Value:
    """``F.fold(x, output_size, k)``: ``(N, C k, L) -> (N, C, H, W)``, the inverse of ``unfold``: the input
    moves in units of ``k`` rows, and each output channel is one unit; the spatial axes are new."""
    x = p.env.get(node.args[0])
    out_shape = p.shape(node)
    if not isinstance(x, tuple) or len(x) != 3 or len(out_shape) != 4:
        return p.unsupported(node, "fold of an unbatched input")
    c = p.c.per_entry(x[1], p.c.size[x[1]] // out_shape[1])
    return (x[0], c, p.c.new(out_shape[2]), p.c.new(out_shape[3]))


@op("grid_sample")
def grid_sample(p: Propagator, node: fx.Node) -> Value:
    """``F.grid_sample(x, grid)``: ``(N, C, H, W)`` sampled at ``grid`` ``(N, Ho, Wo, 2)`` -> ``(N, C, Ho, Wo)``:
    the channels keep their slot, the batch axes join, the grid's coordinate axis is fixed, the spatial
    axes are new."""
    x, grid = p.env.get(node.args[0]), p.env.get(node.args[1])
    if not isinstance(x, tuple):
        return p.fresh(node, None)
    out_shape = p.shape(node)
    batch = x[0]
    if isinstance(grid, tuple):
        batch = p.c.union(x[0], grid[0])
        p.c.fix(grid[-1], f"grid_sample coordinates at {node.name}")
    return (batch, x[1], *(p.c.new(n) for n in out_shape[2:]))
