"""Sizes read off tensor axes (``x.shape[i]``, ``x.size(i)``) and the Python arithmetic done on them.

Such values are not tensors and have no slots; what matters is where they go. A size that
lands in a reshape of the axis it was read from follows that axis
(:func:`elasticize.graph.ops.shape.reshape`); any other use of a computed size fixes the
axes it was read from.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from ..propagator import Propagator
from .registry import canonical

__all__ = ["SIZE_ARITHMETIC", "SIZED_RESHAPE", "NON_TENSOR", "size_source", "size_arithmetic"]

#: Python arithmetic on sizes read off axes (see :func:`size_arithmetic`)
SIZE_ARITHMETIC = {"floordiv", "truediv", "mul", "add", "sub", "mod", "pow", "neg", "ceil", "floor", "sym_float"}
#: reshapes given sizes, which check a computed size (:func:`elasticize.graph.ops.shape.reshape`)
SIZED_RESHAPE = ("view", "reshape", "_unsafe_view")
#: ops whose value is not a tensor, which the analysis passes by (``getattr`` of ``T``, ``mT`` or ``data`` excepted)
NON_TENSOR = {"size", "dim", "numel", "getattr", "_assert", "sym_size", "_assert_async", "_assert_tensor_metadata"}


def size_source(p: Propagator, a: Any) -> int | None:
    """The slot whose size the non-tensor value ``a`` reads (``x.shape[i]``, ``x.size(i)``), or None."""
    if not isinstance(a, fx.Node) or p.is_tensor(a):
        return None
    name, args = canonical(a), a.args
    if name == "getitem" and isinstance(args[0], fx.Node) and isinstance(args[1], int):
        src, n = args[0], canonical(args[0])
        if not ((n == "getattr" and src.args[1] == "shape") or (n == "size" and len(src.args) == 1)):
            return None
        x, i = p.env.get(src.args[0]), args[1]
    elif name in ("size", "sym_size") and len(args) > 1 and isinstance(args[1], int):
        x, i = p.env.get(args[0]), args[1]
    else:
        return None
    return x[i] if isinstance(x, tuple) and -len(x) <= i < len(x) else None


def size_arithmetic(p: Propagator, node: fx.Node, name: str) -> None:
    """Python arithmetic on sizes read off tensor axes (``D // heads``, ``C * H * W``).

    The axes it reads are recorded (``size_expr``). The computed size may reach a reshape,
    which checks it (:func:`elasticize.graph.ops.shape.reshape`), or more arithmetic; any other use fixes
    the axes it was read from, since nothing tells how that use would follow a smaller axis.
    """
    src: set[int] = set()
    for a in node.args:
        s = size_source(p, a)
        if s is not None:
            src.add(s)
        elif isinstance(a, fx.Node) and a in p.size_expr:
            src |= p.size_expr[a]
    if not src:
        return
    p.size_expr[node] = src
    for u in node.users:
        if canonical(u) not in SIZE_ARITHMETIC and canonical(u) not in SIZED_RESHAPE:
            for s in src:
                p.c.fix(s, f"its size is read, computed with ({name}) at {node.name} and used by {u.name}")

