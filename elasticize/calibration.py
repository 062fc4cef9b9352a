"""Bias compensation: the mean contribution of removed channels, added to the consumer's bias.

When a width or heads group of a super-network is cut to a choice, the layer that *consumes* the
group's channels (a ``nn.Linear`` or ``nn.Conv*d`` whose input axis is the group) loses their
contribution. FLAP (An et al., "Fluctuation-based Adaptive Structured Pruning for Large Language
Models", AAAI 2024, arXiv 2312.11983, Eq. 5) recovers it without retraining: replace each removed
input channel ``j`` by its mean ``mu_j`` over calibration data, which is the same as adding

    b' = b + W[:, R] @ mu[R]                 (Linear, W of shape (out, in))
    b' = b + sum_{kh,kw} W[:, R, kh, kw] @ mu[R]   (Conv, ignoring the zero padding at the borders)

to the consumer's bias, where ``R`` is the set of removed input channels. The means are taken
once, on the *full* network (:func:`consumer_means`), so the compensation of any sub-network is one
matrix-vector product per consumer (:func:`compensated_biases`); at the full network nothing is
removed and nothing changes.

A group is compensated only when every tensor that carries its axis belongs to a ``Linear``, an
ungrouped ``Conv`` or a ``BatchNorm`` layer (per-channel, so a removed channel changes nothing else);
a group that also reaches a LayerNorm or an embedding is not, nor a consumer without a bias (Llama's
``o_proj`` / ``down_proj``): :func:`consumers` says why for each one left out.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .plan import KIND_DIM, Plan, tensor_ranges

__all__ = ["Consumer", "Compensation", "consumers", "consumer_means", "compensated_biases", "compensated"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class Consumer:
    """A layer whose input channels are a width or heads group.

    Attributes:
        weight: the layer's weight name (``model.state_dict()`` names), ``(out, in, *kernel)``.
        bias: its bias name, or None when the layer has none (then it cannot be compensated).
        group: the group on the weight's input axis (the first, where that axis is a concatenation of groups).
    """

    weight: str
    bias: str | None
    group: str


@dataclass
class Compensation:
    """An elastic model's bias compensation state.

    Attributes:
        means: consumer weight name -> mean input per input channel on calibration data ``(in,)``,
            taken on the full network (:func:`consumer_means`); empty for a model never calibrated.
        presets: preset name -> bias name -> the preset's compensated dense bias ``(out,)``.
        skipped: consumer weight name -> why it is not compensated (no bias, shared axis...).
    """

    means: dict[str, torch.Tensor] = field(default_factory=dict)
    presets: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def _module(model: nn.Module, fqn: str) -> nn.Module | None:
    path = fqn.rpartition(".")[0]
    try:
        return model.get_submodule(path) if path else model
    except AttributeError:
        return None


def consumers(model: nn.Module, plan: Plan) -> tuple[list[Consumer], dict[str, str]]:
    """The compensable consumers of the plan's width and heads groups, and why others are not.

    Returns:
        ``(consumers, skipped)``: skipped maps a consumer weight name (or a group name) to the reason.
    """
    kinds = {g.name: KIND_DIM.get(g.kind, "width") for g in plan.groups}
    bad: dict[str, str] = {}
    found: list[tuple[str, tuple[str, ...]]] = []
    for fqn, info in plan.tensors.items():
        mod = _module(model, fqn)
        for ax, entry in info.axes.items():
            groups = tuple(g for g in entry.groups if kinds.get(g) in ("width", "heads"))  # a concatenation: several
            if not groups:
                continue
            ok = isinstance(mod, nn.Linear) or isinstance(mod, _BatchNorm) or \
                (isinstance(mod, _CONV) and getattr(mod, "groups", 1) == 1)
            if not ok:
                for group in groups:
                    bad.setdefault(group, f"its channels also reach {type(mod).__name__} {fqn!r}")
            elif ax == 1 and fqn.endswith(".weight") and not isinstance(mod, _BatchNorm):
                found.append((fqn, groups))
    out, skipped = [], dict(bad)
    for w, groups in found:
        if any(g in bad for g in groups):
            continue
        group = groups[0]
        b = w[: -len("weight")] + "bias"
        if b not in plan.tensors or any(b.endswith(f".{t}") for sw in plan.switchable.values() for t in sw.tensors):
            skipped[w] = "the layer has no bias to add the compensation to"
            continue
        out.append(Consumer(w, b, group))
    return out, skipped


def consumer_means(model: nn.Module, plan: Plan, batches: Iterable[Any],
                   forward: Callable[[nn.Module, Any], Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Mean input per input channel of every compensable consumer, over ``batches``, at the active sub-network.

    Run it at the full network. Linear inputs ``(..., in)`` are averaged over every leading axis
    (tokens included), convolution inputs ``(batch, in, *spatial)`` over batch and positions.

    Returns:
        ``(consumer weight name -> mean (in,) in float32, skipped consumer -> reason)``.

    Raises:
        ValueError: ``batches`` yields no batch.
    """
    found, skipped = consumers(model, plan)
    sums: dict[str, list[Any]] = {c.weight: [0.0, 0] for c in found}
    hooks = []

    def hook(name: str, conv: bool) -> Callable[..., None]:
        def pre(_mod: nn.Module, args: tuple) -> None:
            x = args[0].detach().float()
            x = x.transpose(0, 1).reshape(x.shape[1], -1) if conv else x.reshape(-1, x.shape[-1]).t()
            sums[name][0] = sums[name][0] + x.sum(1)
            sums[name][1] += x.shape[1]
        return pre

    for c in found:
        mod = _module(model, c.weight)
        hooks.append(mod.register_forward_pre_hook(hook(c.weight, isinstance(mod, _CONV))))  # type: ignore[union-attr]
    n = 0
    try:
        with torch.no_grad():
            for b in batches:
                forward(model, b)
                n += 1
    finally:
        for h in hooks:
            h.remove()
    if n == 0:
        raise ValueError("no batch to take bias compensation means on: the calibration data is empty")
    return {w: (s / max(k, 1)).cpu() for w, (s, k) in sums.items() if k}, skipped


