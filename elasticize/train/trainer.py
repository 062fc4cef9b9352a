"""The sorted trainer: one optimizer step (:func:`train_step`) and a :class:`Trainer` around it.

The user brings an :class:`~elasticize.ElasticModel`, a data loader, a task loss and an
optimizer. Batches are tensors, ``(x, y)`` tuples or Hugging Face style mappings
(``model(**batch)``; see :mod:`elasticize.train.losses`).

Distributed data parallel: run the same script under ``torchrun --nproc_per_node N`` after
``torch.distributed.init_process_group`` (``gloo`` on CPU, ``nccl`` on GPU); the trainer wraps
the model in ``DistributedDataParallel`` and broadcasts the sampler seed from rank 0, so every
rank draws the same sub-network at every step without further communication. Each pass's
backward synchronises its own gradients (no ``no_sync``): a sub-network that skips blocks
leaves their parameters unused, and ``find_unused_parameters=True`` (on whenever the space has
depth or switchable norms) marks them ready so the all-reduce does not wait for them.
Gradients accumulated by earlier passes of the step are already equal on every rank, so
re-averaging them keeps them equal. ``no_sync`` with one all-reduce per step would be
cheaper but wrong here: DDP finds unused parameters from the last forward only, and would
leave gradients of blocks used only by earlier passes unsynchronised. On CUDA (or with
``amp=True`` on any device), forward passes run under bf16 autocast (losses in fp32).
"""

from __future__ import annotations

import copy
import functools
import json
import statistics
import time
import warnings
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..model import ElasticModel
from ..space import Config
from .bn import batchnorm_layers, recalibrate_bn
from .losses import DISTILL_LOSSES, batch_size, default_output, forward_batch, split_batch, to_device
from .sampler import SubnetSampler
from .state import (check_state_info, data_generators, read_state, read_state_info, rng_state, set_rng_state,
                    write_state)
from .strategies import Pass, Strategy, make_strategy

__all__ = ["train_step", "Trainer", "METRICS"]


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


