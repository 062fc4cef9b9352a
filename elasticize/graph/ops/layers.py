"""Layers called as functions: linear, convolution, norms and embedding.

They appear inside traced custom modules (``F.linear(x, self.weight)``) and in
``torch.export`` graphs, where every layer is a function of its parameters. The layer
patterns (:func:`linear_like`, :func:`conv_like`) are shared with the rules' context
(:meth:`elasticize.graph.SiteContext.linear`, :meth:`elasticize.graph.SiteContext.conv`).
"""

from __future__ import annotations

import math

import torch.fx as fx

from ..propagator import Propagator, Value
from .registry import as_tuple, call_args, op

__all__ = ["linear_like", "conv_like"]


def linear_like(p: Propagator, x: Value, w: tuple | None, b: tuple | None, out_shape: tuple, owner: str) -> Value:
    """``y = x W^T + b`` along the last axis: ``x``'s last axis joins ``W``'s columns, the output's is ``W``'s rows.

    ``W``'s rows produce a width; MACs ``prod(out_shape[:-1]) * out * in`` (whole example
    batch) scale with the leading axes too (a token-mixing ``Linear`` over ``(B, C, N)``).
    Returns the output's slots, or None when ``x`` or ``W`` is not tracked.
    """
    if not isinstance(x, tuple) or w is None:
        return None
    p.c.union(x[-1], w[1])
    out = x[:-1] + (w[0],)
    if b is not None:
        p.c.union(w[0], b[0])
    p.c.producer.add(w[0])
    positions = math.prod(out_shape[:-1]) if out_shape else 1
    size = p.c.size
    # the leading axes may be elastic too (a token-mixing Linear over (B, C, N), ResMLP / gMLP)
    p.add_macs(owner, positions * size[w[0]] * size[w[1]], [w[0], w[1], *x[:-1]])
    return out


def conv_like(p: Propagator, x: Value, w: tuple | None, b: tuple | None, groups: int, out_shape: tuple, owner: str,
              module: str | None = None) -> Value:
    """Convolution over axis 1 (``W``: ``(out, in / groups, *kernel)``): input channels join ``W``'s columns.

    A depthwise convolution (``groups == in == out``) passes its input's channels through;
    another grouped convolution fixes both sides. ``module``'s ``in_channels``,
    ``out_channels`` and ``groups`` follow. MACs ``batch * prod(spatial) * out * in * kernel``.
    """
    if not isinstance(x, tuple) or w is None:
        return None
    size = p.c.size
    c_in, c_out = size[x[1]], size[w[0]]
    spatial = tuple(p.c.new(n) for n in out_shape[2:])
    if groups == 1:
        p.c.union(x[1], w[1])
        out_c = w[0]
        p.c.producer.add(w[0])
    elif groups == c_in and groups == c_out and size[w[1]] == 1:  # depthwise
        out_c = p.c.union(x[1], w[0])
        if module is not None:
            p.c.attrs.append((module, "groups", w[0], "int", 1, 1))
            p.c.attrs.append((module, "in_channels", w[0], "int", 1, 1))
    else:
        reason = f"grouped convolution (groups={groups}) in {owner}"
        p.c.fix(x[1], reason)
        p.c.fix(w[0], reason)
        p.c.producer.add(w[0])  # listed in the report as not elastic, with the reason
        out_c = w[0]
    if b is not None:
        p.c.union(w[0], b[0])
    if module is not None:
        p.c.attrs.append((module, "out_channels", w[0], "int", 1, 1))
        if groups == 1:
            p.c.attrs.append((module, "in_channels", w[1], "int", 1, 1))
    positions = math.prod(out_shape[2:]) * out_shape[0] if out_shape else 1
    kernel = math.prod(size[s] for s in w[2:])
    p.add_macs(owner, positions * size[w[0]] * size[w[1]] * kernel, [w[0], w[1]])
    return (x[0], out_c, *spatial)


@op("linear")
def linear(p: Propagator, node: fx.Node) -> Value:
    """``F.linear(x, W, b)``: as :func:`linear_like`."""
    x_node, w_node, b_node = call_args(node, ("input", "weight", "bias"))
    x, w = p.env.get(x_node), p.env.get(w_node)
    b = p.env.get(b_node) if isinstance(b_node, fx.Node) else None
    return linear_like(p, x, w, b, p.shape(node), p.owner(w_node))


@op("conv1d", "conv2d", "conv3d")
def conv(p: Propagator, node: fx.Node) -> Value:
    """``F.conv*d(x, W, b, stride, padding, dilation, groups)``: as :func:`conv_like`."""
    a = call_args(node, ("input", "weight", "bias", "stride", "padding", "dilation", "groups"))
    x, w = p.env.get(a[0]), p.env.get(a[1])
    b = p.env.get(a[2]) if isinstance(a[2], fx.Node) else None
    groups = a[6] if a[6] is not None else 1
    owner = p.owner(a[1])
    mod = owner if owner and hasattr(p.root.get_submodule(owner), "groups") else None
    return conv_like(p, x, w, b, groups, p.shape(node), owner, module=mod)


