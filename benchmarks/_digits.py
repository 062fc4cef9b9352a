"""Shared set-up of the digits benchmarks: data, models, training and evaluation through elasticize.train."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from toy_models import DigitsResNet, digits  # noqa: E402,F401

import elasticize  # noqa: E402
from elasticize.train import Trainer  # noqa: E402


def loaders(seed: int, batch_size: int = 64) -> tuple[DataLoader, list]:
    """Training loader (shuffled with a per-epoch seed) and the held-out batches of one split of digits."""
    xtr, ytr, xte, yte = digits(seed=0)
    g = torch.Generator().manual_seed(seed)
    train = DataLoader(TensorDataset(xtr, ytr), batch_size=batch_size, shuffle=True, generator=g, drop_last=True)
    test = list(DataLoader(TensorDataset(xte, yte), batch_size=600))
    return train, test


def train(em: elasticize.ElasticModel, seed: int, steps: int, strategy: str, *, lr: float = 3e-3,
          options: dict | None = None, distribution: dict | None = None) -> tuple[Trainer, float]:
    """Train ``em`` with AdamW + cosine decay; returns the trainer and the training seconds."""
    train_loader, _ = loaders(seed)
    opt = torch.optim.AdamW(em.parameters(), lr=lr, weight_decay=1e-4)
    tr = Trainer(em, train_loader, optimizer=opt, loss_fn=nn.CrossEntropyLoss(), strategy=strategy,
                 strategy_options=options, seed=seed, distill=False, distribution=distribution,
                 scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps))
    t0 = time.perf_counter()
    tr.train_steps(steps)
    return tr, time.perf_counter() - t0


def model(c: int, seed: int, **options) -> elasticize.ElasticModel:
    torch.manual_seed(seed)
    return elasticize.elasticize(DigitsResNet(c=c, blocks=options.pop("blocks", 2)), sort=None, **options)
