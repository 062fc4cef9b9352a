"""Sorted training inside a Lightning ``Trainer``: :class:`ElasticLightningCallback`.

The callback trains the elastic model held by your ``LightningModule`` with a strategy's
passes at every step (one sub-network each; the model's own loss when the batch has labels, or
``loss_fn``; distillation where the strategy asks for it). While fitting, the module's
``training_step`` returns the sum of the passes' weighted losses, and Lightning runs one backward
over it (one forward of the module, so DDP sees all passes). Your ``configure_optimizers``,
schedulers, precision, logging and loops stay as they are::

    from elasticize.integrations.lightning import ElasticLightningCallback, SafetensorsCheckpointIO

    trainer = pl.Trainer(max_steps=1000, plugins=[SafetensorsCheckpointIO()],
                         callbacks=[ElasticLightningCallback(module.em, strategy="sandwich")])
    trainer.fit(module, loader)                   # default_root_dir/elastic.safetensors

With each checkpoint (``ModelCheckpoint``) the callback writes the elasticize file (safetensors
with its manifest, BN-recalibrated per preset) beside it in the checkpoint folder, named after
the step (``elastic-step=N.safetensors``). Its state in the ``.ckpt`` is JSON-native (the
sampler's generator as base64), so ``trainer.fit(..., ckpt_path=...)`` resumes the same draws.

Lightning's own ``.ckpt`` is a pickle (``torch.save``) unless the trainer has the plugin
:class:`~elasticize.integrations.lightning_io.SafetensorsCheckpointIO` (re-exported here): then it is
one safetensors file with the checkpoint's non-tensor part as JSON, and resuming works the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from ..model import ElasticModel
from ._optional import require
from .lightning_io import SafetensorsCheckpointIO
from .session import ElasticSession

_pl = require("pytorch_lightning", "integrations")

__all__ = ["ElasticLightningCallback", "SafetensorsCheckpointIO"]


class ElasticLightningCallback(_pl.Callback):
    """Run a strategy's passes in every training step of a Lightning module that holds ``em``.

    Args:
        em: the elastic model, a submodule of the ``LightningModule`` being fitted.
        strategy: a registered strategy name or :class:`~elasticize.train.Strategy` (one micro-batch per step).
        strategy_options: options of a strategy given by name.
        seed: the sampler's seed.
        always: presets or configurations trained at every step.
        distill: ``"auto"``, True, False or a teacher module (see :class:`~elasticize.train.Trainer`).
        distill_loss: ``"kl"``, ``"cosine"``, ``"mse"``, ``"hidden"`` or a callable.
        loss_fn: task loss ``(output tensor, target) -> scalar`` for a model without its own loss.
        calibration_data: batches for BN recalibration before each save (default: the training data).
        calibration_batches: batches per preset for BN recalibration.
        file_name: the final elasticize file's name in ``trainer.default_root_dir``.

    Raises:
        TypeError, KeyError, ValueError: as :class:`~elasticize.integrations.session.ElasticSession`.
    """

    def __init__(self, em: ElasticModel, *, strategy: str = "sandwich", strategy_options: Mapping[str, Any] | None = None,
                 seed: int = 0, always: Sequence[str | Mapping[str, Any]] = (), distill: Any = "auto",
                 distill_loss: Any = "kl", loss_fn: Any = None, calibration_data: Iterable[Any] | None = None,
                 calibration_batches: int = 8, file_name: str = "elastic.safetensors") -> None:
        self.session = ElasticSession(em, strategy=strategy, strategy_options=strategy_options, seed=seed,
                                      always=always, distill=distill, distill_loss=distill_loss, loss_fn=loss_fn,
                                      calibration_batches=calibration_batches)
        self.em = em
        self.calibration_data = calibration_data
        self.file_name = file_name
        self.history: list[dict[str, float]] = []  # per training step: mean loss per pass label
        self._saved_step: Any = None

    # ------------------------------------------------------------------ the passes
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Check that ``em`` belongs to the module; put it in training mode; make the module's
        ``training_step`` run the passes.

        Raises:
            ValueError: ``em`` is not a submodule of the module being fitted.
        """
        if not any(m is self.em for m in pl_module.modules()):
            raise ValueError("the ElasticLightningCallback's model is not in this LightningModule: give it the "
                             "ElasticModel the module holds (e.g. ElasticLightningCallback(module.em))")
        self._saved_step = pl_module.__dict__.get("training_step")
        self.em.set_bn_stats({})
        self.em.train()

        def training_step(batch: Any, batch_idx: int = 0, *args: Any) -> torch.Tensor:
            parts: list[torch.Tensor] = []
            losses = self.session.step(batch, backward=parts.append)
            self.history.append(losses)
            pl_module.log_dict({f"elastic/{k}": v for k, v in losses.items()}, on_step=True, prog_bar=False)
            return torch.stack([p.float() for p in parts]).sum()

        pl_module.training_step = training_step

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        """Give the module its own ``training_step`` back."""
        if self._saved_step is None:
            pl_module.__dict__.pop("training_step", None)
        else:
            pl_module.training_step = self._saved_step

    # ------------------------------------------------------------------ files and state
    def _write(self, trainer: Any, path: Path) -> None:
        import elasticize

        data = self.calibration_data if self.calibration_data is not None else trainer.train_dataloader
        if data is not None:
            self.session.recalibrate(data)
        path.parent.mkdir(parents=True, exist_ok=True)
        elasticize.save(self.em, path, overwrite=True)

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """Write the elasticize file of this step beside the checkpoint (rank 0)."""
        ckpt = trainer.checkpoint_callback
        folder = Path(ckpt.dirpath) if ckpt is not None and ckpt.dirpath else Path(trainer.default_root_dir)
        if trainer.is_global_zero:
            self._write(trainer, folder / f"elastic-step={trainer.global_step}.safetensors")
        self.em.set_bn_stats({})  # training goes on with the trained statistics

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Write the final elasticize file (BN-recalibrated per preset) to ``default_root_dir`` (rank 0)."""
        if trainer.is_global_zero:
            self._write(trainer, Path(trainer.default_root_dir) / self.file_name)

    def state_dict(self) -> dict[str, Any]:
        """The sampler state, JSON-native (stored in the ``.ckpt`` by Lightning)."""
        return self.session.state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (see :meth:`ElasticSession.load_state
        <elasticize.integrations.session.ElasticSession.load_state>` for its errors)."""
        self.session.load_state(state_dict)