def compensated_biases(model: nn.Module, plan: Plan, state: Any, space: Any, cfg: Mapping[str, Any],
                       means: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The compensated dense bias of every consumer that loses input channels at ``cfg`` (FLAP, Eq. 5).

    Args:
        model: the elastic (or original) model, whose ``state_dict`` holds the full weights.
        plan: its plan.
        state: an :class:`~elasticize.plan.ElasticState` set to ``cfg``.
        space: its search space.
        cfg: the resolved sub-network.
        means: :attr:`Compensation.means`.

    Returns:
        bias name -> ``b[:out] + (W[:out, R] @ mu[R])`` with ``out`` the active output size, ``(out,)``,
        for consumers whose output channels are a prefix (every width group's); empty at the full network.
    """
    params = dict(model.named_parameters())
    found, _ = consumers(model, plan)
    out: dict[str, torch.Tensor] = {}
    for c in found:
        mu = means.get(c.weight)
        if mu is None or c.bias is None or not space.kept_tensor(c.weight, cfg):
            continue
        ranges = tensor_ranges(plan, state, c.weight)
        w = params[c.weight].detach()
        keep = torch.zeros(w.shape[1], dtype=torch.bool)
        for a, b in (ranges[1] if ranges else [(0, w.shape[1])]):
            keep[a:b] = True
        if bool(keep.all()):
            continue
        removed = ~keep
        wr = w[:, removed.to(w.device)].float()
        if wr.dim() > 2:
            wr = wr.sum(dim=tuple(range(2, wr.dim())))
        delta = wr @ mu.to(wr.device)[removed.to(wr.device)]
        b_ranges = tensor_ranges(plan, state, c.bias)
        n = w.shape[0] if not b_ranges else b_ranges[0][0][1]
        if b_ranges and (len(b_ranges[0]) != 1 or b_ranges[0][0][0] != 0):
            continue  # not a prefix: leave it
        bias = params[c.bias].detach()
        out[c.bias] = (bias.float()[:n] + delta[:n]).to(bias.dtype)
    return out


@contextlib.contextmanager
def compensated(model: nn.Module, tables: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Context manager: the leading entries of each named parameter or buffer hold ``tables``' values inside.

    Args:
        model: the module.
        tables: name -> dense values ``(n,)``, written into the first ``n`` entries.
    """
    named = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    saved = {}
    with torch.no_grad():
        for fqn, t in tables.items():
            saved[fqn] = named[fqn].detach().clone()
            named[fqn][: t.shape[0]].copy_(t)
    try:
        yield
    finally:
        with torch.no_grad():
            for fqn, t in saved.items():
                named[fqn].copy_(t)


def preset_biases(model: nn.Module, plan: Plan, space: Any, presets: Mapping[str, Mapping[str, Any]],
                  means: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """:func:`compensated_biases` of every preset (``presets``: name -> resolved config); presets that
    lose no consumer input are left out."""
    from .fileformat.manifest import live_state

    out = {}
    for name, cfg in presets.items():
        table = compensated_biases(model, plan, live_state(plan, space, cfg), space, cfg, means)
        if table:
            out[name] = table
    return out
