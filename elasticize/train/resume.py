"""A :class:`~elasticize.train.Trainer`'s data position and resume (the file is :mod:`elasticize.train.state`'s).

The trainer iterates its data in epochs and records, at each epoch's start, the random states
its iterator is made from; :meth:`~elasticize.train.Trainer.save_state` stores them with the
position, and :meth:`~elasticize.train.Trainer.load_state` makes the interrupted epoch's
iterator again from them, so a resumed run repeats the interrupted one bit for bit.
"""

from __future__ import annotations

import json
import warnings
from typing import Any, Iterable, Sequence

import torch

from ..model import ElasticModel
from ..space import Config
from .fsdp import full_model_state, full_optimizer_state, load_full_state
from .losses import to_device
from .sampler import SubnetSampler
from .state import (check_state_info, data_generators, read_state, read_state_info, read_state_parts, rng_state,
                    set_rng_state, write_state)
from .strategies import Strategy


class _ResumeMixin:
    """The :class:`~elasticize.train.Trainer`'s data position (``epoch``, ``batch_in_epoch``) and its state file.

    Uses the trainer's ``em``, ``data``, ``device``, ``optimizer``, ``scheduler``, ``sampler``,
    ``strategy``, ``always`` and ``rank``; owns ``step``, ``epoch``, ``batch_in_epoch`` and the
    data iterator with the random states it was made from.
    """

    em: ElasticModel
    data: Iterable[Any]
    device: torch.device
    optimizer: torch.optim.Optimizer
    scheduler: Any
    sampler: SubnetSampler
    strategy: Strategy
    always: Sequence[tuple[str, Config]]
    rank: int
    parallel: str
    step: int
    epoch: int
    batch_in_epoch: int
    _iter: Any
    _epoch_rng: tuple[dict[str, torch.Tensor], dict[str, Any]] | None
    _resumed_rng: tuple[dict[str, torch.Tensor], dict[str, Any]] | None
    _calibrated: bool

    # ------------------------------------------------------------------ data position
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

    # ------------------------------------------------------------------ resume
    def save_state(self, path: str) -> Any:
        """Write the trainer state (weights, optimizer, step, data position, RNG) atomically; rank 0 only.

        The random states (torch CPU and CUDA, Python ``random``, NumPy, the data's generators;
        see :func:`~elasticize.train.state.rng_state`) are stored as they are now and as they
        were when this epoch's data iterator was made, which :meth:`load_state` makes it from
        again. Under DDP they are rank 0's, and every rank resumes with them. Under FSDP
        (``parallel="fsdp"``) every process must call it: the shards are gathered into process
        0's memory (:func:`~elasticize.train.fsdp.full_model_state`), which writes the same one
        file as without FSDP (so either kind of run resumes from it).

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
        full: dict[str, Any] = {}
        if self.parallel == "fsdp":  # collectives: every process gathers, process 0 writes
            full = {"model_state": full_model_state(self.em), "optim_state": full_optimizer_state(self.em, self.optimizer)}
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
        return write_state(path, self.em, self.optimizer, meta, rng, inputs=(self.em.source_path,), **full)

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
        if self.parallel == "fsdp":
            info, model_state, optim_state, rng = read_state_parts(path, self.em, self.optimizer)
            self.em.set_bn_stats({})
            load_full_state(self.em, self.optimizer, model_state, optim_state)
        else:
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
