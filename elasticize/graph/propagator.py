"""The propagation state: the slots of every node's value, and the helpers op handlers and rules share.

A tensor's *value* is a tuple with one slot per axis (see :mod:`elasticize.graph.coupling`);
a sequence of tensors is a list of values; anything else is None. The pass that fills
``env`` node by node is :func:`elasticize.graph.visit.propagate`.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx as fx
from torch import nn

from .coupling import Coupling
from .macs import MacTerm
from .results import StageInfo, model_tensors

__all__ = ["Propagator", "Value"]

Value = Any  # tuple[int, ...] for a tensor, list of Values for a sequence, None otherwise


class Propagator:
    """What the analysis knows about a traced graph while it visits the nodes.

    Attributes:
        root: the model.
        graph: the traced graph.
        param_of: placeholder name -> fqn of a parameter or buffer (``torch.export`` graphs).
        c: the coupling (union-find over slots).
        env: node -> its value.
        state: every tensor of the model by name (:func:`elasticize.graph.model_tensors`).
        persistent: names of the tensors in the model's state dict.
        mac_terms: the MAC terms recorded so far (whole example batch).
        sites: module path -> name of the rule that analysed it.
        not_elastic: ``(what, reason)`` for everything kept whole.
        layer_stages: depth stages that rules declared inside one module (``SiteContext.layers``).
        bound_attrs: ``(module, attribute)`` -> slot, for literal reshape sizes that follow a width attribute.
        size_expr: a size computed from axes -> the slots it was read from.
        batch: the example batch size.
    """

    def __init__(self, root: nn.Module, graph: fx.Graph, param_of: dict[str, str]) -> None:
        self.root = root
        self.graph = graph
        self.param_of = param_of  # placeholder name -> fqn (export path)
        self.c = Coupling()
        self.env: dict[fx.Node, Value] = {}
        self.state = model_tensors(root)
        self.persistent = set(root.state_dict(keep_vars=True))
        self.mac_terms: list[MacTerm] = []
        self.sites: dict[str, str] = {}
        self.not_elastic: list[tuple[str, str]] = []
        self.layer_stages: list[StageInfo] = []
        self.bound_attrs: dict[tuple[str, str], int] = {}  # (module, attribute) -> slot, see ops.shape
        self.size_expr: dict[fx.Node, set[int]] = {}  # see ops.sizes.size_arithmetic
        self.batch = 1

    def shape(self, node: Any) -> tuple[int, ...]:
        """Shape of ``node``'s tensor on the example inputs; ``()`` for anything else."""
        if not isinstance(node, fx.Node):
            return ()
        tm = node.meta.get("tensor_meta")
        if tm is not None and hasattr(tm, "shape"):
            return tuple(int(s) for s in tm.shape)
        v = node.meta.get("val")
        if isinstance(v, torch.Tensor):
            return tuple(int(s) for s in v.shape)
        return ()

    def is_tensor(self, node: Any) -> bool:
        """Whether ``node`` is an fx node whose value is one tensor."""
        if not isinstance(node, fx.Node):
            return False
        tm = node.meta.get("tensor_meta")
        if tm is not None:
            return hasattr(tm, "shape")
        return isinstance(node.meta.get("val"), torch.Tensor)

    def tensor_slots(self, fqn: str) -> tuple[int, ...] | None:
        """Slots of the model's tensor ``fqn`` (made on first use, ``size // chunks`` per chunked axis), or None."""
        t = self.state.get(fqn)
        if t is None:
            return None
        out = []
        for ax, n in enumerate(t.shape):
            key = (fqn, ax)
            s = self.c.tensor_slot.get(key)
            if s is None:
                s = self.c.tensor_slot[key] = self.c.new(n // self.c.chunks.get(key, 1))
            out.append(s)
        return tuple(out)

    def val(self, a: Any) -> Value:
        """The value of an argument: a node's, a list for a sequence, None for a constant."""
        if isinstance(a, fx.Node):
            return self.env.get(a)
        if isinstance(a, (list, tuple)):
            return [self.val(x) for x in a]
        return None

    def fix_value(self, v: Value, reason: str) -> None:
        """Fix every slot of ``v`` with ``reason``."""
        if v is None:
            return
        if isinstance(v, tuple):
            for s in v:
                self.c.fix(s, reason)
        elif isinstance(v, list):
            for x in v:
                self.fix_value(x, reason)

    def fresh(self, node: fx.Node, reason: str | None) -> Value:
        """New slots shaped like ``node``'s output, fixed with ``reason`` unless it is None."""
        meta = node.meta.get("tensor_meta", node.meta.get("val"))
        return self.fresh_from(meta, reason)

    def fresh_from(self, meta: Any, reason: str | None) -> Value:
        """New slots shaped like ``meta`` (a tensor's metadata, or a sequence of them)."""
        if meta is None:
            return None
        if hasattr(meta, "shape"):
            return tuple(self.c.new(int(n), reason) for n in meta.shape)
        if isinstance(meta, (list, tuple)):
            return [self.fresh_from(m, reason) for m in meta]
        return None

    def unsupported(self, node: fx.Node, what: str) -> Value:
        """Fix ``node``'s inputs (reason: ``what`` at the node) and return fixed output slots."""
        reason = f"{what} at {node.name}"
        for a in node.all_input_nodes:
            self.fix_value(self.env.get(a), reason)
        return self.fresh(node, reason)

    def add_macs(self, owner: str, macs: int, factors: Sequence[int]) -> None:
        """Record a :class:`MacTerm`: ``macs`` for the whole example batch, scaled by the ``factors`` slots."""
        self.mac_terms.append(MacTerm(owner, int(macs), list(factors)))

    def owner(self, node: Any) -> str:
        """The module that owns the parameter node ``node`` (its fqn's parent path), or ``""``."""
        fqn = self.param_of.get(node.name) if isinstance(node, fx.Node) and node.op == "placeholder" else None
        if fqn is None and isinstance(node, fx.Node) and node.op == "get_attr":
            fqn = str(node.target)
        return fqn.rsplit(".", 1)[0] if fqn and "." in fqn else ""

    def op_owner(self, node: fx.Node) -> str:
        """The module whose forward ran ``node`` (from the tracer's ``nn_module_stack``), or ``""`` at the root."""
        stack = node.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else ""
        return path if isinstance(path, str) else ""

    def is_param(self, node: Any) -> bool:
        """Whether ``node`` is one of the model's own tensors (``get_attr``, or an export placeholder for one)."""
        return isinstance(node, fx.Node) and (node.op == "get_attr" or node.name in self.param_of)
