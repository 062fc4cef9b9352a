"""The sorted trainer: make every sub-network of an elastic model good.

Pieces for your own loop: :class:`SubnetSampler` (SortedNet Eq. 1 sampling),
:func:`make_strategy` (``sortednet``, ``subnetwork-to-go``, ``sandwich``, ``skip-aware``,
``full``, or your own, registered with :func:`register_strategy`), :func:`train_step` (one
update), the losses in :mod:`elasticize.train.losses`, :func:`recalibrate_bn`,
:func:`sort_by_activation` (rank a fresh file's units on your data before training, as
``elasticize train`` does). Or the
:class:`Trainer`, which adds distillation from the frozen original, DDP under ``torchrun``,
resume, BN recalibration before evaluation and saving, and measured presets.

    >>> from elasticize.train import Trainer
    >>> tr = Trainer(em, loader, optimizer=torch.optim.AdamW(em.parameters(), 1e-3),
    ...              loss_fn=torch.nn.CrossEntropyLoss(), strategy="sortednet")
    >>> tr.train_steps(1000)
    >>> tr.evaluate(val_batches, metric="accuracy")   # em.metrics per preset
    >>> tr.save("trained.safetensors")                 # BN recalibrated per preset, stats in the file
"""

from .bn import batchnorm_layers, recalibrate_bn
from .losses import (cosine_distillation, default_output, forward_batch, hidden_distillation, kl_distillation,
                     masked_hidden, mean_pooled, mse_distillation, split_batch)
from .presort import presort_blocker, sort_by_activation
from .sampler import SubnetSampler
from .strategies import STRATEGIES, Pass, Strategy, StrategyOption, make_strategy, register_strategy
from .trainer import METRICS, Trainer, train_step

__all__ = ["Trainer", "train_step", "SubnetSampler", "make_strategy", "register_strategy", "Strategy",
           "StrategyOption", "Pass", "STRATEGIES", "recalibrate_bn", "batchnorm_layers", "kl_distillation",
           "cosine_distillation", "mse_distillation", "hidden_distillation", "mean_pooled", "masked_hidden",
           "default_output", "forward_batch", "split_batch", "METRICS", "sort_by_activation", "presort_blocker"]
