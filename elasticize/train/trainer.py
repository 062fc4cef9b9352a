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

import contextlib
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..model import ElasticModel
from ..space import Config
from .distributed import rank_and_world
from .evaluation import METRICS, _EvaluationMixin
from .fsdp import check_same_configs, shard
from .losses import DISTILL_LOSSES, batch_size, default_output, forward_batch, split_batch
from .resume import _ResumeMixin
from .sampler import SubnetSampler
from .strategies import Pass, Strategy, make_strategy

__all__ = ["train_step", "Trainer", "METRICS", "PARALLEL"]

#: The ``parallel=`` choices of :class:`Trainer` under ``torchrun``: ``"ddp"`` (every process holds
#: the whole model; ``DistributedDataParallel``) or ``"fsdp"`` (FSDP2: each holds ``1/N`` of the
#: parameters, gradients and optimizer state; see :mod:`elasticize.train.fsdp`).
PARALLEL = ("ddp", "fsdp")


def train_step(em: ElasticModel, batches: Sequence[Any], *, strategy: Strategy, sampler: SubnetSampler,
               optimizer: torch.optim.Optimizer | None, loss_fn: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
               teacher: nn.Module | None = None,
               distill_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | str = "kl",
               output_fn: Callable[[Any, Any], torch.Tensor] = default_output, runner: nn.Module | None = None,
               autocast: torch.autocast | None = None, max_grad_norm: float | None = None,
               always: Sequence[tuple[str, Config]] = (),
               backward: Callable[[torch.Tensor], None] | None = None) -> tuple[dict[str, float], list[Config]]:
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
        optimizer: over ``em``'s parameters; None leaves zeroing, clipping and stepping to the caller
            (a training loop that owns them: Hugging Face ``Trainer``, Lightning, gradient accumulation).
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
        backward: runs each pass's backward on its weighted loss, e.g. ``accelerator.backward``
            (default ``loss.backward()``).

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
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    teacher_out: dict[int, torch.Tensor] = {}
    kept: dict[int, torch.Tensor] = {}
    sums: dict[str, list[float]] = {}
    for p in passes:
        batch = batches[p.micro]
        _, _, target = split_batch(batch)
        em.set_subnet(p.config)
        if teacher is not None and p.target == "task" and p.micro not in teacher_out:
            with torch.no_grad(), (autocast or contextlib.nullcontext()):
                teacher_out[p.micro] = output_fn(forward_batch(teacher, batch), batch).detach()
        with autocast or contextlib.nullcontext():
            out = output_fn(forward_batch(runner, batch), batch)
        loss = _pass_loss(p, out, target, distill_loss=dl, loss_fn=loss_fn, teacher_out=teacher_out, kept=kept)
        if not torch.isfinite(loss.detach()):
            raise ValueError(f"the loss of pass {p.label!r} is {loss.item()}; lower the learning rate")
        (backward or torch.Tensor.backward)(loss * p.weight)
        if p.keep:
            kept[p.micro] = out.detach()
        sums.setdefault(p.label, []).append(float(loss.detach()))
    if optimizer is not None:
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([q for g in optimizer.param_groups for q in g["params"]], max_grad_norm)
        optimizer.step()
    em.set_subnet(None)
    return {k: sum(v) / len(v) for k, v in sums.items()}, [p.config for p in passes]


def _pass_loss(p: Pass, out: torch.Tensor, target: Any, *,
               distill_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
               loss_fn: Callable[[torch.Tensor, Any], torch.Tensor] | None, teacher_out: Mapping[int, torch.Tensor],
               kept: Mapping[int, torch.Tensor]) -> torch.Tensor:
    """The loss of pass ``p`` on its output ``out`` (see :func:`train_step`).

    Raises:
        ValueError: an in-place pass with no kept output on its micro-batch, or a task pass with
            neither a target (and ``loss_fn``) nor a teacher output.
    """
    if p.target == "inplace":
        if p.micro not in kept:
            raise ValueError(f"in-place pass {p.label!r} has no largest pass before it on its micro-batch")
        return distill_loss(out, kept[p.micro])
    parts = []
    if p.micro in teacher_out:
        parts.append(distill_loss(out, teacher_out[p.micro]))
    if loss_fn is not None and target is not None:
        parts.append(loss_fn(out.float(), target))
    if not parts:
        raise ValueError("no loss to train with: the batch has no target (or no loss_fn was given) and there "
                         "is no teacher; give (x, y) batches and loss_fn, or distill=True")
    return parts[0] if len(parts) == 1 else sum(parts)


