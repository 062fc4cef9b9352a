"""``torch.compile`` and sub-networks: how many graphs dynamo captures, compiling the elastic model
against compiling each extracted sub-network.

An elastic model's forward reads its active sub-network from Python integers (the switches that
``set_subnet`` stores), so dynamo guards on them: each distinct sub-network is a new graph (a
recompilation), up to ``torch._dynamo.config.recompile_limit`` (8 in torch 2.x), after which that
frame runs in eager mode. Printed, for the zoo's BatchNorm CNN (``elasticize.testing.zoo``):

* **elastic, presets**: ``torch.compile(em)``, each preset set in turn, twice round;
* **elastic, random**: the same compiled model on sub-networks drawn by the trainer's sampler
  (``per="group"``, as in training), the graphs captured and whether the recompile limit was hit;
* **extracted**: ``torch.compile(em.extract(p))`` once per preset, each called three times.

Graphs and recompilations are dynamo's counters (``torch._dynamo.utils.counters``), the same for
every backend; the script compiles with ``backend="eager"`` so that it measures capture, not code
generation (no C++ compiler needed). Usage::

    python benchmarks/bench_compile.py            # a few seconds
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _results  # noqa: E402


class _LimitHits(logging.Handler):
    """Counts dynamo's "recompile_limit reached" warnings."""

    def __init__(self) -> None:
        super().__init__()
        self.hits = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.hits += "recompile_limit" in record.getMessage()


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _reset() -> None:
    """Forget every compiled graph and zero the counters."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    dynamo.reset()
    counters.clear()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--random", type=int, default=24, help="random sub-networks for the elastic model (default 24)")
    _results.add_argument(ap)
    args = ap.parse_args()
    import torch._dynamo as dynamo

    import elasticize
    from elasticize.testing.zoo import build
    from elasticize.train.sampler import SubnetSampler

    torch.set_num_threads(1)
    model, x = build("batchnorm")
    em = elasticize.elasticize(model.eval(), example_inputs=x).eval()
    presets = list(em.presets)
    hits = _LimitHits()
    log = logging.getLogger("torch._dynamo")
    log.addHandler(hits)
    warnings.filterwarnings("ignore", message=".*lru_cache")
    rows = []
    with torch.no_grad():
        _reset()
        hits.hits = 0
        compiled = torch.compile(em, backend="eager")
        for _ in range(2):
            for p in presets:
                em.set_subnet(p)
                compiled(*x)
        rows.append(["elastic, presets", f"{2 * len(presets)} calls, {len(presets)} sub-networks", _graphs(),
                     "yes" if hits.hits else "no"])
        _reset()
        hits.hits = 0
        compiled = torch.compile(em, backend="eager")
        sampler = SubnetSampler(em.space, seed=0, per="group")
        seen = set()
        for _ in range(args.random):
            cfg = sampler.sample()
            seen.add(repr(cfg))
            em.set_subnet(cfg)
            compiled(*x)
        rows.append(["elastic, random", f"{args.random} calls, {len(seen)} sub-networks", _graphs(),
                     "yes" if hits.hits else "no"])
        _reset()
        hits.hits = 0
        for p in presets:
            dense = torch.compile(em.extract(p), backend="eager")
            for _ in range(3):
                dense(*x)
        rows.append(["extracted, one compile per preset", f"{3 * len(presets)} calls, {len(presets)} sub-networks",
                     _graphs(), "yes" if hits.hits else "no"])
    cols = ["what is compiled", "calls", "graphs captured", "recompile limit hit"]
    print(_results.markdown(_results.table(cols, rows)))
    note = (f"torch._dynamo.config.recompile_limit = {dynamo.config.recompile_limit}: past it, dynamo stops compiling "
            "the elastic model's forward and runs it in eager mode for every new sub-network")
    print(note)
    _results.write(__file__, [_results.table(cols, rows, title="graphs captured by torch.compile", notes=note)],
                   dest=args.results, machine_text=_results.machine(1))


if __name__ == "__main__":
    main()
