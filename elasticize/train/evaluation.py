"""Measuring a :class:`~elasticize.train.Trainer`'s sub-networks: BN recalibration, metrics, latency, saving.

:data:`METRICS` are the per-sample scores :meth:`Trainer.measure` averages; the methods here
leave the random states as they were (:func:`_keeps_rng`), so measuring between steps changes
neither training nor an exact resume.
"""

from __future__ import annotations

import functools
import itertools
import statistics
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..model import ElasticModel
from .bn import batchnorm_layers, recalibrate_bn
from .losses import forward_batch, split_batch, to_device
from .state import data_generators, rng_state, set_rng_state

__all__ = ["METRICS"]


def _accuracy(student: torch.Tensor, target: Any, teacher: torch.Tensor | None) -> torch.Tensor:
    if target is None:
        raise ValueError("metric 'accuracy' needs batches with targets, (x, y) or a mapping with 'labels'")
    return (student.argmax(-1) == target).float()


def _cosine(student: torch.Tensor, target: Any, teacher: torch.Tensor | None) -> torch.Tensor:
    if teacher is None:
        raise ValueError("metric 'cosine' compares with the original model's output; the trainer has no teacher "
                         "(pass distill=True)")
    if student.dim() == 3:  # masked token states (batch, tokens, hidden): compare sentence embeddings
        student, teacher = student.sum(1), teacher.sum(1)
    return F.cosine_similarity(student.float(), teacher.float(), dim=-1)


#: Metrics by name: ``(student output, target, teacher output or None) -> per-sample scores``; higher is better.
METRICS: dict[str, Callable[[torch.Tensor, Any, torch.Tensor | None], torch.Tensor]] = {
    "accuracy": _accuracy,
    "cosine": _cosine,
}


def _keeps_rng(method: Callable[..., Any]) -> Callable[..., Any]:
    """A :class:`Trainer` method that leaves the random states and the training data's generators
    as it found them: evaluating between steps changes neither training nor an exact resume
    (iterating a ``DataLoader`` draws its base seed from them)."""
    @functools.wraps(method)
    def kept(self: "_EvaluationMixin", *args: Any, **kwargs: Any) -> Any:
        gens = data_generators(self.data)
        saved = rng_state(gens)
        try:
            return method(self, *args, **kwargs)
        finally:
            set_rng_state(*saved, gens)
    return kept


