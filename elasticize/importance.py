"""Importance per coupling group, and the permutation that puts the most important first.

Nested sub-networks keep a prefix of every group, so the order of channels and heads
decides what a small sub-network keeps. Before any training, each group is permuted
once so that its most important units come first. The permutation is applied to every
member of the group (producers' output rows, consumers' input columns, norms' per-channel
tensors and statistics, per-channel parameters such as layer scales and position
embeddings), so the model computes exactly what it did: the largest sub-network is still
the original (SortedNet, arXiv 2309.00255, Section 3.1, sorts by importance so that
truncation keeps what matters).

Data-free magnitude importance: for a unit (channel, or head of ``head_dim`` channels),
the L2 norm of every weight slice that reads or writes it, over the group's members with
two or more axes (convolution and linear weights, embeddings), summed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .plan import Plan, axis_entry

__all__ = ["magnitude_importance", "sort_by_importance", "sort_unit"]


def _members(plan: Plan) -> dict[str, list[tuple[str, int, int, int]]]:
    out: dict[str, list[tuple[str, int, int, int]]] = {g["name"]: [] for g in plan.groups}
    for fqn, info in plan.tensors.items():
        for ax, a in info["axes"].items():
            g, chunks, div = axis_entry(a)
            out[g].append((fqn, int(ax), chunks, div))
    return out


def sort_unit(group: dict[str, Any]) -> int:
    """Channels that move together when a group is sorted: ``unit * step``.

    ``step`` (default 1) is the number of units that must be kept together, e.g. the query
    heads that share one key/value head in grouped-query attention.
    """
    return int(group["unit"]) * int(group.get("step", 1))


@torch.no_grad()
def magnitude_importance(model: nn.Module, plan: Plan) -> dict[str, torch.Tensor]:
    """Importance of each unit of each group.

    Returns:
        group name -> tensor of shape ``(size // sort_unit,)`` (see :func:`sort_unit`), larger is
        more important.
    """
    state = model.state_dict(keep_vars=True)
    scores: dict[str, torch.Tensor] = {}
    members = _members(plan)
    for g in plan.groups:
        n = g["size"] // sort_unit(g)
        use = [m for m in members[g["name"]] if state[m[0]].dim() >= 2] or members[g["name"]]
        score = torch.zeros(n, dtype=torch.float64)
        for fqn, ax, chunks, div in use:
            t = state[fqn].detach().float().movedim(ax, 0).reshape(chunks, n, -1)
            score += torch.linalg.vector_norm(t, dim=(0, 2)).double()
        scores[g["name"]] = score
    return scores


@torch.no_grad()
def sort_by_importance(model: nn.Module, plan: Plan, scores: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """Permute every group's units in place, most important first (function-preserving).

    Args:
        model: the model, before :func:`elasticize.plan.apply_plan`.
        plan: its plan.
        scores: group -> importance per sort unit, e.g. from :func:`magnitude_importance`.

    Groups with ``"sort": False`` in the plan keep their order.

    Returns:
        group -> the permutation applied (new position -> old unit index).
    """
    state = model.state_dict(keep_vars=True)
    perms: dict[str, list[int]] = {}
    members = _members(plan)
    done: set[tuple[int, int]] = set()  # tied tensors appear under several names: permute once
    for g in plan.groups:
        if not g.get("sort", True):  # e.g. a residual stream that is the model's output
            continue
        unit = sort_unit(g)
        perm = torch.argsort(scores[g["name"]], descending=True, stable=True)
        perms[g["name"]] = perm.tolist()
        for fqn, ax, chunks, div in members[g["name"]]:
            t = state[fqn]
            if (id(t), ax) in done:
                continue
            done.add((id(t), ax))
            u, size = unit // div, g["size"] // div
            idx = (perm[:, None] * u + torch.arange(u)).reshape(-1)
            full = torch.cat([idx + k * size for k in range(chunks)]).to(t.device)
            t.data.copy_(t.data.index_select(ax, full))
    return perms
