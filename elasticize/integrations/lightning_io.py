"""Lightning checkpoints without pickle: :class:`SafetensorsCheckpointIO`.

Lightning's default ``TorchCheckpointIO`` writes each ``.ckpt`` with ``torch.save`` (a pickle).
This plugin writes the same checkpoint dict (weights, optimizer and scheduler states, loops,
callbacks' states, hyper-parameters) as one safetensors file with its non-tensor part as JSON
(:mod:`elasticize.integrations.checkpoint_dict`), under the name Lightning gives (``.ckpt``:
the content is safetensors whatever the extension), so ``ModelCheckpoint``'s bookkeeping and
``trainer.fit(..., ckpt_path=...)`` (also ``ckpt_path="last"``) work as before::

    from elasticize.integrations.lightning import ElasticLightningCallback, SafetensorsCheckpointIO

    trainer = pl.Trainer(plugins=[SafetensorsCheckpointIO()], callbacks=[ElasticLightningCallback(module.em)])

``LightningModule.load_from_checkpoint`` calls ``torch.load`` itself, not the plugin; read the
weights with :func:`~elasticize.integrations.checkpoint_dict.load_checkpoint_dict` instead
(``module.load_state_dict(load_checkpoint_dict(path)["state_dict"])``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ._optional import require
from .checkpoint_dict import load_checkpoint_dict, save_checkpoint_dict

_io = require("lightning_fabric.plugins.io.checkpoint_io", "integrations")

__all__ = ["SafetensorsCheckpointIO"]


class SafetensorsCheckpointIO(_io.CheckpointIO):
    """A Lightning ``CheckpointIO`` that writes and reads checkpoints as safetensors + JSON, never pickle.

    Pass it as ``pl.Trainer(plugins=[SafetensorsCheckpointIO()])`` (or to ``Fabric(plugins=...)``).
    A checkpoint holding something JSON and tensors cannot say (an object in the hyper-parameters,
    a function in a scheduler's state) is refused with its key path named, and no file is written.
    Local paths only.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to ``path`` atomically (see :func:`~elasticize.integrations.checkpoint_dict.save_checkpoint_dict`).

        Args:
            checkpoint: the dict Lightning builds.
            path: the file Lightning names (its folders are created).
            storage_options: not supported (must be None), as in ``TorchCheckpointIO``.

        Raises:
            TypeError: ``storage_options`` given, or a value the format cannot hold (its key path named).
            ValueError, FileExistsError, PermissionError, OSError: as
                :func:`~elasticize.integrations.checkpoint_dict.save_checkpoint_dict`.
        """
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options; call Trainer.save_checkpoint without them")
        save_checkpoint_dict(checkpoint, path)

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """Read a checkpoint this plugin wrote, with safetensors and ``json`` only.

        Args:
            path: the file.
            map_location: None (the CPU, as Lightning's default), a device or a device string.
            weights_only: ignored: nothing is ever unpickled, so every load is data only.

        Returns:
            The checkpoint dict Lightning saved.

        Raises:
            TypeError: ``map_location`` is a dict or a function (give a device).
            FileNotFoundError, ValueError: as :func:`~elasticize.integrations.checkpoint_dict.load_checkpoint_dict`
                (a pickled ``.ckpt`` is refused without being read).
        """
        if map_location is not None and not isinstance(map_location, (str, torch.device)):
            raise TypeError(f"{type(self).__name__} takes a device as map_location, not {type(map_location).__name__}")
        return load_checkpoint_dict(path, device=map_location)

    def remove_checkpoint(self, path: str | os.PathLike) -> None:
        """Remove the checkpoint file at ``path`` (nothing when it does not exist).

        Raises:
            IsADirectoryError: ``path`` is a folder (this plugin only writes files; nothing is removed).
        """
        p = Path(path)
        if p.is_dir() and not p.is_symlink():
            raise IsADirectoryError(f"{p} is a folder, not a checkpoint file this plugin wrote; nothing was removed")
        p.unlink(missing_ok=True)
