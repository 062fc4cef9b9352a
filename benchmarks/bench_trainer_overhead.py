"""Trainer overhead: time of one optimizer step of each strategy over a plain training step of the full model.

The plain step is a hand-written loop on the original (not elastic) model: forward, cross-entropy,
backward, ``optimizer.step()``. Each strategy runs through :func:`elasticize.train.train_step` on the
converted model (width and depth elastic), on the same batch (digits, batch 64). A strategy runs
several forward/backward passes per step (SortedNet: ``accumulate``; sandwich: 2 + n), and its
sub-networks are smaller than the full model, so the ratio is not the overhead alone: the
``full`` strategy's ratio is the trainer's own overhead. Rounds alternate between the variants;
medians are reported; every ratio comes from this one run.

    OMP_NUM_THREADS=1 python benchmarks/bench_trainer_overhead.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import _results
from _digits import DigitsResNet, digits

import elasticize
from elasticize.train import SubnetSampler, make_strategy, train_step

VARIANTS = {
    "full (trainer, full model only)": ("full", {}),
    "sortednet (1 sub-network)": ("sortednet", {}),
    "sortednet, accumulate 4": ("sortednet", {"accumulate": 4}),
    "sortednet, stochastic summation": ("sortednet", {"objective": "stochastic-summation"}),
    "subnetwork-to-go": ("subnetwork-to-go", {}),
    "sandwich (n=2)": ("sandwich", {"n": 2}),
    "skip-aware": ("skip-aware", {}),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20, help="steps per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    _results.add_argument(ap)
    args = ap.parse_args()
    if args.quick:
        args.steps, args.rounds = 3, 2
    torch.set_num_threads(1)
    x, y, _, _ = digits()
    batch = (x[:64], y[:64])
    torch.manual_seed(0)
    plain = DigitsResNet(c=32)
    popt = torch.optim.AdamW(plain.parameters(), 1e-3)
    ce = nn.CrossEntropyLoss()

    def plain_step() -> None:
        popt.zero_grad(set_to_none=True)
        ce(plain(batch[0]), batch[1]).backward()
        popt.step()

    runs = {"plain step (original model)": (plain_step, 1)}
    for name, (strategy, options) in VARIANTS.items():
        torch.manual_seed(0)
        em = elasticize.elasticize(DigitsResNet(c=32), dims=("width", "depth"),
                                   depth_mode="skippable" if strategy == "skip-aware" else "prefix").train()
        opt = torch.optim.AdamW(em.parameters(), 1e-3)
        st = make_strategy(strategy, **options)
        sampler = SubnetSampler(em.space, seed=0)
        batches = [batch] * st.micro_batches
        runs[name] = ((lambda em=em, opt=opt, st=st, sampler=sampler, batches=batches:
                       train_step(em, batches, strategy=st, sampler=sampler, optimizer=opt, loss_fn=ce)),
                      len(st.passes(SubnetSampler(em.space, seed=1))))
    plain.train()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for fn, _ in runs.values():
        fn()  # warm-up
    for _ in range(args.rounds):
        for name, (fn, _) in runs.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fn()
            times[name].append((time.perf_counter() - t0) / args.steps)
    base = statistics.median(times["plain step (original model)"])
    print(f"digits batch 64, DigitsResNet c=32 (width 100/75/50/25%, depth), CPU {torch.get_num_threads()} thread, "
          f"median of {args.rounds} rounds x {args.steps} steps")
    rows = [[name, str(passes), f"{1000 * statistics.median(times[name]):.1f}",
             f"{statistics.median(times[name]) / base:.2f}x"] for name, (_, passes) in runs.items()]
    header = ["step", "passes", "ms / step", "ratio to plain step"]
    print(_results.markdown(_results.table(header, rows)))
    _results.write(__file__, [_results.table(header, rows, title=f"step time over a plain step of the original model "
                                                                 f"({1000 * base:.1f} ms); medians of {args.rounds} "
                                                                 f"alternating rounds x {args.steps} steps")],
                   dest=args.results, quick=args.quick, machine_text=_results.machine(1))


if __name__ == "__main__":
    main()
