"""Sorted training inside a Hugging Face ``transformers.Trainer``.

:class:`ElasticCallback` holds the strategy, the sampler, the frozen original and the output
files. Given to a plain ``transformers.Trainer``, it makes each training forward of the elastic
model run the whole step's passes (one sub-network each, the model's own loss when the batch
has labels, distillation where the strategy asks for it) and return their summed loss, which
the Trainer backs once::

    from transformers import Trainer
    from elasticize.integrations.transformers import ElasticCallback

    trainer = Trainer(model=em, args=args, train_dataset=ds,             # was: model=model
                      callbacks=[ElasticCallback(em, strategy="sandwich", always=["small"])])
    trainer.train()                       # output_dir/elastic.safetensors: load with elasticize.load

That holds every pass's activations until the one backward. :class:`ElasticTrainer`
(``transformers.Trainer`` with :class:`ElasticTrainerMixin`) gives the same gradients with one
forward and backward per pass, so its memory is one pass's; your own ``Trainer`` subclass takes
the mixin: ``class MyTrainer(ElasticTrainerMixin, SFTTrainer)``.

At every checkpoint (``save_steps``) the callback writes, into the ``checkpoint-N`` folder, the
elasticize file (BN-recalibrated per preset, with its manifest) and the sampler's state as
JSON (``elasticize_sampler.json``, and the same under ``stateful_callbacks`` in the Trainer's
``trainer_state.json``); ``trainer.train(resume_from_checkpoint=...)`` restores it, so a resumed
run draws the sub-networks an uninterrupted one draws. At the end of training the file is
written to ``output_dir``.

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

__all__ = ["ElasticCallback", "ElasticTrainerMixin", "ElasticTrainer", "STATE_FILE", "STATE_KEY", "MODEL_FILE"]

#: The sampler state's file name inside a checkpoint folder (JSON).
STATE_FILE = "elasticize_sampler.json"
#: The elasticize file's name, in each checkpoint folder and in ``output_dir``.
MODEL_FILE = "elastic.safetensors"
#: The sampler state's key in ``trainer_state.json``'s ``stateful_callbacks`` (not a class name, so
#: ``restore_callback_states_from_checkpoint`` leaves it alone).
STATE_KEY = "elasticize.sampler"


class ElasticCallback(_hf.TrainerCallback):
    """Sorted training in a ``transformers.Trainer`` (plain, or :class:`ElasticTrainer`), and its output files.

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
        self.attached = False  # set by ElasticTrainerMixin: it runs the passes in its training_step
        self.restored = False  # the sampler state of a checkpoint has been loaded for this run
        self._data: Iterable[Any] | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, train_dataloader: Any = None, **kwargs: Any) -> None:
        """Pick the calibration data, restore a resumed run's sampler state, and (in a plain
        ``transformers.Trainer``) make the elastic model's training forward run the step's passes.

        Raises:
            ValueError: the Trainer trains another model than this callback's (a plain Trainer
                must be given ``model=em``), or a resumed state that does not fit this run.
        """
        if not self.attached:
            model = kwargs.get("model")
            if model is not None and model is not self.em:
                raise ValueError("the ElasticCallback is for another model: give the Trainer model=em, the elastic model")
            self.em.step_forward = self._step_forward
        saved = (getattr(state, "stateful_callbacks", None) or {}).get(STATE_KEY)
        if state.global_step > 0 and not self.restored and isinstance(saved, Mapping):
            self.session.load_state(saved)
            self.restored = True
        self._data = self.calibration_data if self.calibration_data is not None else train_dataloader
        self.em.set_bn_stats({})

    def _step_forward(self, *args: Any, **kwargs: Any) -> Any:
        """The elastic model's training forward in a plain Trainer: all of one step's passes."""
        if args:
            raise ValueError("ElasticCallback in a plain transformers.Trainer needs keyword inputs (a batch of "
                             "named columns); for positional batches use ElasticTrainer")
        out, losses = self.session.step_output(kwargs)
        self.history.append(losses)
        return out

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Before a checkpoint (``DefaultFlowCallback``, which runs first, has set ``should_save``), put the
        sampler state in the Trainer's state, so ``trainer_state.json`` carries it to a resume."""
        if control.should_save:
            state.stateful_callbacks[STATE_KEY] = self.session.state()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Write the elasticize file and the sampler state into the checkpoint folder just saved."""
        if args.should_save:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            self._write(folder / self.file_name)
            text = json.dumps(self.session.state())
            atomic_write(folder / STATE_FILE, lambda tmp: Path(tmp).write_text(text), overwrite=True)
            self.em.set_bn_stats({})  # training goes on with the trained statistics

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Write the final elasticize file (BN-recalibrated per preset) to ``output_dir``; the elastic
        model's forward is a plain forward again."""
        self.em.step_forward = None
        self.restored = False
        if args.should_save:
            self._write(Path(args.output_dir) / self.file_name)

    def _write(self, path: Path) -> None:
        import elasticize

        hook, self.em.step_forward = self.em.step_forward, None  # recalibration runs plain forwards
        try:
            if self._data is not None:
                self.session.recalibrate(self._data)
            path.parent.mkdir(parents=True, exist_ok=True)
            elasticize.save(self.em, path, overwrite=True)
        finally:
            self.em.step_forward = hook

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
        self.restored = True
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
