"""Helpers of ``test_resume.py``: a digits model with dropout, the loaders users write, and the
resumed halves of the runs in a new process.

``python resume_helper.py JOBS.json`` runs each job of the JSON list in this (new) process:
``{"kind": "trainer", "case", "data", "state", "steps", "out"}`` loads the trainer state and
trains to ``steps``, then writes the model's state dict to ``out``; ``{"kind": "cli", "args"}``
runs ``elasticize`` with ``args``. ``{"threads": n}`` first sets torch's thread count, so that
the floating-point sums are the ones of the parent process.
"""

from __future__ import annotations

import json
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

#: The loaders of the resume tests (see :func:`loader`).
CASES = ("plain", "generator", "distributed", "unseeded")


class DropoutDigits(nn.Module):
    """conv -> BatchNorm -> 2D dropout -> pool -> linear -> dropout -> linear, for 8x8 digits."""

    def __init__(self, c: int = 8, hidden: int = 32, p: float = 0.3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.drop2d = nn.Dropout2d(p)
        self.fc1 = nn.Linear(16 * c, hidden)
        self.drop = nn.Dropout(p)
        self.fc2 = nn.Linear(hidden, 10)

    def example_inputs(self):
        return (torch.randn(2, 1, 8, 8),)

    def forward(self, x):
        x = nn.functional.max_pool2d(self.drop2d(torch.relu(self.bn(self.conv(x)))), 2)
        return self.fc2(self.drop(torch.relu(self.fc1(x.flatten(1)))))


def loader(case: str, x: torch.Tensor, y: torch.Tensor, batch_size: int = 32) -> DataLoader:
    """The loader of ``case``: ``plain`` (no shuffle), ``generator`` (shuffle with a seeded
    generator), ``distributed`` (``DistributedSampler`` of one replica, shuffled; the trainer
    calls ``set_epoch``), ``unseeded`` (shuffle without a generator: the global RNG)."""
    from torch.utils.data.distributed import DistributedSampler

    ds = TensorDataset(x, y)
    if case == "plain":
        return DataLoader(ds, batch_size=batch_size, shuffle=False)
    if case == "generator":
        return DataLoader(ds, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(7))
    if case == "distributed":
        return DataLoader(ds, batch_size=batch_size,
                          sampler=DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=11))
    if case == "unseeded":
        return DataLoader(ds, batch_size=batch_size, shuffle=True)
    raise KeyError(case)


def trainer(case: str, x: torch.Tensor, y: torch.Tensor):
    """A fresh trainer of a :class:`DropoutDigits` super-network (width) on ``case``'s loader."""
    import elasticize
    from elasticize.train import Trainer

    torch.manual_seed(0)
    em = elasticize.elasticize(DropoutDigits(), dims=("width",))
    opt = torch.optim.Adam(em.parameters(), 3e-3)
    return Trainer(em, loader(case, x, y), optimizer=opt, loss_fn=nn.CrossEntropyLoss(), seed=5,
                   strategy="sortednet", strategy_options={"accumulate": 2})


def _run(jobs: list[dict]) -> None:
    from safetensors.torch import load_file, save_file

    for job in jobs:
        if "threads" in job:
            torch.set_num_threads(int(job["threads"]))
        elif job["kind"] == "trainer":
            data = load_file(job["data"])
            tr = trainer(job["case"], data["x"], data["y"])
            tr.load_state(job["state"])
            tr.train_steps(int(job["steps"]) - tr.step)
            save_file({k: v.contiguous() for k, v in tr.em.model.state_dict().items()}, job["out"])
        else:
            from elasticize.cli import main

            main.main(job["args"], standalone_mode=False)  # a failing command raises


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        _run(json.load(f))