@op("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
def conv_transpose(p: Propagator, node: fx.Node) -> Value:
    """``F.conv_transpose*d(x, W, b, stride, padding, output_padding, groups)``, ``W``: ``(in, out, *kernel)``
    (``groups == 1``): the input channels join ``W``'s rows, the output channels are ``W``'s columns (a width
    produced there); the module's ``in_channels`` and ``out_channels`` follow. Grouped: both sides fixed.
    MACs ``batch * prod(input spatial) * in * out * kernel`` (as ``FlopCounterMode`` counts a transposed one)."""
    a = call_args(node, ("input", "weight", "bias", "stride", "padding", "output_padding", "groups"))
    x, w = p.env.get(a[0]), p.env.get(a[1])
    if not isinstance(x, tuple) or not isinstance(w, tuple):
        return p.unsupported(node, "conv_transpose of an untracked weight")
    owner = p.owner(a[1])
    if (a[6] or 1) != 1:
        return p.unsupported(node, f"grouped transposed convolution (groups={a[6]}) in {owner}")
    p.c.union(x[1], w[0])
    p.c.producer.add(w[1])
    if isinstance(a[2], fx.Node) and isinstance(b := p.env.get(a[2]), tuple):
        p.c.union(w[1], b[0])
    mod = p.root.get_submodule(owner) if owner else None
    if mod is not None and hasattr(mod, "in_channels"):
        p.c.attrs.append((owner, "in_channels", w[0], "int", 1, 1))
        p.c.attrs.append((owner, "out_channels", w[1], "int", 1, 1))
    in_shape, size = p.shape(a[0]), p.c.size
    kernel = math.prod(size[s] for s in w[2:])
    p.add_macs(owner, math.prod(in_shape[2:]) * in_shape[0] * size[w[0]] * size[w[1]] * kernel, [w[0], w[1]])
    return (x[0], w[1], *(p.c.new(n) for n in p.shape(node)[2:]))


@op("batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit",
    "_native_batch_norm_legit_functional", "native_batch_norm")
def batch_norm(p: Propagator, node: fx.Node) -> Value:
    """``F.batch_norm(x, mean, var, w, b)`` and aten's ``_native_batch_norm_legit*`` (which return a tuple):
    the statistics and affine tensors join the channels (axis 1); the output keeps the input's slots."""
    x = p.env.get(node.args[0])
    for a in node.args[1:5]:
        v = p.env.get(a) if isinstance(a, fx.Node) else None
        if isinstance(v, tuple) and isinstance(x, tuple):
            p.c.union(x[1], v[0])
    if isinstance(node.meta.get("val"), (list, tuple)):
        return [x, *[p.fresh_from(m, None) for m in node.meta["val"][1:]]]
    return x


@op("layer_norm", "rms_norm")
def layer_norm(p: Propagator, node: fx.Node) -> Value:
    """``layer_norm`` / ``rms_norm`` over the last axis: the affine tensors join it, and the owner's ``normalized_shape`` follows (fixed when
    there is no owning module); over more axes, they are fixed."""
    x = p.env.get(node.args[0])
    shape = as_tuple(node.args[1])
    if not isinstance(x, tuple):
        return x
    if len(shape) != 1:
        reason = f"layer_norm over {len(shape)} axes at {node.name}"
        for s in x[-len(shape):]:
            p.c.fix(s, reason)
        return x
    owner = ""
    for a in call_args(node, ("input", "normalized_shape", "weight", "bias"))[2:]:
        v = p.env.get(a) if isinstance(a, fx.Node) else None
        if isinstance(v, tuple):
            p.c.union(x[-1], v[0])
            owner = p.owner(a)
    if owner and hasattr(p.root.get_submodule(owner), "normalized_shape"):
        p.c.attrs.append((owner, "normalized_shape", x[-1], "shape", 1, 1))
    else:
        p.c.fix(x[-1], f"layer_norm with a constant normalized_shape at {node.name}")
    return x


@op("group_norm")
def group_norm(p: Propagator, node: fx.Node) -> Value:
    """The affine tensors join the channels (axis 1), which move in whole groups (unit ``channels // groups``)."""
    x = p.env.get(node.args[0])
    groups = node.args[1]
    if isinstance(x, tuple):
        p.c.require_unit(x[1], p.c.size[x[1]] // groups)
        for a in node.args[2:4]:
            v = p.env.get(a) if isinstance(a, fx.Node) else None
            if isinstance(v, tuple):
                p.c.union(x[1], v[0])
    return x


@op("embedding")
def embedding(p: Propagator, node: fx.Node) -> Value:
    """``F.embedding(idx, W)``: the index's slots, then ``W``'s columns (the embedding dimension)."""
    idx, w = p.env.get(node.args[0]), p.env.get(node.args[1])
    if isinstance(w, fx.Node) or not isinstance(idx, tuple):
        return p.fresh(node, None)
    if w is None:  # F.embedding(input, weight) argument order
        return p.fresh(node, None)
    return idx + (w[1],)
