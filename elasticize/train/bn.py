"""BN recalibration: each preset's own BatchNorm running statistics, from a few training batches.

A BatchNorm layer shared by nested sub-networks sees different activation statistics in
each of them, so the running mean/variance accumulated during sorted training fit none of
them well. BN recalibration (Yu & Huang, Universally Slimmable Networks, 2019, Section 3.3;
SortedNet Table 1 trains BatchNorm models) recomputes them per sub-network: reset the
statistics, run a few batches through the sub-network in training mode without gradients,
keep the cumulative averages. Nothing else changes: weights, biases and every other buffer
are left as they were (tested).

The calibrated statistics are kept per preset in :attr:`ElasticModel.bn_stats`, installed
when that preset is set, and written to the same safetensors file by :func:`elasticize.save`
(format version 2), where :func:`elasticize.load_subnet` and ``extract`` use them.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..model import ElasticModel
from ..modules import SWITCH_PREFIX
from .losses import forward_batch, to_device

__all__ = ["recalibrate_bn", "batchnorm_layers"]

_STATS = ("running_mean", "running_var")


def batchnorm_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """``(path, module)`` of every BatchNorm layer that tracks running statistics."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def _source(path: str, bn: nn.Module, name: str) -> str:
    """The buffer the active sub-network reads for ``name`` (switchable BN reads ``elastic_skip_<name>``)."""
    switch = bn.__dict__.get("_el_switch")
    if switch is not None and name in switch[1] and switch[0].skip:
        name = SWITCH_PREFIX + name
    return f"{path}.{name}" if path else name


def recalibrate_bn(em: ElasticModel, data: Iterable[Any], *, presets: Sequence[str] | None = None,
                   num_batches: int = 8, device: torch.device | str | None = None,
                   forward: Callable[[nn.Module, Any], Any] = forward_batch) -> dict[str, dict[str, torch.Tensor]]:
    """Recompute BatchNorm running statistics for each preset and install them in ``em``.

    Args:
        em: the elastic model (its weights are not changed).
        data: batches (tensor, ``(x, y)`` or mapping, see :mod:`elasticize.train.losses`),
            e.g. the training loader; the first ``num_batches`` are used for every preset.
        presets: preset names (default: all of ``em.presets``).
        num_batches: batches per preset.
        device: where to run (default: the model's device).
        forward: ``(model, batch) -> output``.

    Returns:
        preset -> buffer name -> calibrated dense statistics ``(channels,)``, also set as
        ``em.bn_stats`` (empty when the model has no BatchNorm). Under ``torch.distributed`` the
        statistics are averaged over ranks, so every rank holds the same values.

    Raises:
        ValueError: ``num_batches < 1`` or ``data`` yields no batch.
        KeyError: an unknown preset.
    """
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    names = list(em.presets) if presets is None else list(presets)
    for n in names:
        em.resolve(n)
    layers = batchnorm_layers(em.model)
    em.set_bn_stats({})
    if not layers:
        return {}
    batches = list(itertools.islice(iter(data), num_batches))
    if not batches:
        raise ValueError("no batch to recalibrate BatchNorm with: the data is empty")
    if device is None:
        device = next(em.parameters()).device
    raw = {f"{p}.{b}" if p else b: t for p, m in layers for b, t in m._buffers.items() if t is not None}
    saved = {k: t.clone() for k, t in raw.items()}
    momenta = [m.momentum for _, m in layers]
    was_training, previous = em.training, em.active
    stats: dict[str, dict[str, torch.Tensor]] = {}
    try:
        em.eval()
        for _, m in layers:
            m.train()
            m.momentum = None  # cumulative moving average over the calibration batches
        with torch.no_grad():
            for name in names:
                for k, t in raw.items():
                    base = k.rsplit(".", 1)[-1].removeprefix(SWITCH_PREFIX)
                    t.fill_(1 if base == "running_var" else 0)
                cfg = em.set_subnet(name)
                for b in batches:
                    forward(em, to_device(b, device))
                stats[name] = {}
                for path, m in layers:
                    if not em.space.kept(path, cfg):
                        continue
                    for s in _STATS:
                        stats[name][_source(path, m, s)] = getattr(m, s).detach().clone()
    finally:
        with torch.no_grad():
            for k, t in raw.items():
                t.copy_(saved[k])
        for (_, m), mom in zip(layers, momenta):
            m.momentum = mom
        em.train(was_training)
        em.set_subnet(previous)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for table in stats.values():
            for t in table.values():
                dist.all_reduce(t)
                t /= dist.get_world_size()
    em.set_bn_stats(stats)
    return stats
