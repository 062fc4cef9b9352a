"""Contractions: matmul, einsum and scaled dot-product attention.

The contracted axes of the operands are one coupling group; the output's batch axes are
the operands' broadcast together. Their MACs scale with every elastic axis they involve.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch.fx as fx

from ..propagator import Propagator, Value
from .registry import canonical, op
from .shape import broadcast

__all__: list[str] = []


def _batch_axes(p: Propagator, node: fx.Node, operands: Sequence[fx.Node]) -> tuple[int, ...]:
    """Slots of a matmul-like output's batch axes (all but the last two), broadcast from the operands'."""
    ins = [(v[:-2], p.shape(a)[:-2]) for a in operands if isinstance(v := p.env.get(a), tuple)]
    return broadcast(p, p.shape(node)[:-2], ins)


@op("matmul", "mm", "bmm")
def matmul(p: Propagator, node: fx.Node) -> Value:
    """``(..., n, k) @ (..., k, m)`` (``a @ b``, ``torch.matmul``, ``mm``, ``bmm``; both operands at least 2-D):
    the two ``k`` axes join, the batch axes broadcast.

    The contracted axes are one coupling group; a 2-D parameter on the right (``x @ W``) produces its
    columns like a linear layer's outputs; MACs ``prod(out) * k`` scale with every elastic axis.
    """
    a, b = node.args[0], node.args[1]
    va, vb = p.env.get(a), p.env.get(b)
    if not (isinstance(va, tuple) and isinstance(vb, tuple) and len(va) >= 2 and len(vb) >= 2):
        return p.unsupported(node, f"{canonical(node)} of a 1-D or untracked operand")
    out_shape = p.shape(node)
    k = p.c.union(va[-1], vb[-2])
    if p.is_param(b) and len(vb) == 2:
        p.c.producer.add(vb[-1])  # x @ W: W's columns are output features, as in a linear layer
    out = (*_batch_axes(p, node, (a, b)), va[-2], vb[-1])
    p.add_macs(p.op_owner(node), math.prod(out_shape) * p.c.size[k], [*out, k])
    return out


@op("einsum")
def einsum(p: Propagator, node: fx.Node) -> Value:
    """``torch.einsum`` of one or two operands, explicit output, no ellipsis (``"bhid,bhjd->bhij"``):
    axes that share a letter join.

    Axes that share a letter are one coupling group (an operand's size-1 axis broadcasts and
    joins nothing); a letter of a 2-D parameter that only it and the output carry is produced
    there, like a linear layer's outputs (``"btd,df->btf"``). MACs of two operands: the
    product of every letter's size, scaled by each elastic letter (as ``FlopCounterMode``
    counts the contraction as one batched matmul).
    """
    eq, ops = node.args[0], node.args[1:]
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = tuple(ops[0])
    if not isinstance(eq, str) or "..." in eq or "->" not in eq or not 1 <= len(ops) <= 2:
        return p.unsupported(node, "einsum with an ellipsis, an implicit output or more than two operands")
    lhs, rhs = eq.replace(" ", "").split("->")
    subs = lhs.split(",")
    vals = [p.env.get(o) for o in ops]
    if len(subs) != len(ops) or not all(isinstance(v, tuple) and len(v) == len(sub) for v, sub in zip(vals, subs)):
        return p.unsupported(node, "einsum of an untracked operand")
    letter: dict[str, int] = {}
    for o, v, sub in zip(ops, vals, subs):
        shp = p.shape(o)
        for ch, slot, n in zip(sub, v, shp):
            if n == 1 and any(ch in other for other in subs if other is not sub):
                continue  # broadcast
            letter[ch] = slot if ch not in letter else p.c.union(letter[ch], slot)
    out_shape = p.shape(node)
    out = tuple(letter.get(ch) if letter.get(ch) is not None else p.c.new(n) for ch, n in zip(rhs, out_shape))
    if len(ops) == 2:
        for o, v, sub, other in ((ops[0], vals[0], subs[0], subs[1]), (ops[1], vals[1], subs[1], subs[0])):
            if p.is_param(o) and len(sub) == 2:
                for ch, slot in zip(sub, v):
                    if ch in rhs and ch not in other:
                        p.c.producer.add(slot)
        size = p.c.size
        p.add_macs(p.op_owner(node), math.prod(size[s] for s in letter.values()), list(letter.values()))
    return out


@op("scaled_dot_product_attention")
def scaled_dot_product_attention(p: Propagator, node: fx.Node) -> Value:
    """``F.scaled_dot_product_attention(q, k, v)``: q ``(..., L, E)``, k ``(..., S, E)``, v ``(..., S, Ev)``;
    q's and k's ``E`` join, k's and v's ``S`` join.

    Output ``(..., L, Ev)``; MACs ``prod(batch) * L * S * (E + Ev)`` (the two matmuls), as FlopCounterMode counts.
    """
    q, k, v = node.args[:3]
    vq, vk, vv = (p.env.get(t) for t in (q, k, v))
    if not all(isinstance(t, tuple) and len(t) >= 2 for t in (vq, vk, vv)):
        return p.unsupported(node, "scaled_dot_product_attention of an untracked operand")
    out_shape = p.shape(node)
    e = p.c.union(vq[-1], vk[-1])
    s = p.c.union(vk[-2], vv[-2])
    out = (*_batch_axes(p, node, (q, k, v)), vq[-2], vv[-1])
    batch = math.prod(out_shape[:-2])
    size = p.c.size
    owner = p.op_owner(node)
    p.add_macs(owner, batch * size[vq[-2]] * size[s] * size[e], [*out[:-1], s, e])
    p.add_macs(owner, batch * size[vq[-2]] * size[s] * size[vv[-1]], [*out, s])
    return out