class Trainer(_ResumeMixin, _EvaluationMixin):
    """The sorted trainer: strategies, distillation, BN recalibration, DDP, resume, measured presets.

    Args:
        em: the elastic model to train (in place).
        data: re-iterable training batches (a ``DataLoader``); iterated in epochs, calling the
            sampler's ``set_epoch`` (``DistributedSampler``) at each. Resume repeats it bit for
            bit, shuffled or not, with a ``generator`` or without (see :meth:`load_state`),
            except with ``persistent_workers=True`` past the first epoch (:meth:`save_state` warns).
        optimizer: over ``em.parameters()``.
        loss_fn: task loss ``(output, target) -> scalar``; None for distillation only.
        strategy: a registered name (``sortednet``, ``subnetwork-to-go``, ``sandwich``, ``skip-aware``,
            ``full``, or your own: see :func:`~elasticize.train.register_strategy`) or a :class:`Strategy`.
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
        parallel: how to train under ``torchrun`` (:data:`PARALLEL`): ``"ddp"`` (when there
            is more than one process) or ``"fsdp"``, which shards every depth-stage block (or
            ``nn.ModuleList`` element) and then the model with FSDP2 ``fully_shard`` and points
            ``optimizer`` (made over the unsharded parameters, without state) at the shards.
            Under FSDP, :meth:`save`, :meth:`save_state`, :meth:`evaluate` and
            :meth:`train_steps` are collectives: call them on every process. On CUDA with
            ``amp`` the shards compute in bf16 (``MixedPrecisionPolicy``; untested here).

    Raises:
        TypeError: ``em`` is not an :class:`ElasticModel`.
        KeyError, ValueError, TypeError: an unknown strategy or ``distill_loss`` name, a bad
            strategy option value or an option the strategy does not take (see :func:`make_strategy`);
            ValueError also for a ``max_grad_norm`` that is not positive; KeyError, ValueError or
            TypeError for an ``always`` entry that ``em.resolve`` rejects (an unknown preset, a
            value outside the search space); ValueError for an unknown ``parallel``, or
            ``"fsdp"`` without a process group or with an optimizer that has state.
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
                 always: Sequence[str | Mapping[str, Any]] = (), parallel: str = "ddp") -> None:
        if not isinstance(em, ElasticModel):
            raise TypeError(f"Trainer takes an ElasticModel (from elasticize.elasticize or convert), not "
                            f"{type(em).__name__}")
        if isinstance(distill_loss, str) and distill_loss not in DISTILL_LOSSES:
            raise KeyError(f"no distillation loss {distill_loss!r}; known: {sorted(DISTILL_LOSSES)}")
        if parallel not in PARALLEL:
            raise ValueError(f"parallel={parallel!r}: choose one of {', '.join(PARALLEL)}")
        self.parallel = parallel
        self.em = em
        self.data = data
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.strategy = make_strategy(strategy, **dict(strategy_options or {}))
        self.rank, self.world = rank_and_world()
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
        self.units: list[str] = []  # the FSDP units, before the root
        if parallel == "fsdp":
            self.units = shard(em, optimizer, mixed_precision=self.amp and self.device.type == "cuda")
        elif self.world > 1:
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

    def _autocast(self) -> torch.autocast | None:
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16) if self.amp else None

    # ------------------------------------------------------------------ training
    def train_steps(self, steps: int, *, progress: bool | Callable[[dict[str, Any]], None] = False,
                    state_path: str | None = None, save_every: int = 0,
                    on_step: Callable[[dict[str, Any]], None] | None = None,
                    total: int | None = None) -> list[dict[str, Any]]:
        """Run ``steps`` optimizer updates (from the current step).

        Args:
            steps: number of updates.
            progress: True for a rich progress bar (step, loss per sampled sub-network,
                samples/s; rank 0 only), or a callback receiving each step's record.
            on_step: also called with each step's record (with or without the bar).
            total: the bar counts global steps up to this one (default: ``step + steps``), so
                runs cut into segments (evaluation between them) show one step count.
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
            task = bar.add_task("train", total=total or self.step + steps, completed=self.step, info="")
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
                if self.parallel == "fsdp" and self.world > 1:
                    check_same_configs(configs, self.step + 1, self.device)
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
                if on_step is not None:
                    on_step(rec)
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
