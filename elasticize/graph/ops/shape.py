"""Element-wise ops, broadcasts, reshapes, reductions, pooling and axis permutations.

Element-wise ops join the axes they broadcast together; reshapes carry an axis through
where it keeps its size and fix the axes they merge or split; permutations move slots.
"""

from __future__ import annotations

from typing import Sequence

import torch.fx as fx

from ..propagator import Propagator, Value
from .registry import as_tuple, canonical, op
from .sizes import SIZED_RESHAPE, size_source

__all__ = ["RESHAPE", "broadcast"]

#: reshapes; the ones that keep the element order may sit in a residual chain (:mod:`elasticize.graph.stages`)
RESHAPE = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as", "_unsafe_view"}
#: attribute names that hold a width; a reshape to a literal equal to one of them follows it (``_width_attr``)
WIDTH_ATTRS = ("hidden_dim", "embed_dim", "d_model", "hidden_size", "num_features", "embed_dims", "dim", "width")


def broadcast(p: Propagator, out_shape: Sequence[int], ins: Sequence[tuple[Value, Sequence[int]]]) -> tuple[int, ...]:
    """Slots of an output of ``out_shape`` broadcast from ``ins`` (``(value, shape)`` pairs, right-aligned):
    each output axis joins the inputs' axes of the same size; a fresh slot where none has it."""
    n = len(out_shape)
    out = []
    for i in range(n):
        slot = None
        for v, shp in ins:
            if not isinstance(v, tuple):
                continue
            j = i - (n - len(shp))
            if j < 0 or shp[j] != out_shape[i]:
                continue
            slot = v[j] if slot is None else p.c.union(slot, v[j])
        out.append(slot if slot is not None else p.c.new(out_shape[i]))
    return tuple(out)


@op("add", "iadd", "sub", "isub", "rsub", "mul", "imul", "div", "truediv", "itruediv", "floordiv", "pow",
    "maximum", "minimum", "where", "clamp", "clamp_min", "clamp_max", "clip", "lerp", "addcmul", "addcdiv",
    "floor_divide", "eq", "ne", "lt", "le", "gt", "ge", "neg", "abs", "exp", "log", "sqrt", "rsqrt", "reciprocal",
    "sin", "cos", "erf", "sign", "square", "nan_to_num", "masked_fill",
    "relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "hardtanh",
    "leaky_relu", "elu", "selu", "celu", "softplus", "mish", "softmax", "log_softmax", "softmin", "logsigmoid",
    "hardshrink", "softshrink", "softsign", "tanhshrink", "threshold", "rrelu", "gumbel_softmax",
    "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
    "contiguous", "clone", "float", "half", "bfloat16", "double", "to", "type", "type_as", "detach",
    "requires_grad_", "cpu", "cuda", "identity", "native_dropout", "_to_copy", "alias", "lift_fresh_copy",
    "stochastic_depth")  # torchvision.ops (fx-wrapped): scales whole samples, every axis kept
def elementwise(p: Propagator, node: fx.Node) -> Value:
    """The output's axes are the inputs' axes broadcast together (:func:`broadcast`): each joins theirs."""
    ins = [(p.env.get(a), p.shape(a)) for a in node.all_input_nodes if p.is_tensor(a)]
    return broadcast(p, p.shape(node), ins)


@op("avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
    "adaptive_max_pool2d", "adaptive_max_pool3d", "lp_pool1d", "lp_pool2d", "lp_pool3d", "interpolate", "upsample", "upsample_bilinear",
    "upsample_nearest", "fractional_max_pool2d", "fractional_max_pool3d", "pad",
    "max_pool2d_with_indices", "_adaptive_avg_pool2d", "upsample_nearest2d", "upsample_bilinear2d",
    "upsample_bicubic2d", "constant_pad_nd")
