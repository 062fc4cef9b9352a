"""Shared helpers. Every test runs offline on CPU; models are built from configs with random weights."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from elasticize.testing import math_attention  # noqa: F401  (re-exported for the tests)

# under pytest-xdist each worker process gets one core's worth of threads (CI has 2 cores, 2 workers)
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def counted(module: torch.nn.Module, *inputs: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``module(*inputs)`` without gradients, and its MACs by FlopCounterMode (FLOPs / 2), math attention."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc, torch.no_grad():
        y = math_attention(module)(*inputs)
    return y, fc.get_total_flops() / 2


def tol(ref: torch.Tensor) -> float:
    """1e-5, scaled by the output's magnitude when it exceeds 1.

    Importance sorting permutes channels, which reorders fp32 sums inside convolutions;
    randomly initialised torchvision ResNet-50 reaches logits near 80, where that reordering
    alone moves outputs by ~4e-5 (5e-7 relative).
    """
    return 1e-5 * max(1.0, ref.abs().max().item())


@contextmanager
def scratch_dir(tmp_path_factory, name: str):
    """A fresh folder for a module-scoped fixture, deleted when the fixture is torn down.

    The suite writes about 1.7 GB of safetensors files; pytest keeps a module fixture's folder
    until the session ends, which once filled the CI machine's disk mid-run. Per-test
    ``tmp_path`` folders are removed by ``tmp_path_retention_policy = "failed"`` (pyproject).
    """
    d = tmp_path_factory.mktemp(name)
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


#: width of the CLI's consoles in tests (``COLUMNS`` for a CLI run in a subprocess)
WIDE = 1000


@pytest.fixture(autouse=True, scope="session")
def wide_cli_console():
    """The CLI prints through rich, which wraps at 80 columns when output is not a terminal, so
    where a long message breaks depends on the length of the temporary paths inside it. Tests
    check the words, not the layout: a wide console keeps each message on one line."""
    from elasticize import cli

    for console in (cli.console, cli.err_console):
        console.width = WIDE
    yield
