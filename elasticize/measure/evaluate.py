"""``elasticize eval`` in Python: calibrate and measure every preset, candidates and solver picks, without training.

For each sub-network: BN recalibration (Yu & Huang 2019, Section 3.3) and bias compensation (FLAP,
arXiv 2312.11983, Eq. 5; :mod:`elasticize.calibration`) on the calibration batches, then on the held-out
batches its metric (accuracy, or cosine to the original model's output, or the user's function),
its latency (``torch.utils.benchmark``, median seconds per batch of ``batch_size`` on ``device`` with
``threads`` threads, of the extracted dense module), its parameters, its MACs per sample (the plan's
analytic MACs; FLOPs = 2 x MACs) and its peak memory (bytes; ``torch.cuda.max_memory_allocated`` on CUDA,
else the weights plus the largest single activation). The record goes into
:attr:`ElasticModel.measurements <elasticize.ElasticModel.measurements>` under
:func:`~elasticize.measured.measurement_key` ``(device, batch_size)``, so measurements of other machines stay.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from ..batches import default_output, forward_batch, split_batch, to_device
from ..calibration import compensated, compensated_biases
from ..measured import measurement_key
from .solver import budget_name, sensitivities, solve_checked, solve_latency, uniform_candidates

__all__ = ["evaluate", "calibrate"]

Metric = Callable[[torch.Tensor, Any, torch.Tensor | None], torch.Tensor]


def calibrate(em: Any, batches: Sequence[Any], *, compensation: bool = True, bn_batches: int = 8,
              device: torch.device | str = "cpu") -> None:
    """Bias compensation means (at the full network) and BN recalibration of every preset, on ``batches``.

    Raises:
        ValueError: ``batches`` is empty.
    """
    from ..train.bn import batchnorm_layers, recalibrate_bn

    if not batches:
        raise ValueError("no calibration batch: give more data")
    if compensation:
        em.calibrate_compensation(batches, device=device)
    if batchnorm_layers(em.model):
        recalibrate_bn(em, batches, num_batches=min(bn_batches, len(batches)), device=device)


@contextlib.contextmanager
def _extra_presets(em: Any, configs: Mapping[str, dict]) -> Iterator[None]:
    """Context manager: ``configs`` are presets inside (calibrated like the others), gone after."""
    saved = dict(em.space.presets)
    for name, cfg in configs.items():
        em.space.add_preset(name, cfg, replace=True)
    try:
        yield
    finally:
        em.set_subnet(None)
        em.space.presets = saved
        for name in configs:
            em._resolved.pop(name, None)  # the resolve cache of ElasticModel: the names are gone
        em.compensation.presets = {n: t for n, t in em.compensation.presets.items() if n in saved}
        em.set_bn_stats({n: t for n, t in em.bn_stats.items() if n in saved})


def _metric_fn(metric: str | Metric) -> tuple[str, Metric]:
    from ..train.evaluation import METRICS

    if callable(metric):
        return getattr(metric, "__name__", "metric"), metric
    if metric not in METRICS:
        raise KeyError(f"no metric {metric!r}; metrics: {sorted(METRICS)} (or pass a function)")
    return metric, METRICS[metric]


class _Scorer:
    """Mean per-sample metric of the active sub-network on a fixed list of batches (teacher outputs cached)."""

    def __init__(self, em: Any, batches: Sequence[Any], fn: Metric, output_fn: Callable, device: Any) -> None:
        self.em, self.fn, self.output_fn = em, fn, output_fn
        self.batches = [to_device(b, device) for b in batches]
        with torch.no_grad(), em.subnet(None), em.trained_bn_stats():
            self.teacher = [output_fn(forward_batch(em, b), b).float() for b in self.batches]

    def __call__(self, subnet: Any = None) -> float:
        total, count = 0.0, 0
        with torch.no_grad():
            for b, t in zip(self.batches, self.teacher):
                out = self.output_fn(forward_batch(self.em, b), b).float()
                s = self.fn(out, split_batch(b)[2], t)
                total, count = total + float(s.sum()), count + s.numel()
        return total / max(count, 1)


def _cut(batch: Any, n: int) -> Any:
    """The first ``n`` samples of a batch."""
    if isinstance(batch, torch.Tensor):
        return batch[:n]
    if isinstance(batch, Mapping):
        return {k: _cut(v, n) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_cut(v, n) for v in batch)
    return batch


def _latency(dense: nn.Module, batch: Any, threads: int | None, min_time: float) -> float:
    """Median seconds of one forward of ``dense`` on ``batch`` (``torch.utils.benchmark``)."""
    from torch.utils import benchmark

    def run() -> None:
        with torch.no_grad():
            forward_batch(dense, batch)

    timer = benchmark.Timer(stmt="run()", globals={"run": run}, num_threads=threads or torch.get_num_threads())
    return float(timer.blocked_autorange(min_run_time=min_time).median)


def _peak_bytes(dense: nn.Module, batch: Any, device: torch.device) -> int:
    """Peak memory of one forward (bytes): measured on CUDA, else weights plus the largest module output."""
    weights = sum(t.numel() * t.element_size() for t in itertools.chain(dense.parameters(), dense.buffers()))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad():
            forward_batch(dense, batch)
        return int(torch.cuda.max_memory_allocated(device))
    largest = [0]

    def hook(_m: nn.Module, _i: Any, out: Any) -> None:
        t = out if isinstance(out, torch.Tensor) else getattr(out, "last_hidden_state", None)
        if isinstance(t, torch.Tensor):
            largest[0] = max(largest[0], t.numel() * t.element_size())

    hooks = [m.register_forward_hook(hook) for m in dense.modules()]
    try:
        with torch.no_grad():
            forward_batch(dense, batch)
    finally:
        for h in hooks:
            h.remove()
    return weights + largest[0]


def _score_with_compensation(em: Any, score: _Scorer, compensation: bool) -> Callable[[dict], float]:
    """``config -> metric`` of any sub-network, its compensated biases installed (sensitivities)."""
    from ..fileformat.manifest import live_state

    def run(cfg: dict) -> float:
        cfg = em.set_subnet(cfg)
        tables = compensated_biases(em.model, em.plan, live_state(em.plan, em.space, cfg), em.space, cfg,
                                    em.compensation.means) if compensation else {}
        with compensated(em.model, tables):
            return score()
    return run


def _add_budget_picks(em: Any, budgets: Sequence[Any], measure: Callable[[dict], float],
                      seconds: Callable[[dict], float], refine_rounds: int) -> None:
    """Add the solver's pick for each budget as a preset (see :func:`evaluate`'s ``budgets``).

    Nothing the score reads changes in this phase, so each sub-network is measured once: the
    sensitivities, every budget's checked picks and the refinement rounds revisit configurations
    (100 measurements of 85 sub-networks on a digits CNN at two budgets without this)."""
    from ..space import Budget

    seen: dict[str, float] = {}

    def score(cfg: dict) -> float:
        key = json.dumps(em.resolve(cfg), sort_keys=True)
        if key not in seen:
            seen[key] = measure(cfg)
        return seen[key]

    sens = sensitivities(em, score)
    for b in budgets:
        pick_name = budget_name(b.text if isinstance(b, Budget) else f"{float(b):g}")
        if isinstance(b, Budget) and b.kind == "latency":
            limit = b.resolve(seconds(em.space.full()) if b.share else 1.0)
            cfg, _, _ = solve_latency(em, sens, score, seconds, limit, refine_rounds=refine_rounds)
            pick_name += "-latency" if b.share else ""  # budget-5ms; a share: budget-70-latency
        else:
            limit = b.resolve(em.macs(None)) if isinstance(b, Budget) else float(b)
            uniform = [c for c in em.space.candidates() if em.macs(c) <= limit][:2]
            cfg, _ = solve_checked(em, sens, score, max_macs=limit, extra=uniform, refine_rounds=refine_rounds)
        em.add_preset(pick_name, cfg, replace=True)


def evaluate(em: Any, held: Sequence[Any], *, calibration: Sequence[Any] = (), metric: str | Metric = "accuracy",
             output_fn: Callable[[Any, Any], torch.Tensor] = default_output, candidates: int = 0,
             budgets: Sequence[Any] = (), device: str = "cpu", batch_size: int = 1, threads: int | None = None,
             latency: bool = True, min_time: float = 0.2, compensation: bool = True,
             source: str = "", refine_rounds: int = 3) -> dict[str, Any]:
    """Calibrate and measure every preset, ``candidates`` uniform sub-networks and a solver pick per budget.

    Args:
        em: the elastic model (moved to ``device``; its weights are not changed).
        held: held-out batches that are measured.
        calibration: batches for BN recalibration, bias compensation and the solver's sensitivities
            (empty: neither, the presets are measured as they are).
        metric: ``"accuracy"``, ``"cosine"`` (to the original's output) or ``(output, target, original
            output) -> per-sample scores``; higher is better.
        output_fn: ``(model output, batch) -> tensor``, e.g. :func:`~elasticize.train.mean_pooled`.
        candidates: how many nested uniform sub-networks to measure besides the presets.
        budgets: :class:`~elasticize.space.Budget` s of MACs or of latency (``kind="latency"``: seconds
            per ``batch_size`` batch, or a share of the full network's, timed as below), or plain MACs;
            each adds the solver's pick as preset ``budget-<text>`` (a latency share: ``budget-<text>-latency``)
            (:func:`~elasticize.measure.solver.solve_checked`, :func:`~elasticize.measure.solver.solve_latency`).
        device: where to run and time (``"cpu"``, ``"cuda"``...).
        batch_size: samples per timed batch (the record's key).
        threads: CPU threads for timing (default: torch's).
        latency: time each sub-network (and measure its peak memory).
        min_time: seconds of timing per sub-network (``Timer.blocked_autorange(min_run_time)``).
        compensation: use bias compensation.
        source: what the data was, for the record.
        refine_rounds: rounds of :func:`~elasticize.measure.solver.refine` per budget pick (0: the checked
            pick as it is; each round costs about two measurements per group and stage).

    Returns:
        The record stored in ``em.measurements[measurement_key(device, batch_size)]``.

    Raises:
        KeyError: an unknown metric. ValueError: a metric that needs targets the batches lack, or a
            budget no sub-network meets.
    """
    name, fn = _metric_fn(metric)
    dev = torch.device(device)
    em.to(dev).eval()
    em.set_subnet(None)
    held_scorer = _Scorer(em, held, fn, output_fn, dev)
    if calibration and budgets:
        calib_scorer = _Scorer(em, list(calibration)[:4], fn, output_fn, dev)
        if compensation:
            calibrate(em, calibration, compensation=True, device=dev)
        run = _score_with_compensation(em, calib_scorer, compensation)
        timed_batch = _cut(to_device(held[0], dev), batch_size)
        _add_budget_picks(em, budgets, run, lambda cfg: _latency(em.extract(cfg).eval(), timed_batch, threads, min_time),
                          refine_rounds)
    extra = {f"~candidate{i}": c for i, c in enumerate(uniform_candidates(em, candidates, list(em.presets.values())))}
    rows = []
    with _extra_presets(em, extra):
        if calibration:
            calibrate(em, calibration, compensation=compensation, device=dev)
        timed = _cut(to_device(held[0], dev), batch_size)
        for preset in em.presets:
            cfg = em.set_subnet(preset)
            row: dict[str, Any] = {"name": None if preset in extra else preset, "config": cfg,
                                   "macs": em.macs(cfg), "params": em.params(cfg), name: held_scorer()}
            if latency:
                dense = em.extract(cfg).eval()
                row["latency_s"] = _latency(dense, timed, threads, min_time)
                row["peak_bytes"] = _peak_bytes(dense, timed, dev)
            rows.append(row)
            if preset not in extra:
                em.metrics.setdefault(preset, {})[name] = row[name]
    record = {"device": dev.type, "batch_size": int(batch_size), "threads": int(threads or torch.get_num_threads()),
              "metric": name, "results": rows, "calibration": ("BN recalibration + bias compensation" if compensation
                                                                else "BN recalibration") if calibration else "none"}
    if source:
        record["data"] = str(source)[:200]
    em.measurements[measurement_key(dev.type, batch_size)] = record
    return record