class _EvaluationMixin:
    """The :class:`~elasticize.train.Trainer`'s BN recalibration, measurement and saving.

    Uses the trainer's ``em``, ``data`` (the training data: the default calibration batches),
    ``device``, ``output_fn``, ``teacher``, ``calibration_batches`` and ``rank``;
    ``_calibrated`` is False while the presets' BN statistics are stale (training makes them so).
    """

    em: ElasticModel
    data: Iterable[Any]
    device: torch.device
    output_fn: Callable[[Any, Any], torch.Tensor]
    teacher: nn.Module | None
    calibration_batches: int
    rank: int
    _calibrated: bool

    @_keeps_rng
    def recalibrate(self, data: Iterable[Any] | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """BN recalibration of every preset on ``calibration_batches`` batches (default: the training data), and
        fresh bias compensation means when the model has them (:meth:`~elasticize.ElasticModel.calibrate_compensation`).

        Leaves the random states as they were, so training after it draws what it would have drawn.

        Raises:
            ValueError: ``calibration_batches < 1`` or ``data`` yields no batch (see :func:`recalibrate_bn`).
        """
        source = data if data is not None else self.data
        stats = recalibrate_bn(self.em, source, num_batches=self.calibration_batches,
                               device=self.device, forward=lambda m, b: forward_batch(m, b))
        if self.em.compensation.means:  # a calibrated file: its means are stale after training
            self.em.calibrate_compensation(list(itertools.islice(iter(source), self.calibration_batches)),
                                           device=self.device)
        self._calibrated = True
        return stats

    def _ensure_calibrated(self) -> None:
        stale = not self._calibrated or any(p not in self.em.bn_stats for p in self.em.presets)  # add_preset
        if stale and (batchnorm_layers(self.em.model) or self.em.compensation.means):
            self.recalibrate()
        self._calibrated = True

    @_keeps_rng
    def measure(self, data: Iterable[Any], subnet: str | Mapping[str, Any] | None, *,
                metric: str | Callable[[torch.Tensor, Any, torch.Tensor | None], torch.Tensor] = "accuracy") -> float:
        """Mean per-sample ``metric`` of one sub-network over ``data`` (eval mode, no gradients).

        Uses the calibrated BatchNorm statistics of a calibrated preset (run :meth:`recalibrate` or
        :meth:`evaluate` first); other sub-networks use the trained statistics. Runs in the
        model's own precision, without the training passes' autocast, so the figure describes
        the weights as saved. Leaves the random states as they were.

        Raises:
            KeyError: unknown metric name. ValueError: a metric that needs a target or teacher it lacks.
        """
        fn = METRICS[metric] if isinstance(metric, str) and metric in METRICS else metric
        if isinstance(fn, str):
            raise KeyError(f"no metric {metric!r}; metrics: {sorted(METRICS)}")
        self.em.eval()
        total, count = 0.0, 0
        previous = self.em.active
        cache = self._teacher_cache(data) if self.teacher is not None else None
        try:
            self.em.set_subnet(subnet)
            with torch.no_grad():
                for i, b in enumerate(data):
                    b = to_device(b, self.device)
                    out = self.output_fn(forward_batch(self.em, b), b)
                    t = cache[i] if cache is not None else None
                    scores = fn(out.float(), split_batch(b)[2], t)
                    total += float(scores.sum())
                    count += scores.numel()
        finally:
            self.em.set_subnet(previous)
        return total / max(count, 1)

    def _teacher_cache(self, data: Iterable[Any]) -> list[torch.Tensor]:
        key = id(data)
        cached = getattr(self, "_tcache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        outs = []
        with torch.no_grad():
            for b in data:
                b = to_device(b, self.device)
                outs.append(self.output_fn(forward_batch(self.teacher, b), b).float())
        self._tcache = (key, outs)
        return outs

    @_keeps_rng
    def evaluate(self, data: Iterable[Any], *, metric: str | Callable[..., torch.Tensor] = "accuracy",
                 presets: Sequence[str] | None = None, latency: bool = False,
                 metric_name: str | None = None) -> dict[str, dict[str, float]]:
        """Measure every preset and write the result into ``em.metrics`` (the manifest's measured presets).

        BN recalibration runs first if the model has BatchNorm and was trained since the last one.
        ``data`` should be a list (or a loader with a fixed order) so the original model's outputs are
        computed once for all presets. Leaves the random states as they were, so evaluating
        between steps does not change training.

        Args:
            data: held-out batches.
            metric: ``"accuracy"``, ``"cosine"`` (to the original model's output) or a callable
                ``(output, target, teacher_output) -> per-sample scores``; higher is better.
            presets: preset names (default all).
            latency: also record ``latency_s``, the median seconds of one forward on a batch of ``data``.
            metric_name: the key written (default: the metric's name).

        Returns:
            preset -> {metric name: value, ...}.

        Raises:
            KeyError: an unknown metric name or preset. ValueError: a metric that needs a target or
                teacher it lacks, or BN recalibration without batches (see :meth:`recalibrate`).
        """
        self._ensure_calibrated()
        name = metric_name or (metric if isinstance(metric, str) else getattr(metric, "__name__", "metric"))
        out: dict[str, dict[str, float]] = {}
        for p in (list(self.em.presets) if presets is None else presets):
            value = self.measure(data, p, metric=metric)
            entry = self.em.metrics.setdefault(p, {})
            entry[name] = value
            if latency:
                entry["latency_s"] = self._latency(data, p)
            out[p] = dict(entry)
        return out

    def _latency(self, data: Iterable[Any], preset: str, rounds: int = 5) -> float:
        b = to_device(next(iter(data)), self.device)
        times = []
        with self.em.subnet(preset), torch.no_grad():
            forward_batch(self.em, b)
            for _ in range(rounds):
                t0 = time.perf_counter()
                forward_batch(self.em, b)
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def extract(self, subnet: str | Mapping[str, Any] | None = None) -> nn.Module:
        """``em.extract(subnet)`` after BN recalibration (a preset gets its calibrated statistics).

        Raises:
            KeyError, ValueError, TypeError: a sub-network outside the search space (see
                :meth:`ElasticModel.extract`); ValueError also for BN recalibration without batches.
        """
        self._ensure_calibrated()
        return self.em.extract(subnet)

    def save(self, path: str, *, overwrite: bool = False) -> Any:
        """BN recalibration if needed, then :func:`elasticize.save` (rank 0 writes; returns the path or None).

        Under FSDP every process must call it: the shards are gathered (a collective) into process
        0's CPU memory, which writes one unsharded elasticize file.

        Raises:
            FileExistsError, FileNotFoundError, PermissionError, ValueError, OSError: see
                :func:`elasticize.save` (``path`` exists, is a folder, its folder is missing or not
                writable, it is the input file, or writing failed).
        """
        from ..checkpoint import save

        self._ensure_calibrated()
        if getattr(self, "parallel", "ddp") == "fsdp":  # a collective: gather the shards into process 0's memory
            from .fsdp import full_model_state, full_state_dict_of

            state = full_model_state(self.em)
            if self.rank != 0:
                return None
            with full_state_dict_of(self.em, state):
                return save(self.em, path, overwrite=overwrite)
        if self.rank != 0:
            return None
        return save(self.em, path, overwrite=overwrite)
