"""What the callbacks share: one strategy, its sampler, the frozen original, and one step of passes.

:class:`ElasticSession` is the sorted trainer's per-step logic without its loop, for a loop
someone else owns (Hugging Face ``Trainer``, Lightning, accelerate): :meth:`ElasticSession.step`
runs :func:`elasticize.train.train_step`'s passes on one batch (one sub-network each, with
their losses and distillation) and leaves the optimizer to the loop. When the batch has labels
and the model takes them (a Hugging Face model), the model's own loss (``output.loss``) is the
task loss.
"""

from __future__ import annotations

import base64
import inspect
import itertools
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from ..batches import TARGET_KEYS, OutputFn, default_output, split_batch
from ..model import ElasticModel
from ..train.bn import recalibrate_bn
from ..train.losses import DISTILL_LOSSES
from ..train.sampler import SubnetSampler
from ..train.strategies import Strategy, make_strategy
from ..train.trainer import train_step

__all__ = ["ElasticSession", "SESSION_VERSION"]

#: Version of :meth:`ElasticSession.state` (the JSON stored with a checkpoint).
SESSION_VERSION = 1


class ElasticSession:
    """The strategy, sampler, teacher and losses of sorted training, one batch at a time.

    Args:
        em: the elastic model.
        strategy: a registered strategy name or a :class:`~elasticize.train.Strategy`; it must use
            one micro-batch per step (for SortedNet's gradient accumulation use the loop's own,
            e.g. ``gradient_accumulation_steps``: each micro-batch draws its own sub-network).
        strategy_options: options of a strategy given by name.
        seed: the sampler's seed (give every rank the same).
        distribution: SortedNet's ``P_{B_j}`` per dimension (see :class:`~elasticize.train.SubnetSampler`).
        per: ``"dimension"`` or ``"group"`` sampling.
        always: preset names or configurations trained at every step (see :class:`~elasticize.train.Trainer`).
        distill: ``"auto"`` (from the frozen original when ``em`` was converted from pretrained
            weights), True, False, or a teacher module.
        distill_loss: ``"kl"``, ``"cosine"``, ``"mse"``, ``"hidden"`` or a callable.
        output_fn: ``(model output, batch) -> tensor`` compared by distillation.
        loss_fn: task loss ``(output tensor, target) -> scalar`` for a model without its own loss.
        calibration_batches: batches per preset for BN recalibration before each save.

    Raises:
        TypeError: ``em`` is not an :class:`ElasticModel`.
        KeyError: an unknown strategy or distillation loss.
        ValueError: a strategy with more than one micro-batch per step; KeyError, ValueError or
            TypeError also for strategy options or ``always`` entries that are refused.
    """

    def __init__(self, em: ElasticModel, *, strategy: str | Strategy = "sandwich",
                 strategy_options: Mapping[str, Any] | None = None, seed: int = 0,
                 distribution: Mapping[str, Sequence[float]] | None = None, per: str = "dimension",
                 always: Sequence[str | Mapping[str, Any]] = (), distill: bool | str | nn.Module = "auto",
                 distill_loss: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "kl",
                 output_fn: OutputFn = default_output,
                 loss_fn: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
                 calibration_batches: int = 8) -> None:
        if not isinstance(em, ElasticModel):
            raise TypeError(f"expected an ElasticModel (from elasticize.elasticize or convert), not {type(em).__name__}")
        if isinstance(distill_loss, str) and distill_loss not in DISTILL_LOSSES:
            raise KeyError(f"no distillation loss {distill_loss!r}; known: {sorted(DISTILL_LOSSES)}")
        self.em = em
        self.strategy = make_strategy(strategy, **dict(strategy_options or {}))
        if self.strategy.micro_batches != 1:
            raise ValueError(f"strategy {self.strategy.name!r} uses {self.strategy.micro_batches} micro-batches per "
                             "step; use 1 (accumulate=1) and the training loop's gradient accumulation instead: "
                             "each micro-batch then draws its own sub-network (SortedNet's gacc)")
        self.sampler = SubnetSampler(em.space, seed=seed, distribution=distribution, per=per)
        self.always = [(a if isinstance(a, str) else f"always{i}", em.resolve(a)) for i, a in enumerate(always)]
        self.distill_loss = distill_loss
        self.output_fn = output_fn
        self.loss_fn = loss_fn
        self.calibration_batches = int(calibration_batches)
        if distill == "auto":
            distill = bool(em.recipe.get("pretrained"))
        if isinstance(distill, nn.Module):
            self.teacher: nn.Module | None = distill.eval().requires_grad_(False)
        elif distill:
            with em.trained_bn_stats():
                self.teacher = em.extract(None).eval().requires_grad_(False)
        else:
            self.teacher = None
        self._labels = _label_keys(em)
        self._last: Any = None

    # ------------------------------------------------------------------ one step
    def step(self, batch: Any, *, runner: nn.Module | None = None,
             backward: Callable[[torch.Tensor], None] | None = None) -> dict[str, float]:
        """Forward and backward every pass of one step on ``batch`` (gradients accumulate; no optimizer step).

        Args:
            batch: one batch on the model's device (tensor, ``(x, y)`` or mapping).
            runner: the module to call (a DDP or accelerate wrapper of ``em``), default ``em``.
            backward: each pass's backward, e.g. ``accelerator.backward`` (default ``loss.backward()``).

        Returns:
            Mean loss per pass label (e.g. ``{"max": 0.7, "min": 0.2, ...}``).

        Raises:
            ValueError: no loss can be formed, or a loss is not finite (see :func:`~elasticize.train.train_step`).
        """
        if self.teacher is not None:
            self.teacher.to(next(self.em.parameters()).device)
        _, _, target = split_batch(batch)
        run = runner if runner is not None else self.em
        extra = {k: batch[k] for k in self._labels if isinstance(batch, Mapping) and k in batch}

        def forward(*args: Any, **kwargs: Any) -> Any:
            self._last = run(*args, **kwargs, **extra)
            return self._last

        losses, _ = train_step(self.em, [batch], strategy=self.strategy, sampler=self.sampler, optimizer=None,
                               loss_fn=self._task_loss, teacher=self.teacher, distill_loss=self.distill_loss,
                               output_fn=self.output_fn, runner=forward, always=self.always,  # type: ignore[arg-type]
                               backward=backward)
        self._last = None
        return losses

    def step_output(self, batch: Any) -> tuple[Any, dict[str, float]]:
        """Every pass of one step on ``batch`` as one differentiable loss, for a loop that runs one
        forward and one backward per micro-batch (a plain ``transformers.Trainer``).

        The passes run one after another as in :meth:`step`, but their weighted losses are summed
        instead of backed one by one, so the loop's single ``backward`` gives the same gradients
        (and all passes' activations are held until it runs: memory grows with the passes).

        Args:
            batch: one batch on the model's device (tensor, ``(x, y)`` or mapping).

        Returns:
            (the first pass's output with its ``loss`` set to the summed loss: a copy of a Hugging
            Face ``ModelOutput`` or mapping, else ``{"loss": ..., "output": ...}``; mean loss per pass label).

        Raises:
            ValueError: as :meth:`step`.
        """
        losses: list[torch.Tensor] = []
        first: list[Any] = []
        run = self.em.model  # the wrapped model: no second round through em.step_forward

        def runner(*args: Any, **kwargs: Any) -> Any:
            out = run(*args, **kwargs)
            if not first:
                first.append(out)
            return out

        per_label = self.step(batch, runner=runner, backward=losses.append)
        total = torch.stack([loss.float() for loss in losses]).sum()
        out = first[0]
        if isinstance(out, Mapping):
            out = out.__class__(**dict(out)) if hasattr(out, "to_tuple") else dict(out)
            out["loss"] = total
            return out, per_label
        return {"loss": total, "output": out}, per_label

    def _task_loss(self, out: torch.Tensor, target: Any) -> torch.Tensor:
        """The model's own loss of the last forward when it has one, else ``loss_fn(out, target)``.

        Raises:
            ValueError: neither (the model returns no loss and no ``loss_fn`` was given).
        """
        own = self._last.get("loss") if isinstance(self._last, Mapping) else getattr(self._last, "loss", None)
        if isinstance(own, torch.Tensor):
            return own.float()
        if self.loss_fn is None:
            raise ValueError("the batch has a target but the model returned no loss: pass loss_fn=")
        return self.loss_fn(out, target)

    # ------------------------------------------------------------------ BN recalibration
    def recalibrate(self, data: Iterable[Any]) -> None:
        """BN recalibration of every preset on the first ``calibration_batches`` of ``data`` (no-op
        without BatchNorm); the random states are left as they were, so a resumed run matches."""
        with torch.random.fork_rng(devices=[]):
            recalibrate_bn(self.em, itertools.islice(iter(data), self.calibration_batches),
                           num_batches=self.calibration_batches)

    # ------------------------------------------------------------------ state (JSON)
    def state(self) -> dict[str, Any]:
        """The sampler's state and the settings it belongs to, JSON-native (no pickle)."""
        gen = self.sampler.generator.get_state().numpy().tobytes()
        return {"format_version": SESSION_VERSION, "strategy": {"name": self.strategy.name,
                                                                "options": self.strategy.options()},
                "sampler": {"seed": self.sampler.seed, "per": self.sampler.per,
                            "generator": base64.b64encode(gen).decode("ascii")}}

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state`'s output (every field checked before use).

        Raises:
            ValueError: a newer format, another strategy or sampler setting, or a malformed generator state.
        """
        version = state.get("format_version") if isinstance(state, Mapping) else None
        if not isinstance(version, int) or version > SESSION_VERSION:
            raise ValueError(f"sampler state format {version!r} is not one this elasticize reads (<= {SESSION_VERSION})")
        mine = self.state()
        if state.get("strategy") != mine["strategy"]:
            raise ValueError(f"the checkpoint was trained with strategy {state.get('strategy')}, this run uses "
                             f"{mine['strategy']}; resume with the same strategy and options")
        sampler = state.get("sampler")
        if not isinstance(sampler, Mapping) or not isinstance(sampler.get("generator"), str):
            raise ValueError("the checkpoint's sampler state has no generator; it is damaged")
        try:
            raw = base64.b64decode(sampler["generator"], validate=True)
        except ValueError as e:
            raise ValueError(f"the checkpoint's sampler generator is not base64 ({e})") from e
        if len(raw) != self.sampler.generator.get_state().numel():
            raise ValueError(f"the checkpoint's sampler generator state has {len(raw)} bytes, not the generator's")
        self.sampler.load_state_dict({"per": sampler.get("per"),
                                      "generator": torch.frombuffer(bytearray(raw), dtype=torch.uint8)})


def _label_keys(em: ElasticModel) -> tuple[str, ...]:
    """The target keys the wrapped model's ``forward`` takes (``labels`` for Hugging Face models)."""
    try:
        params = inspect.signature(em.model.forward).parameters
    except (TypeError, ValueError):
        return ()
    return tuple(k for k in TARGET_KEYS if k in params)
