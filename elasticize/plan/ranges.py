"""Prefix ranges: which ``[start, stop)`` ranges of each tensor a sub-network uses, and cutting them.

The arithmetic is :func:`elasticize.modules.axis_ranges`, which the forward's sliced views use too.
"""

from __future__ import annotations

import torch

from ..modules import SegmentState, axis_ranges, cut_axis
from .apply import ElasticState, axis_state
from .core import Plan

__all__ = ["tensor_ranges", "slice_ranges"]


def tensor_ranges(plan: Plan, state: ElasticState, fqn: str) -> list[list[tuple[int, int]]] | None:
    """Per axis, the ``[start, stop)`` ranges of ``fqn`` that the active sub-network uses.

    Returns None when the tensor is not elastic (the whole tensor is used).
    """
    info = plan.tensors.get(fqn)
    if info is None or not info.axes:
        return None
    out: list[list[tuple[int, int]]] = []
    for ax, n in enumerate(info.shape):
        a = info.axes.get(ax)
        if a is None:
            out.append([(0, n)])
            continue
        g, chunks, div = axis_state(a, state.groups)
        out.append(list(g.ranges() if isinstance(g, SegmentState) else axis_ranges(g.size, g.active, chunks, div)))
    return out


def slice_ranges(t: torch.Tensor, ranges: list[list[tuple[int, int]]] | None) -> torch.Tensor:
    """``t`` cut to ``ranges`` (as from :func:`tensor_ranges`); a new contiguous tensor."""
    if ranges is None:
        return t.detach().clone()
    for ax, rs in enumerate(ranges):
        if len(rs) == 1:
            a, b = rs[0]
            if a == 0 and b == t.shape[ax]:
                continue
        t = cut_axis(t, ax, rs)
    return t.detach().clone().contiguous()
