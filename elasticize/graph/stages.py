"""Stage finding: residual blocks (``y = x + f(x)``) and the stages of consecutive blocks whose depth is elastic.

A module called once whose output follows a chain of adds back to its input is a residual
block (:func:`_is_residual`); consecutive residual blocks of one parent, each fed the
previous one's output, are a **stage**: the whole list of children, or a segment of it.
"""

from __future__ import annotations

from typing import Any, Callable

import torch.fx as fx
from torch import nn

from .ops import canonical
from .ops.shape import RESHAPE
from .propagator import Propagator
from .results import StageInfo
from .tracing import Tracer

__all__ = ["find_stages"]

#: ops a residual chain may pass through and still count as ``y = x + f(x)``
_CHAIN = {"relu", "relu6", "gelu", "silu", "hardswish", "contiguous", "clone", "dropout", "identity", "to", "float"}
#: reshapes that keep the element order, allowed inside a residual chain (see :func:`_is_residual`)
_RESHAPE_CHAIN = RESHAPE - {"view_as", "reshape_as"}
#: norms a post-norm residual chain may pass through (see :func:`_is_residual`)
_LAYER_NORMS = (nn.LayerNorm, nn.RMSNorm)


def _is_residual(node: Any, x_in: fx.Node, inner: set[fx.Node], depth: int = 0, added: bool = False,
                 norm: Callable[[fx.Node], bool] = lambda n: False) -> bool:
    """Whether ``node`` is ``x_in`` plus branches: a chain of adds (and activations) back to the input.

    Reshapes may sit in the chain (timm's Swin block adds its MLP branch to ``x.reshape(B, -1, C)``
    and reshapes back): reshapes keep the element order, so with the block's output shaped like its
    input (checked by the caller) the chain without its branches is the identity.

    So may the block's own LayerNorm / RMSNorm calls (``norm(node)`` true): a post-norm transformer layer,
    ``norm2(z + ff(z))`` with ``z = norm1(x + attn(x))``, is skipped whole as LayerDrop does
    (Fan et al., ICLR 2020; post-norm BERT layers are dropped so in the transformers adapter).

    The chain may not pass through the output of any other sub-module call (``inner``): a
    container of residual blocks is not itself a residual block.
    """
    if depth > 64 or not isinstance(node, fx.Node):
        return False
    if node is x_in:
        return added
    if node.args and norm(node):
        return _is_residual(node.args[0], x_in, inner, depth + 1, added, norm)
    if node in inner:
        return False
    if node.op in ("call_function", "call_method"):
        name = canonical(node)
        if name in ("add", "iadd"):
            return any(_is_residual(a, x_in, inner, depth + 1, True, norm) for a in node.args[:2])
        if (name in _CHAIN or name in _RESHAPE_CHAIN) and node.args:
            return _is_residual(node.args[0], x_in, inner, depth + 1, added, norm)
    return False


def find_stages(root: nn.Module, tracer: Tracer, prop: Propagator) -> list[StageInfo]:
    """The stages of residual blocks among the modules ``tracer`` saw called, with the leading
    non-residual blocks of a segment as its mandatory blocks."""
    calls = {}
    n_args: dict[str, int] = {}
    for path, args, out in tracer.calls:
        if not path or tracer.call_count.get(path, 0) != 1:
            continue
        x_in = next((a for a in args if isinstance(a, fx.Proxy)), None)
        if x_in is None or not isinstance(out, fx.Proxy):
            continue
        if out.node is x_in.node:  # a no-op module (Identity-like)
            continue
        calls[path] = (x_in.node, out.node)
        n_args[path] = len(args)

    def residual_block(p: str) -> bool:
        x, y = calls[p]
        if not prop.shape(x) or prop.shape(x) != prop.shape(y):
            return False
        # the chain may start at a child's output (an activation module) but not pass through one
        inner = {yy for q, (_, yy) in calls.items() if q.startswith(p + ".") and yy is not y}

        def own_norm(n: fx.Node) -> bool:  # a LayerNorm child of the block, called as a leaf
            return (n.op == "call_module" and str(n.target).rpartition(".")[0] == p
                    and isinstance(root.get_submodule(str(n.target)), _LAYER_NORMS))

        return _is_residual(y, x, inner, norm=own_norm)

    residual = {p for p in calls if residual_block(p)}

    def inside_residual(path: str) -> bool:
        parts = path.split(".")
        return any(".".join(parts[:k]) in residual for k in range(1, len(parts)))

    by_parent: dict[str, list[tuple[int, str]]] = {}
    for p in calls:
        if inside_residual(p):
            continue
        parent, _, name = p.rpartition(".")
        children = list(root.get_submodule(parent)._modules) if parent or name else []
        if name in children:
            by_parent.setdefault(parent, []).append((children.index(name), p))
    stages: list[StageInfo] = []
    for parent, kids in by_parent.items():
        kids.sort()
        segments: list[list[str]] = []
        prev_out = None
        for _, p in kids:
            x, y = calls[p]
            chained = prev_out is not None and x is prev_out
            if p in residual and chained and segments:
                segments[-1].append(p)
            else:
                segments.append([p])
            prev_out = y
        useful = [s for s in segments if any(b in residual for b in s) and len(s) >= 2]
        for seg in useful:
            n_mand = 0
            while n_mand < len(seg) and seg[n_mand] not in residual:
                n_mand += 1
            if any(b not in residual for b in seg[n_mand:]):
                continue
            first, last = seg[0].rpartition(".")[2], seg[-1].rpartition(".")[2]
            name = parent if len(useful) == 1 and len(seg) == len(kids) else f"{parent}[{first}:{last}]"
            # nn.Identity takes one input: a block called with more is deleted from its list instead
            drop = ("remove" if isinstance(root.get_submodule(parent), nn.ModuleList)
                    and any(n_args[b] > 1 for b in seg) else "identity")
            stages.append(StageInfo(name or "<root>", seg, n_mand, drop=drop))
    return stages
