"""The propagation pass: every node of the traced graph, in order, gets its value (its output's slots).

Parameters and buffers get their tensors' slots; model inputs and outputs are fixed; a
module call goes to the rule that handles it (:class:`elasticize.graph.SiteContext`), or
is kept whole with the reason; an op goes to its handler in the op table
(:func:`elasticize.graph.ops.registered_ops`), or fixes its axes as unsupported.
"""

from __future__ import annotations

from typing import Any, Callable

import torch.fx as fx
from torch import nn

from .context import SiteContext
from .ops import canonical, handler_for
from .ops.audit import FIXED
from .ops.sizes import NON_TENSOR, SIZE_ARITHMETIC, size_arithmetic
from .propagator import Propagator, Value

__all__ = ["propagate"]


def propagate(p: Propagator, find_rule: Callable[[nn.Module], Any], forced: dict[str, str]) -> None:
    """Fill ``p.env`` for every node of ``p.graph``; an error in one node makes it unsupported, with the error.

    Args:
        p: the propagation state.
        find_rule: maps a module to the rule that handles it, or None.
        forced: path -> reason, for the modules the tracer could not enter (kept whole).
    """
    for node in p.graph.nodes:
        try:
            p.env[node] = _visit(p, node, find_rule, forced)
        except Exception as e:  # noqa: BLE001 - an op we misread must not abort the analysis
            p.env[node] = p.unsupported(node, f"analysis error {type(e).__name__}: {e}")


def _visit(p: Propagator, node: fx.Node, find_rule: Callable[[nn.Module], Any], forced: dict[str, str]) -> Value:
    op = node.op
    if op == "placeholder":
        fqn = p.param_of.get(node.name)
        if fqn is not None:
            return p.tensor_slots(fqn)
        return p.fresh(node, "model input")
    if op == "get_attr":
        slots = p.tensor_slots(str(node.target))
        return slots if slots is not None else p.fresh(node, f"constant tensor {node.target}")
    if op == "output":
        p.fix_value(p.val(node.args[0]), "model output")
        return None
    if op == "call_module":
        return _visit_module(p, node, find_rule, forced)
    return _visit_op(p, node)


def _visit_module(p: Propagator, node: fx.Node, find_rule: Callable[[nn.Module], Any],
                  forced: dict[str, str]) -> Value:
    path = str(node.target)
    module = p.root.get_submodule(path)
    rule = find_rule(module)
    if rule is None or path in forced:
        reason = forced.get(path) or f"no rule for {type(module).__name__}"
        p.not_elastic.append((path, reason))
        if node.meta.get("leaf_macs"):  # kept whole, but counted (and dropped with a skipped block)
            p.add_macs(path, node.meta["leaf_macs"], [])
        return p.unsupported(node, f"{reason} in {path}")
    inputs = [p.val(a) for a in node.args]
    ctx = SiteContext(p, path, module, node)
    out = rule.analyze(ctx, *inputs)
    p.sites[path] = rule.name
    return out


def _visit_op(p: Propagator, node: fx.Node) -> Value:
    name = canonical(node)
    if name in SIZE_ARITHMETIC and not p.is_tensor(node):
        size_arithmetic(p, node, name)
        return None
    h = handler_for(name)
    if h is not None and h.any_value:  # getitem: of a list of tensors too
        return h.fn(p, node)
    if name in NON_TENSOR or not (p.is_tensor(node) or isinstance(node.meta.get("tensor_meta"), (list, tuple))
                                  or isinstance(node.meta.get("val"), (list, tuple))):
        if not (name == "getattr" and p.is_tensor(node)):  # a tensor attribute (``x.T``) has a handler
            return None
    if h is not None:
        return h.fn(p, node)
    if node.meta.get("leaf_macs"):  # a wrapped function: its MACs measured, its axes fixed
        p.add_macs(p.op_owner(node), node.meta["leaf_macs"], [])
    return p.unsupported(node, f"{name}: {FIXED[name]}" if name in FIXED else f"unsupported op {name}")
