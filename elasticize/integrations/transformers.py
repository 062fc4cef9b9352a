"""Sorted training inside a Hugging Face ``transformers.Trainer``.

:class:`ElasticCallback` holds the strategy, the sampler, the frozen original and the output
files; :class:`ElasticTrainer` (``transformers.Trainer`` with :class:`ElasticTrainerMixin`) runs
each strategy's passes in its ``training_step``: one forward and backward per sub-network, the
model's own loss when the batch has labels, distillation where the strategy asks for it. One
line changes in a Hugging Face script::

    from elasticize.integrations.transformers import ElasticCallback, ElasticTrainer

    trainer = ElasticTrainer(model=em, args=args, train_dataset=ds,      # was: Trainer(model=model, ...)
                             callbacks=[ElasticCallback(em, strategy="sandwich", always=["small"])])
    trainer.train()                       # output_dir/elastic.safetensors: load with elasticize.load

At every checkpoint (``save_steps``) the callback writes, into the ``checkpoint-N`` folder, the
elasticize file (BN-recalibrated per preset, with its manifest) and the sampler's state as
JSON (``elasticize_sampler.json``); ``trainer.train(resume_from_checkpoint=...)`` restores it, so
a resumed run draws the sub-networks an uninterrupted one draws. At the end of training the
file is written to ``output_dir``. Your own ``Trainer`` subclass takes the mixin:
``class MyTrainer(ElasticTrainerMixin, SFTTrainer)``.

``em.forward`` has the wrapped model's signature, so ``remove_unused_columns=True`` keeps the
model's columns. SortedNet's gradient accumulation is the Trainer's own:
``gradient_accumulation_steps=k`` with ``strategy_options={"accumulate": 1}`` draws one
sub-network per micro-batch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from .._files import atomic_write
from ..model import ElasticModel
from ._optional import require
from .session import ElasticSession

_hf = require("transformers", "integrations")
require("accelerate", "integrations")  # transformers.Trainer needs it
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint  # noqa: E402

__all__ = ["ElasticCallback", "ElasticTrainerMixin", "ElasticTrainer", "STATE_FILE", "MODEL_FILE"]

#: The sampler state's file name inside a checkpoint folder (JSON).
STATE_FILE = "elasticize_sampler.json"
#: The elasticize file's name, in each checkpoint folder and in ``output_dir``.
MODEL_FILE = "elastic.safetensors"


class ElasticCallback(_hf.TrainerCallback):
    """Sorted training settings and output files for :class:`ElasticTrainer`.

    Args:
        em: the elastic model given to the Trainer as ``model``.
        strategy: a registered strategy name (see :func:`~elasticize.train.make_strategy`) or a
            :class:`~elasticize.train.Strategy`, with one micro-batch per step.
        strategy_options: options of a strategy given by name.
        seed: the sampler's seed.
        always: presets or configurations trained at every step (see :class:`~elasticize.train.Trainer`).
        distill: ``"auto"``, True, False or a teacher module (see :class:`~elasticize.train.Trainer`).
        distill_loss: ``"kl"``, ``"cosine"``, ``"mse"``, ``"hidden"`` or a callable.
        calibration_data: batches for BN recalibration before each save (default: the training data).
        calibration_batches: batches per preset for BN recalibration.
        file_name: the elasticize file's name.

    Raises:
        TypeError, KeyError, ValueError: as :class:`~elasticize.integrations.session.ElasticSession`.
    """

    def __init__(self, em: ElasticModel, *, strategy: str = "sandwich", strategy_options: Mapping[str, Any] | None = None,
                 seed: int = 0, always: Sequence[str | Mapping[str, Any]] = (), distill: Any = "auto",
                 distill_loss: Any = "kl", calibration_data: Iterable[Any] | None = None,
                 calibration_batches: int = 8, file_name: str = MODEL_FILE) -> None:
        self.session = ElasticSession(em, strategy=strategy, strategy_options=strategy_options, seed=seed,
                                      always=always, distill=distill, distill_loss=distill_loss,
                                      calibration_batches=calibration_batches)
        self.em = em
        self.calibration_data = calibration_data
        self.file_name = file_name
        self.history: list[dict[str, float]] = []  # per training step: mean loss per pass label
        self.attached = False  # set by ElasticTrainerMixin
        self._data: Iterable[Any] | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, train_dataloader: Any = None, **kwargs: Any) -> None:
        """Check that an :class:`ElasticTrainerMixin` trainer runs the passes; pick the calibration data.

        Raises:
            ValueError: the callback was given to a plain ``transformers.Trainer``.
        """
        if not self.attached:
            raise ValueError("ElasticCallback needs a Trainer that runs its passes: use "
                             "elasticize.integrations.transformers.ElasticTrainer (or your own "
                             "class MyTrainer(ElasticTrainerMixin, Trainer)) instead of transformers.Trainer")
        self._data = self.calibration_data if self.calibration_data is not None else train_dataloader
        self.em.set_bn_stats({})

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Write the elasticize file and the sampler state into the checkpoint folder just saved."""
        if args.should_save:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            self._write(folder / self.file_name)
            text = json.dumps(self.session.state())
            atomic_write(folder / STATE_FILE, lambda tmp: Path(tmp).write_text(text), overwrite=True)
            self.em.set_bn_stats({})  # training goes on with the trained statistics

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Write the final elasticize file (BN-recalibrated per preset) to ``output_dir``."""
        if args.should_save:
            self._write(Path(args.output_dir) / self.file_name)

    def _write(self, path: Path) -> None:
        import elasticize

        if self._data is not None:
            self.session.recalibrate(self._data)
        path.parent.mkdir(parents=True, exist_ok=True)
        elasticize.save(self.em, path, overwrite=True)

    def load_checkpoint(self, folder: str | os.PathLike) -> bool:
        """Restore the sampler state saved in a checkpoint folder.

        Returns:
            Whether the folder held one (a checkpoint from a run without this callback has none).

        Raises:
            ValueError: a state that is not JSON or does not fit this run (see
                :meth:`ElasticSession.load_state <elasticize.integrations.session.ElasticSession.load_state>`).
        """
        p = Path(folder) / STATE_FILE
        if not p.is_file():
            return False
        try:
            state = json.loads(p.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{p} is not JSON ({e}); the checkpoint is damaged") from e
        self.session.load_state(state)
        return True


class ElasticTrainerMixin:
    """Put in front of a ``transformers.Trainer`` class: its ``training_step`` runs the passes of
    the :class:`ElasticCallback` among its callbacks.

    Raises:
        ValueError: (at construction) no :class:`ElasticCallback` among the callbacks, or one for
            another model than the Trainer's ``model``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        found = [cb for cb in self.callback_handler.callbacks if isinstance(cb, ElasticCallback)]
        if len(found) != 1:
            raise ValueError(f"{type(self).__name__} needs exactly one ElasticCallback in callbacks=[...], got "
                             f"{len(found)}")
        self.elastic = found[0]
        if self.elastic.em is not self.model:
            raise ValueError("the ElasticCallback is for another model: give the Trainer model=em, the elastic model")
        self.elastic.attached = True
        if self.args.label_names is None and self.elastic.session._labels:
            self.label_names = list(self.elastic.session._labels)  # evaluation computes the model's loss

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``; a resumed run also restores the sampler state from the checkpoint."""
        folder = get_last_checkpoint(self.args.output_dir) if resume_from_checkpoint is True else resume_from_checkpoint
        if folder:
            self.elastic.load_checkpoint(folder)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Any = None) -> torch.Tensor:
        """Forward and backward every pass of one step (each loss divided by the accumulation steps).

        Returns:
            The detached sum of the passes' weighted losses, divided by the accumulation steps.
        """
        model.train()
        inputs = self._prepare_inputs(inputs)
        ga = self.current_gradient_accumulation_steps
        with self.compute_loss_context_manager():
            losses = self.elastic.session.step(inputs, runner=model,
                                               backward=lambda loss: self.accelerator.backward(loss / ga))
        self.elastic.history.append(losses)
        return torch.tensor(sum(losses.values()) / ga, device=self.args.device)


class ElasticTrainer(ElasticTrainerMixin, _hf.Trainer):
    """``transformers.Trainer`` with :class:`ElasticTrainerMixin`: give it ``model=em`` and an :class:`ElasticCallback`."""