def train_step(em: ElasticModel, batches: Sequence[Any], *, strategy: Strategy, sampler: SubnetSampler,
               optimizer: torch.optim.Optimizer, loss_fn: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
               teacher: nn.Module | None = None,
               distill_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | str = "kl",
               output_fn: Callable[[Any, Any], torch.Tensor] = default_output, runner: nn.Module | None = None,
               autocast: torch.autocast | None = None, max_grad_norm: float | None = None,
               always: Sequence[tuple[str, Config]] = ()) -> tuple[dict[str, float], list[Config]]:
    """One optimizer update of ``strategy``, for users who keep their own loop.

    Runs the strategy's passes (forward, loss, backward, one sub-network each; gradients
    accumulate), then ``optimizer.step()``; gradients are zeroed first. A ``"task"`` pass's loss
    is ``loss_fn(output, target)`` plus ``distill_loss(output, teacher(batch))`` when a teacher (the
    frozen original) is given; an ``"inplace"`` pass's is ``distill_loss(output, kept)`` against
    this step's largest sub-network's detached output.

    Args:
        em: the elastic model (its active sub-network is changed; back to full after).
        batches: ``strategy.micro_batches`` batches, already on the model's device.
        strategy: from :func:`~elasticize.train.make_strategy`.
        sampler: draws the sub-networks (same seed on every rank under DDP).
        optimizer: over ``em``'s parameters.
        loss_fn: task loss ``(output tensor, target) -> scalar``, e.g. ``nn.CrossEntropyLoss()``.
        teacher: frozen original model for distillation, or None.
        distill_loss: ``"kl"``, ``"cosine"``, ``"mse"``, ``"hidden"`` or ``(student, teacher) -> scalar``.
        output_fn: ``(model output, batch) -> tensor`` (logits, or an embedding via :func:`mean_pooled`).
        runner: the module to call (the ``DistributedDataParallel`` wrapper of ``em``), default ``em``.
        autocast: an autocast context for the forward passes, or None.
        max_grad_norm: clip the accumulated gradients of all passes to this total L2 norm
            (``torch.nn.utils.clip_grad_norm_``) before the step; None does not clip. Recurrent
            models usually need it (BSRNN clips at 5).
        always: ``(label, configuration)`` pairs trained on the first micro-batch at every step
            after the strategy's passes, like a ``"task"`` pass (see :class:`Trainer`'s ``always``);
            a label equal to one of the strategy's pass labels is logged as ``"<label> (always)"``.

    Returns:
        (mean loss per pass label, the configurations trained, in order).

    Raises:
        ValueError: too few batches, a loss that cannot be formed (no target and no teacher,
            or an in-place pass with no largest pass before it), or a non-finite loss.
    """
    if len(batches) < strategy.micro_batches:
        raise ValueError(f"strategy {strategy.name!r} needs {strategy.micro_batches} batches per step, got {len(batches)}")
    dl = DISTILL_LOSSES[distill_loss] if isinstance(distill_loss, str) else distill_loss
    runner = runner if runner is not None else em
    passes = strategy.passes(sampler)
    drawn = {p.label for p in passes}  # an always pass named like a strategy pass is logged apart from it
    passes += [Pass(cfg, f"{label} (always)" if label in drawn else label) for label, cfg in always]
    optimizer.zero_grad(set_to_none=True)
    teacher_out: dict[int, torch.Tensor] = {}
    kept: dict[int, torch.Tensor] = {}
    sums: dict[str, list[float]] = {}
    for p in passes:
        batch = batches[p.micro]
        _, _, target = split_batch(batch)
        em.set_subnet(p.config)
        if teacher is not None and p.target == "task" and p.micro not in teacher_out:
            with torch.no_grad(), (autocast or _null()):
                teacher_out[p.micro] = output_fn(forward_batch(teacher, batch), batch).detach()
        with autocast or _null():
            out = output_fn(forward_batch(runner, batch), batch)
        if p.target == "inplace":
            if p.micro not in kept:
                raise ValueError(f"in-place pass {p.label!r} has no largest pass before it on its micro-batch")
            loss = dl(out, kept[p.micro])
        else:
            parts = []
            if p.micro in teacher_out:
                parts.append(dl(out, teacher_out[p.micro]))
            if loss_fn is not None and target is not None:
                parts.append(loss_fn(out.float(), target))
            if not parts:
                raise ValueError("no loss to train with: the batch has no target (or no loss_fn was given) and there "
                                 "is no teacher; give (x, y) batches and loss_fn, or distill=True")
            loss = parts[0] if len(parts) == 1 else sum(parts)
        if not torch.isfinite(loss.detach()):
            raise ValueError(f"the loss of pass {p.label!r} is {loss.item()}; lower the learning rate")
        (loss * p.weight).backward()
        if p.keep:
            kept[p.micro] = out.detach()
        sums.setdefault(p.label, []).append(float(loss.detach()))
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_([q for g in optimizer.param_groups for q in g["params"]], max_grad_norm)
    optimizer.step()
    em.set_subnet(None)
    return {k: sum(v) / len(v) for k, v in sums.items()}, [p.config for p in passes]


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def _keeps_rng(method: Callable[..., Any]) -> Callable[..., Any]:
    """A :class:`Trainer` method that leaves the random states and the training data's generators
    as it found them: evaluating between steps changes neither training nor an exact resume
    (iterating a ``DataLoader`` draws its base seed from them)."""
    @functools.wraps(method)
    def kept(self: "Trainer", *args: Any, **kwargs: Any) -> Any:
        gens = data_generators(self.data)
        saved = rng_state(gens)
        try:
            return method(self, *args, **kwargs)
        finally:
            set_rng_state(*saved, gens)
    return kept


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Trainer:
    """The sorted trainer: strategies, distillation, BN recalibration, DDP, resume, measured presets.

    Args:
        em: the elastic model to train (in place).
        data: re-iterable training batches (a ``DataLoader``); iterated in epochs, calling the
            sampler's ``set_epoch`` (``DistributedSampler``) at each. Resume repeats it bit for
            bit, shuffled or not, with a ``generator`` or without (see :meth:`load_state`),
            except with ``persistent_workers=True`` past the first epoch (:meth:`save_state` warns).
        optimizer: over ``em.parameters()``.
        loss_fn: task loss ``(output, target) -> scalar``; None for distillation only.
        strategy: name (``sortednet``, ``subnetwork-to-go``, ``sandwich``, ``skip-aware``, ``full``)
            or a :class:`Strategy`.
        strategy_options: options of a strategy given by name (e.g. ``{"accumulate": 4}``).
        seed: the sampler's seed (rank 0's is used on every rank).
        distribution: SortedNet's ``P_{B_j}`` per dimension (see :class:`SubnetSampler`).
        per: ``"dimension"`` or ``"group"`` sampling (see :class:`SubnetSampler`).
        distill: ``"auto"`` (distill from the frozen original when ``em`` was converted from
            pretrained weights, i.e. ``em.recipe["pretrained"]``), True, False, or a teacher module.
            The original is ``em``'s full sub-network as it is when the trainer is built.
        distill_loss: ``"kl"`` (logits), ``"cosine"`` (embeddings), ``"mse"``, ``"hidden"`` (token
            states from :func:`~elasticize.train.losses.masked_hidden`) or a callable.
        output_fn: ``(model output, batch) -> tensor``.
        device: where to train (default: the model's device).
        amp: bf16 autocast for the forward passes (default: on for CUDA, off elsewhere; True on a
            CPU with native bf16, e.g. AVX512-BF16, made MiniLM training steps about 1.3x faster on
            the 2-core EPYC VM of the benchmarks' figures).
        calibration_batches: batches per preset for BN recalibration.
        scheduler: a ``torch.optim.lr_scheduler`` on ``optimizer``, stepped after every update;
            its ``state_dict`` goes into the trainer state (JSON) for resume.
        max_grad_norm: gradient clipping: the total L2 norm of each update's accumulated
            gradients is clipped to this value (None: no clipping; see :func:`train_step`).
        always: sub-networks trained at every step on top of the strategy's draws: preset
            names or configurations (anything :meth:`ElasticModel.resolve` takes), typically
            the presets you will ship. Each adds one forward and backward per step against the
            task loss and the original model. The strategy's random draws keep the rest of the
            space trained; sampling alone gives one preset of 294 a pass every few hundred
            steps (the sandwich rule's fixed smallest sub-network is the same idea, Universally
            Slimmable Networks, Section 3).

    Raises:
        TypeError: ``em`` is not an :class:`ElasticModel`.
        KeyError, ValueError: an unknown strategy or bad option (see :func:`make_strategy`);
            ValueError also for a ``max_grad_norm`` that is not positive; KeyError, ValueError or
            TypeError for an ``always`` entry that ``em.resolve`` rejects (an unknown preset, a
            value outside the search space).
    """

    def __init__(self, em: ElasticModel, data: Iterable[Any], *, optimizer: torch.optim.Optimizer,
                 loss_fn: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
                 strategy: str | Strategy = "sortednet", strategy_options: Mapping[str, Any] | None = None,
                 seed: int = 0, distribution: Mapping[str, Sequence[float]] | None = None, per: str = "dimension",
                 distill: bool | str | nn.Module = "auto",
                 distill_loss: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "kl",
                 output_fn: Callable[[Any, Any], torch.Tensor] = default_output,
                 device: torch.device | str | None = None, amp: bool | None = None,
                 calibration_batches: int = 8, scheduler: Any = None, max_grad_norm: float | None = None,
                 always: Sequence[str | Mapping[str, Any]] = ()) -> None:
        if not isinstance(em, ElasticModel):
            raise TypeError(f"Trainer takes an ElasticModel (from elasticize.elasticize or convert), not "
                            f"{type(em).__name__}")
        if isinstance(distill_loss, str) and distill_loss not in DISTILL_LOSSES:
            raise KeyError(f"no distillation loss {distill_loss!r}; known: {sorted(DISTILL_LOSSES)}")
        self.em = em
        self.data = data
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.strategy = make_strategy(strategy, **dict(strategy_options or {}))
        self.rank, self.world = _world()
        if self.world > 1:
            t = torch.tensor([int(seed)], dtype=torch.int64)
            dist.broadcast(t, 0)
            seed = int(t.item())
        self.sampler = SubnetSampler(em.space, seed=seed, distribution=distribution, per=per)
        self.device = torch.device(device) if device is not None else next(em.parameters()).device
        em.to(self.device)
        self.amp = (self.device.type == "cuda") if amp is None else bool(amp)
        self.distill_loss = distill_loss
        self.output_fn = output_fn
        self.calibration_batches = int(calibration_batches)
        self.scheduler = scheduler
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be a positive number or None, got {max_grad_norm!r}")
        self.max_grad_norm = max_grad_norm
        self.always = [(a if isinstance(a, str) else f"always{i}", em.resolve(a)) for i, a in enumerate(always)]
        if distill == "auto":
            distill = bool(em.recipe.get("pretrained"))
        if isinstance(distill, nn.Module):
            self.teacher: nn.Module | None = distill.to(self.device).eval().requires_grad_(False)
        elif distill:
            with em.trained_bn_stats():
                self.teacher = em.extract(None).to(self.device).eval().requires_grad_(False)
        else:
            self.teacher = None
        self.runner: nn.Module = em
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            unused = bool(em.space.depth) or bool(em.plan.switchable)
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.runner = DistributedDataParallel(em, device_ids=ids, find_unused_parameters=unused)
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.history: list[dict[str, Any]] = []
        self._iter: Any = None
        self._epoch_rng: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None  # at this epoch's iter()
        self._resumed_rng: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None  # load_state's, till used
        self._calibrated = False

    # ------------------------------------------------------------------ data
    def _autocast(self) -> torch.autocast | None:
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16) if self.amp else None

    def _start_epoch(self) -> None:
        # the random states the iterator draws this epoch's order from (its base seed, a shuffle
        # without a generator: the global RNG; with one: the loader's generator), for resume
        self._epoch_rng = rng_state(data_generators(self.data))
        sampler = getattr(self.data, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        self._iter = iter(self.data)

    def _resume_iterator(self) -> None:
        """Make the data iterator: at the first step, or after :meth:`load_state` at the state's batch.

        Making an iterator draws from the random generators (its base seed; a shuffle's order),
        and so does every batch it gives (random transforms). So the iterator is made from the
        random states the interrupted run made it from (saved at the epoch's start), the
        epoch's first ``batch_in_epoch`` batches are drawn and dropped, and only then are the
        random states set to the saved ones (as the Hugging Face Trainer does), so that the next
        batch, dropout and everything after draw what the interrupted run drew.
        """
        now, self._resumed_rng = self._resumed_rng, None
        gens = data_generators(self.data)
        skip = self.batch_in_epoch
        start = self._epoch_rng if skip and self._epoch_rng is not None else now
        if start is not None:
            set_rng_state(*start, gens)
        self._start_epoch()
        for i in range(skip):  # resumed: skip what this epoch already gave
            try:
                next(self._iter)
            except StopIteration:
                raise ValueError(f"the trainer state is at batch {skip} of epoch {self.epoch}, but this data gives "
                                 f"{i} batches an epoch; resume with the data the state was saved with") from None
        if skip and now is not None:
            set_rng_state(*now, gens)

    def _next_batch(self) -> Any:
        if self._iter is None:
            self._resume_iterator()
        try:
            b = next(self._iter)
        except StopIteration:
            self.epoch += 1
            self.batch_in_epoch = 0
            self._start_epoch()
            try:
                b = next(self._iter)
            except StopIteration:
                raise ValueError("the training data is empty") from None
        self.batch_in_epoch += 1
        return to_device(b, self.device)

    # ------------------------------------------------------------------ training
    def train_steps(self, steps: int, *, progress: bool | Callable[[dict[str, Any]], None] = False,
                    state_path: str | None = None, save_every: int = 0) -> list[dict[str, Any]]:
        """Run ``steps`` optimizer updates (from the current step).

        Args:
            steps: number of updates.
            progress: True for a rich progress bar (step, loss per sampled sub-network,
                samples/s; rank 0 only), or a callback receiving each step's record.
            state_path: where :meth:`save_state` writes (every ``save_every`` steps and at the end).
            save_every: steps between state saves (0: only at the end, if ``state_path``).

        Returns:
            One record per step: ``step``, ``losses`` (per pass label), ``configs``, ``samples``, ``seconds``.

        Raises:
            ValueError: empty training data, a step that fails (see :func:`train_step`), or a
                resumed state whose batch is past the end of this data's epoch (other data).
        """
        self.em.set_bn_stats({})
        self._calibrated = False
        self.em.train()
        records: list[dict[str, Any]] = []
        bar = None
        if progress is True and self.rank == 0:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                           TextColumn("{task.fields[info]}"))
            task = bar.add_task("train", total=steps, info="")
            bar.start()
        seen, t_start = 0, time.perf_counter()
        try:
            for _ in range(steps):
                t0 = time.perf_counter()
                batches = [self._next_batch() for _ in range(self.strategy.micro_batches)]
                losses, configs = train_step(self.em, batches, strategy=self.strategy, sampler=self.sampler,
                                             optimizer=self.optimizer, loss_fn=self.loss_fn, teacher=self.teacher,
                                             distill_loss=self.distill_loss, output_fn=self.output_fn,
                                             runner=self.runner, autocast=self._autocast(),
                                             max_grad_norm=self.max_grad_norm, always=self.always)
                if self.scheduler is not None:
                    self.scheduler.step()
                self.step += 1
                n = sum(batch_size(b) for b in batches) * self.world
                seen += n
                rec = {"step": self.step, "losses": losses, "configs": configs, "samples": n,
                       "seconds": time.perf_counter() - t0}
                records.append(rec)
                self.history.append(rec)
                if bar is not None:
                    rate = seen / max(time.perf_counter() - t_start, 1e-9)
                    info = " ".join(f"{k}={v:.3f}" for k, v in losses.items()) + f" | {rate:.1f} samples/s"
                    bar.update(task, advance=1, info=info)
                elif callable(progress):
                    progress(rec)
                if state_path and save_every and self.step % save_every == 0:
                    self.save_state(state_path)
        finally:
            if bar is not None:
                bar.stop()
        if self.world > 1:  # each rank's last forward updated its own BatchNorm buffers: take rank 0's
            for b in self.em.buffers():
                dist.broadcast(b, 0)
        if state_path:
            self.save_state(state_path)
        self.em.eval()
        return records

    # ------------------------------------------------------------------ BN, evaluation, saving
    @_keeps_rng
    def recalibrate(self, data: Iterable[Any] | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """BN recalibration of every preset on ``calibration_batches`` batches (default: the training data).

        Leaves the random states as they were, so training after it draws what it would have drawn.
        """
        stats = recalibrate_bn(self.em, data if data is not None else self.data, num_batches=self.calibration_batches,
                               device=self.device, forward=lambda m, b: forward_batch(m, b))
        self._calibrated = True
        return stats

    def _ensure_calibrated(self) -> None:
        stale = not self._calibrated or any(p not in self.em.bn_stats for p in self.em.presets)  # add_preset
        if stale and batchnorm_layers(self.em.model):
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
        """``em.extract(subnet)`` after BN recalibration (a preset gets its calibrated statistics)."""
        self._ensure_calibrated()
        return self.em.extract(subnet)

    def save(self, path: str, *, overwrite: bool = False) -> Any:
        """BN recalibration if needed, then :func:`elasticize.save` (rank 0 writes; returns the path or None).

        Raises:
            FileExistsError, FileNotFoundError, PermissionError, ValueError, OSError: see
                :func:`elasticize.save` (``path`` exists, is a folder, its folder is missing or not
                writable, it is the input file, or writing failed).
        """
        from ..checkpoint import save

        self._ensure_calibrated()
        if self.rank != 0:
            return None
        return save(self.em, path, overwrite=overwrite)

    # ------------------------------------------------------------------ resume
    def save_state(self, path: str) -> Any:
        """Write the trainer state (weights, optimizer, step, data position, RNG) atomically; rank 0 only.

        The random states (torch CPU and CUDA, Python ``random``, NumPy, the data's generators;
        see :func:`~elasticize.train.state.rng_state`) are stored as they are now and as they
        were when this epoch's data iterator was made, which :meth:`load_state` makes it from
        again. Under DDP they are rank 0's, and every rank resumes with them.

        Returns:
            The path written (None on other ranks).

        Warns:
            UserWarning: a resume from this state cannot repeat this run bit for bit (a
                ``DataLoader`` with ``persistent_workers=True`` past its first epoch).

        Raises:
            FileExistsError, FileNotFoundError, PermissionError, ValueError, OSError: see
                :func:`elasticize.train.state.write_state`.
            TypeError: a scheduler whose ``state_dict`` is not JSON-native.
        """
        if self.rank != 0:
            return None
        meta = {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "strategy": {"name": self.strategy.name, "options": self.strategy.options()},
                "always": [label for label, _ in self.always],
                "sampler": {"seed": self.sampler.seed, "per": self.sampler.per}}
        if self.scheduler is not None:
            try:
                meta["scheduler"] = json.loads(json.dumps(self.scheduler.state_dict()))
            except TypeError as e:
                raise TypeError(f"the scheduler's state_dict is not JSON-native ({e}); use a torch.optim.lr_scheduler "
                                "class with plain-number settings") from e
        gens = data_generators(self.data)
        now, now_info = rng_state(gens)
        rng = {"sampler": self.sampler.generator.get_state(), **now}
        meta["rng"] = {"now": now_info}
        if self.batch_in_epoch and self._epoch_rng is not None:
            epoch, epoch_info = self._epoch_rng
            rng.update({f"epoch.{k}": v for k, v in epoch.items()})
            meta["rng"]["epoch"] = epoch_info
        for reason in self._inexact_resume():
            warnings.warn(f"{path}: resuming from this state will not repeat the interrupted run exactly: {reason}",
                          stacklevel=2)
        return write_state(path, self.em, self.optimizer, meta, rng, inputs=(self.em.source_path,))

    def _inexact_resume(self) -> list[str]:
        """Why a resume from a state saved now would not repeat this run bit for bit (empty: it would)."""
        reasons = []
        if getattr(self.data, "persistent_workers", False) and getattr(self.data, "num_workers", 0) > 0 \
                and self.epoch > 0:
            reasons.append("the DataLoader keeps its worker processes across epochs (persistent_workers=True), and "
                           "they draw from random states seeded in the first epoch that a resumed run cannot make "
                           "again; use persistent_workers=False for exact resume")
        return reasons

    def load_state(self, path: str) -> None:
        """Resume from :meth:`save_state`: the next step continues exactly where that run stopped.

        Weights, optimizer, scheduler, sampler and random states are restored now. At the next
        step the data iterator is made again (``set_epoch`` first) from the random states saved
        at the epoch's start, so it draws the interrupted run's order and base seed; the
        epoch's batches before the state's position are drawn and dropped; then the random
        states are set to those saved with the state (as the Hugging Face Trainer does), so
        that dropout and the rest draw what the interrupted run drew.

        Warns:
            UserWarning: the state's data had other random generators than this trainer's
                (e.g. a ``DataLoader`` with a ``generator`` and one without).

        Raises:
            FileNotFoundError, ValueError: see :func:`elasticize.train.state.read_state`; also a state
                saved with another strategy, other ``always`` sub-networks, or with a learning-rate
                scheduler when this trainer has none (or the reverse). Every check runs before the
                weights are touched.
        """
        saved = read_state_info(path)
        check_state_info(path, saved, self.em)
        meta = saved.get("strategy")
        if meta != {"name": self.strategy.name, "options": self.strategy.options()}:
            raise ValueError(f"{path} was saved by strategy {meta}; this trainer runs "
                             f"{self.strategy.name} {self.strategy.options()}")
        always = [label for label, _ in self.always]
        if saved.get("always", []) != always:
            raise ValueError(f"{path} was saved training always={saved.get('always', [])}; this trainer has "
                             f"always={always}")
        if (self.scheduler is None) != ("scheduler" not in saved):
            raise ValueError(f"{path} was saved {'without' if self.scheduler is not None else 'with'} a learning-rate "
                             f"scheduler; resume {'without' if self.scheduler is not None else 'with the same'} "
                             "scheduler=")
        info, rng = read_state(path, self.em, self.optimizer)
        self.step = int(info["step"])
        self.epoch = int(info["epoch"])
        self.batch_in_epoch = int(info["batch_in_epoch"])
        self.sampler.load_state_dict({"per": info["sampler"]["per"], "generator": rng["sampler"]})
        rng_info = info.get("rng") or {}
        now = ({k: v for k, v in rng.items() if k != "sampler" and not k.startswith("epoch.")},
               rng_info.get("now") or {})
        epoch = {k[len("epoch."):]: v for k, v in rng.items() if k.startswith("epoch.")}
        missing = set_rng_state(*now, data_generators(self.data))
        if missing:
            warnings.warn(f"{path} and this trainer's data have different random generators ({', '.join(missing)}): "
                          "the resumed data order will not be the interrupted run's; resume with the same loader",
                          stacklevel=2)
        if self.scheduler is not None:
            self.scheduler.load_state_dict(info["scheduler"])
        self._iter = None
        self._resumed_rng = now
        self._epoch_rng = (epoch, rng_info.get("epoch") or {}) if epoch else None
        self._calibrated = False