def same_size(p: Propagator, node: fx.Node) -> Value:
    """Pooling, resizing, padding: an axis that keeps its size keeps its slot; a resized axis is new."""
    x = p.env.get(node.args[0])
    if not isinstance(x, tuple):
        return p.fresh(node, None)
    in_shape, out_shape = p.shape(node.args[0]), p.shape(node)
    if len(in_shape) != len(out_shape):
        return p.unsupported(node, f"{canonical(node)} changes rank")
    if canonical(node) in ("pad", "constant_pad_nd"):  # a padded axis (channels too) cannot follow a prefix
        for i in range(len(out_shape)):
            if in_shape[i] != out_shape[i]:
                p.c.fix(x[i], f"padded at {node.name}")
    return tuple(x[i] if in_shape[i] == out_shape[i] else p.c.new(out_shape[i]) for i in range(len(out_shape)))


@op(*RESHAPE)
def reshape(p: Propagator, node: fx.Node) -> Value:
    """An axis that keeps its size (its neighbours of size 1 aside) keeps its slot; merged or split axes are fixed.

    A literal size in ``view`` / ``reshape`` fixes its axis unless a width attribute of the
    module holds it (``_width_attr``); a size read off an axis (``x.shape[-1]``) joins that axis.
    """
    x = p.env.get(node.args[0])
    in_shape, out_shape = p.shape(node.args[0]), p.shape(node)
    if not isinstance(x, tuple):
        return p.fresh(node, None)
    out: list[int | None] = [None] * len(out_shape)
    i = j = 0
    while i < len(in_shape) or j < len(out_shape):
        ia, oa = [], []
        pi = pj = 1
        if i < len(in_shape):
            ia.append(i); pi = in_shape[i]; i += 1
        if j < len(out_shape):
            oa.append(j); pj = out_shape[j]; j += 1
        while pi != pj:
            if pi < pj and i < len(in_shape):
                ia.append(i); pi *= in_shape[i]; i += 1
            elif j < len(out_shape):
                oa.append(j); pj *= out_shape[j]; j += 1
            else:
                break
        big_in = [a for a in ia if in_shape[a] != 1]
        big_out = [a for a in oa if out_shape[a] != 1]
        if len(big_in) == 1 and len(big_out) == 1 and in_shape[big_in[0]] == out_shape[big_out[0]]:
            out[big_out[0]] = x[big_in[0]]
        elif big_in or big_out:
            reason = f"{canonical(node)} merges or splits axes at {node.name}"
            for a in big_in:
                p.c.fix(x[a], reason)
            for a in big_out:
                out[a] = p.c.new(out_shape[a], reason)
    result = tuple(s if s is not None else p.c.new(out_shape[k]) for k, s in enumerate(out))
    _check_literal_sizes(p, node, result)
    return result


def _width_attr(p: Propagator, node: fx.Node, size: int) -> tuple[str, str] | None:
    """``(module path, attribute)`` that a literal reshape size most likely came from, or None.

    torchvision's ViT reshapes to ``self.hidden_dim``, which tracing turns into the constant 768.
    When the module whose forward ran the reshape has exactly one int attribute named like a
    width (:data:`WIDTH_ATTRS`) equal to the literal, that attribute follows the axis's group
    instead of fixing it (and the sub-network's module reads its active size).
    """
    path = p.op_owner(node)
    try:
        module = p.root.get_submodule(path)
    except AttributeError:
        return None
    names = [n for n in WIDTH_ATTRS if type(vars(module).get(n)) is int and vars(module)[n] == size]
    return (path, names[0]) if len(names) == 1 else None


def _check_literal_sizes(p: Propagator, node: fx.Node, out: tuple) -> None:
    name = canonical(node)
    if name not in SIZED_RESHAPE:
        return
    sizes = node.args[1:] if node.op == "call_method" else node.args[1:2]
    sizes = as_tuple(sizes)
    if len(sizes) != len(out):
        return
    for k, s in enumerate(sizes):
        if isinstance(s, int) and s != -1 and s != 1:
            bound = _width_attr(p, node, s)
            if bound is None:
                p.c.fix(out[k], f"hard-coded size {s} in {name} at {node.name}")
            elif bound in p.bound_attrs:
                p.c.union(p.bound_attrs[bound], out[k])
            else:
                p.bound_attrs[bound] = out[k]
                p.c.attrs.append((*bound, out[k], "int", 1, 1))
        elif (src := size_source(p, s)) is not None:  # y.reshape(B, T, x.shape[-1]): that axis follows x's
            p.c.union(out[k], src)
        elif isinstance(s, fx.Node) and s in p.size_expr:
            # a computed size: fine where it lands on the axis it was read from (C * 1 * 1 after pooling);
            # elsewhere (D // heads as a head size) it would not follow that axis's slicing
            if any(p.c.find(a) != p.c.find(out[k]) and p.c.size[a] != 1 for a in p.size_expr[s]):
                reason = f"a size computed from it ({s.name}) is used in {name} at {node.name}"
                for a in p.size_expr[s]:
                    p.c.fix(a, reason)


