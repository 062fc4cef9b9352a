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

import torch
from torch import nn

from .plan import Plan

__all__ = ["magnitude_importance", "sort_by_importance"]


def _members(plan: Plan) -> dict[str, list[tuple[str, int, int]]]:
    out: dict[str, list[tuple[str, int, int]]] = {g["name"]: [] for g in plan.groups}
    for fqn, info in plan.tensors.items():
        for ax, (g, chunks) in info["axes"].items():
            out[g].append((fqn, int(ax), int(chunks)))
    return out


@torch.no_grad()
def magnitude_importance(model: nn.Module, plan: Plan) -> dict[str, torch.Tensor]:
    """Importance of each unit of each group.

    Returns:
        group name -> tensor of shape ``(size // unit,)``, larger is more important.
    """
    state = model.state_dict(keep_vars=True)
    scores: dict[str, torch.Tensor] = {}
    for g in plan.groups:
        size, unit = g["size"], g["unit"]
        members = _members(plan)[g["name"]]
        use = [m for m in members if state[m[0]].dim() >= 2] or members
        score = torch.zeros(size, dtype=torch.float64)
        for fqn, ax, chunks in use:
            t = state[fqn].detach().to(torch.float64)
            t = t.movedim(ax, 0).reshape(chunks, size, -1)
            score += t.pow(2).sum(dim=(0, 2)).sqrt()
        scores[g["name"]] = score.view(size // unit, unit).sum(1)
    return scores


@torch.no_grad()
def sort_by_importance(model: nn.Module, plan: Plan, scores: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """Permute every group's units in place, most important first (function-preserving).

    Args:
        model: the model, before :func:`elasticize.plan.apply_plan`.
        plan: its plan.
        scores: group -> importance per unit, e.g. from :func:`magnitude_importance`.

    Returns:
        group -> the permutation applied (new position -> old unit index).
    """
    state = model.state_dict(keep_vars=True)
    perms: dict[str, list[int]] = {}
    members = _members(plan)
    done: set[tuple[int, int]] = set()  # tied tensors appear under several names: permute once
    for g in plan.groups:
        size, unit = g["size"], g["unit"]
        perm = torch.argsort(scores[g["name"]], descending=True, stable=True)
        perms[g["name"]] = perm.tolist()
        idx = (perm[:, None] * unit + torch.arange(unit)).reshape(-1)
        for fqn, ax, chunks in members[g["name"]]:
            t = state[fqn]
            if (id(t), ax) in done:
                continue
            done.add((id(t), ax))
            full = torch.cat([idx + k * size for k in range(chunks)]).to(t.device)
            t.data.copy_(t.data.index_select(ax, full))
    return perms
