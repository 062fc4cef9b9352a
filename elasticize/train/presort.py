"""Sorting a fresh super-network's units by activation importance on the training data, before training.

A file converted without data (``elasticize convert`` with no ``--calibrate``) has its units in
weight-magnitude order. Ranking them by their contribution on real inputs instead (FLAP's
fluctuation metric, An et al., AAAI 2024, Eq. 6; :func:`elasticize.importance.activation_importance`)
is function-preserving for the full network and gives the smaller sub-networks better units to start
from, as Minitron ranks units on calibration data before it distills (Muralidharan et al., arXiv 2407.14679). On the
bundled MiniLM (``benchmarks/bench_defaults.py``) it lifted the untrained ``large`` preset from 0.756
to 0.847 cosine to the original, and 300 steps of training from there end higher than from the
magnitude order.

``elasticize train`` does it by default (``sort="auto"``) on a file that is still as converted:
magnitude order, never trained or measured, no calibrated tensors. Re-ranking a trained file would
throw its smaller sub-networks' training away, so that is refused.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist

from ..batches import float_tensors, forward_batch, same_outputs, to_device
from ..importance import activation_importance, sort_by_importance

__all__ = ["SORTS", "presort_blocker", "sort_by_activation"]

#: ``sort=`` choices of :func:`elasticize.train.run.train_file` (``elasticize train --sort``): ``"auto"``
#: (activation order when :func:`presort_blocker` finds nothing against it, else keep), ``"activation"``
#: (always; an error when something is against it) and ``"keep"`` (never).
SORTS = ("auto", "activation", "keep")


def presort_blocker(em: Any) -> str | None:
    """Why ``em``'s units must not be re-ranked before training, or None when they may.

    A file may be re-ranked while it is as ``elasticize convert`` wrote it without data: weight-magnitude
    order (not activation order, and not ``--no-sort``), no training metrics, no ``elasticize eval``
    measurements, no BN statistics or bias compensation per preset, no switchable norms (whose second
    set of tensors the permutation does not reach).

    Args:
        em: the :class:`~elasticize.ElasticModel`, as loaded.

    Returns:
        The reason, a clause such as ``"it has been trained: its presets have measured metrics"``, or None.
    """
    order = em.importance.get("order")
    if order != "magnitude":
        return ("its units are already in activation order" if order == "activation" else
                "it keeps its channel order (converted with --no-sort)" if order is None and "order" in em.importance
                else "its importance order is not recorded")
    if any(em.metrics.get(p) for p in em.metrics):
        return "it has been trained: its presets have measured metrics"
    if em.measurements:
        return "it holds `elasticize eval` measurements"
    if em.bn_stats or em.compensation.means:
        return "it holds calibrated BN statistics or bias compensation"
    if em.plan.switchable:
        return "it has switchable norms (skippable depth)"
    return None


@torch.no_grad()
def sort_by_activation(em: Any, batches: Sequence[Any], *, device: Any = None, rtol: float = 1e-3) -> dict[str, list[int]]:
    """Permute ``em``'s units in place, most important on ``batches`` first (function-preserving).

    Under ``torch.distributed`` the importance is broadcast from process 0, so every process applies the
    same permutation whatever its batches.

    Args:
        em: an :class:`~elasticize.ElasticModel` (see :func:`presort_blocker` for when this is sound).
        batches: calibration batches as the trainer takes them (tensors, tuples or mappings of inputs).
        device: where to run them (default: the model's).
        rtol: largest change of the full network's output on the first batch, relative to its largest
            magnitude, that still counts as the same function (float32 sums in another order move it
            by ~1e-4 on MiniLM).

    Returns:
        group name -> the permutation applied (new position -> old unit index).

    Raises:
        ValueError: ``batches`` is empty, or the permutation changed the full network's output (it is
            undone first; a tensor outside the plan shares the channels).
    """
    if not batches:
        raise ValueError("sorting by activation importance needs calibration batches, and there are none")
    dev = device if device is not None else next(em.parameters()).device
    batches = [to_device(b, dev) for b in batches]
    was_training = em.training
    em.eval()
    try:
        with em.subnet(None):
            ref = float_tensors(forward_batch(em, batches[0]))
            scores = activation_importance(em.model, em.plan, batches)
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                for name in sorted(scores):
                    t = scores[name].to(dev)
                    dist.broadcast(t, src=0)
                    scores[name] = t.cpu()
            perms = sort_by_importance(em.model, em.plan, scores)
            got = float_tensors(forward_batch(em, batches[0]))
            if not same_outputs(got, ref, rtol):
                sort_by_importance(em.model, em.plan, {n: -torch.tensor(p, dtype=torch.float64) for n, p in perms.items()})
                raise ValueError("sorting by activation importance changed the full network's output (a tensor "
                                 "outside the plan shares the channels); the order is kept: pass --sort keep")
    finally:
        em.train(was_training)
    em.importance = {"order": "activation", "calibration_batches": len(batches)}
    return perms