@op("mean", "sum", "amax", "amin", "std", "var", "norm", "logsumexp", "prod", "max", "min")
def reduce(p: Propagator, node: fx.Node) -> Value:
    """The kept axes keep their slots; a reduced axis is dropped, or a new size-1 slot with ``keepdim``."""
    x = p.env.get(node.args[0])
    in_shape, out_shape = p.shape(node.args[0]), p.shape(node)
    if not isinstance(x, tuple):
        return p.fresh(node, None)
    dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    if dims is None:
        return tuple(p.c.new(n) for n in out_shape)
    dims = {d % len(in_shape) for d in as_tuple(dims) if isinstance(d, int)}
    keep = [a for a in range(len(in_shape)) if a not in dims]
    if len(out_shape) == len(in_shape):
        return tuple(x[a] if a not in dims else p.c.new(1) for a in range(len(in_shape)))
    if len(out_shape) == len(keep):
        return tuple(x[a] for a in keep)
    return p.unsupported(node, f"{canonical(node)} with unexpected output")


@op("permute")
def permute(p: Propagator, node: fx.Node) -> Value:
    """The output's axes are the input's slots, reordered."""
    x = p.env.get(node.args[0])
    dims = as_tuple(node.args[1:] if node.op == "call_method" else node.args[1])
    if "dims" in node.kwargs:
        dims = tuple(node.kwargs["dims"])
    return tuple(x[d % len(x)] for d in dims)


@op("transpose")
def transpose(p: Propagator, node: fx.Node) -> Value:
    """Two axes' slots swap places."""
    x = list(p.env.get(node.args[0]))
    d0, d1 = node.args[1] % len(x), node.args[2] % len(x)
    x[d0], x[d1] = x[d1], x[d0]
    return tuple(x)


@op("t")
def t(p: Propagator, node: fx.Node) -> Value:
    """The slots in reverse order."""
    return tuple(reversed(p.env.get(node.args[0])))


@op("movedim")
def movedim(p: Propagator, node: fx.Node) -> Value:
    """One axis's slot moves to another position."""
    x = list(p.env.get(node.args[0]))
    src, dst = node.args[1] % len(x), node.args[2] % len(x)
    s = x.pop(src)
    x.insert(dst, s)
    return tuple(x)


@op("getattr")
def tensor_attr(p: Propagator, node: fx.Node) -> Value:
    """A tensor attribute: ``T`` and ``mT`` permute the slots, ``data`` keeps them; any other is unsupported."""
    x = p.env.get(node.args[0])
    if node.args[1] in ("T", "mT") and isinstance(x, tuple):
        return tuple(reversed(x)) if node.args[1] == "T" else x[:-2] + (x[-1], x[-2])
    if node.args[1] in ("data",):
        return x
    return p.unsupported(node, f"tensor attribute {node.args[1]}")


@op("expand", "expand_as", "broadcast_to", "repeat", "tile")
def expand(p: Propagator, node: fx.Node) -> Value:
    """An axis that keeps its size keeps its slot; an expanded or repeated axis is new."""
    x = p.env.get(node.args[0])
    in_shape, out_shape = p.shape(node.args[0]), p.shape(node)
    off = len(out_shape) - len(in_shape)
    return tuple(x[i - off] if i >= off and in_shape[i - off] == out_shape[i] else p.c.new(out_shape[i])
                 for i in range(len(out_shape)))
