"""The op table: which ops the analysis handles, and how a node's op and arguments are read.

A handler is a function ``handler(p, node) -> value`` over the propagation state ``p``
(:class:`elasticize.graph.propagator.Propagator`) registered under the canonical names of
the ops it handles with :func:`op`; the first paragraph of its docstring says how the op
couples axes, and :func:`registered_ops` lists the whole table. An op without a handler
fixes the axes of its inputs and outputs, with the reason ``unsupported op <name>``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.fx as fx

__all__ = ["OpHandler", "op", "handler_for", "registered_ops", "canonical", "call_args", "as_tuple"]

H = TypeVar("H", bound=Callable[..., Any])


@dataclass(frozen=True)
class OpHandler:
    """One row of the op table.

    Attributes:
        handler: the handler's qualified name, e.g. ``elasticize.graph.ops.shape.reshape``.
        couples: how the op couples axes (the first paragraph of the handler's docstring).
        any_value: the handler runs whatever the node's value is (``getitem`` of a list of
            tensors); otherwise only for a node whose value is a tensor or a sequence of tensors.
        fn: the handler, ``fn(p, node)``, returning the node's value (its output's slots).
    """

    handler: str
    couples: str
    any_value: bool
    fn: Callable[..., Any] = field(repr=False, compare=False)


_TABLE: dict[str, OpHandler] = {}


def op(*names: str, any_value: bool = False) -> Callable[[H], H]:
    """Function decorator: register the handler of the ops ``names`` (canonical names, see :func:`canonical`).

    Raises:
        ValueError: if no name is given, or a name already has a handler.
        TypeError: if the handler has no docstring (its first paragraph is the table's description).
    """
    if not names:
        raise ValueError("@op needs at least one op name")

    def deco(fn: H) -> H:
        doc = inspect.getdoc(fn)
        if not doc:
            raise TypeError(f"op handler {fn.__qualname__} needs a docstring saying how the op couples axes")
        row = OpHandler(f"{fn.__module__}.{fn.__qualname__}", " ".join(doc.split("\n\n")[0].split()), any_value, fn)
        for name in names:
            if name in _TABLE or names.count(name) > 1:
                taken = _TABLE[name].handler if name in _TABLE else row.handler
                raise ValueError(f"op {name!r} already has a handler ({taken}); an op has one handler")
        for name in names:
            _TABLE[name] = row
        return fn

    return deco


def handler_for(name: str) -> OpHandler | None:
    """The table's row for the canonical op name ``name``, or None if no handler is registered."""
    return _TABLE.get(name)


def registered_ops() -> dict[str, OpHandler]:
    """Every op the analysis handles: canonical name -> :class:`OpHandler`, sorted by name.

    Module calls are not ops: a module a rule handles is a leaf the rule analyses
    (:mod:`elasticize.rules`). Python arithmetic on sizes read off axes is followed apart
    (:mod:`elasticize.graph.ops.sizes`).
    """
    return dict(sorted(_TABLE.items()))


def canonical(node: fx.Node) -> str:
    """The op name a handler is keyed on: ``operator.add``, ``torch.add``, ``Tensor.add_`` and ``aten.add.Tensor`` all give ``add``."""
    t = node.target
    if node.op == "call_method":
        name = str(t)
    elif isinstance(t, torch._ops.OpOverload):
        name = t._schema.name.split("::")[-1]
    elif isinstance(t, torch._ops.OpOverloadPacket):
        name = t._qualified_op_name.split("::")[-1]
    else:
        name = getattr(t, "__name__", str(t))
    if name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
    if name.endswith("_") and not name.startswith("_") and name not in ("requires_grad_",):
        name = name[:-1]
    return {"matmul_": "matmul", "cat": "cat", "concat": "cat", "concatenate": "cat", "swapaxes": "transpose",
            "sym_size": "size", "gelu_": "gelu"}.get(name, name)


def call_args(node: fx.Node, names: Sequence[str]) -> list[Any]:
    """``node``'s arguments in the order of ``names``, given by position or by keyword (None if absent)."""
    return [node.args[i] if i < len(node.args) else node.kwargs.get(n) for i, n in enumerate(names)]


def as_tuple(x: Any) -> tuple:
    """An argument as a tuple: ``(2, 3)`` and ``[(2, 3)]`` give ``(2, 3)``; a scalar gives ``(x,)``."""
    if isinstance(x, (list, tuple)):
        if len(x) == 1 and isinstance(x[0], (list, tuple)):
            return tuple(x[0])
        return tuple(x)
    return (x,)
