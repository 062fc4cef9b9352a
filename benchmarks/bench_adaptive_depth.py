"""Adaptive Depth Networks (arXiv 2312.16392) ablation on real data: scikit-learn's digits.

A ResNet-style CNN with BatchNorm, two stages of 4 residual blocks; ``depth_mode="skippable"``
makes the last 2 blocks of each stage one skippable sub-path. Trained with the ``skip-aware``
strategy (super-net + base-net only), with and without skip-aware self-distillation (KL from the
super-net vs the task loss on the base-net) and with and without switchable BatchNorm in the
mandatory sub-paths. Accuracy of the super-net and the base-net on held-out digits, first with
the statistics training left (what switchable BN is for), then after BN recalibration. Training
cost: the one skip-aware run (which gives all 4 depth variants: each stage's sub-path on or off)
vs training the 4 depth variants separately.

    OMP_NUM_THREADS=1 python benchmarks/bench_adaptive_depth.py
"""

from __future__ import annotations

import argparse
import statistics

import torch

import _results
from _digits import DigitsResNet, loaders, train

import elasticize
from elasticize.graph import analyze
from elasticize.model import ElasticModel
from elasticize.plan import build_plan
from elasticize.rules import find_rule


def adaptive(seed: int, c: int, switchable: bool) -> ElasticModel:
    torch.manual_seed(seed)
    m = DigitsResNet(c=c, blocks=4)
    # width at one choice only: depth is what varies; the norms' tensors are listed so they can be switchable
    plan = build_plan(analyze(m, m.example_inputs(), find_rule), dims=("width", "depth"), depth_mode="skippable",
                      width_ratios=(1.0,), heads_ratios=(1.0,))
    if not switchable:
        plan = dataclasses.replace(plan, switchable=frozen_map({}))
    return ElasticModel(m, plan)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--quick", action="store_true")
    _results.add_argument(ap)
    args = ap.parse_args()
    if args.quick:
        args.steps = 30
    torch.set_num_threads(1)
    variants = {"self-distillation + switchable BN": (True, True), "self-distillation only": (True, False),
                "switchable BN only": (False, True), "neither": (False, False)}
    rows: dict[str, dict[str, list[float]]] = {}
    times: dict[str, list[float]] = {}
    for seed in range(args.seeds):
        _, test = loaders(seed)
        for name, (distill, switch) in variants.items():
            em = adaptive(seed, args.channels, switch)
            tr, t = train(em, seed, args.steps, "skip-aware", options={"self_distill": distill})
            times.setdefault(name, []).append(t)
            base = tr.sampler.smallest()
            r = rows.setdefault(name, {})
            r.setdefault("super", []).append(100 * tr.measure(test, None))
            r.setdefault("base", []).append(100 * tr.measure(test, base))
            tr.recalibrate()
            r.setdefault("super (recal)", []).append(100 * tr.measure(test, "full"))
            base_name = next(n for n in em.presets if em.resolve(n) == base)
            r.setdefault("base (recal)", []).append(100 * tr.measure(test, base_name))
        for blocks, label in (((4, 4), "super-net alone"), ((2, 2), "base-net alone"), ((2, 4), "stage 1 skipped, alone"),
                              ((4, 2), "stage 2 skipped, alone")):
            torch.manual_seed(seed)
            dense = elasticize.elasticize(DigitsResNet(c=args.channels, blocks=blocks), dims=("width",),
                                          width_ratios=(1.0,), sort=None)
            tr, t = train(dense, seed, args.steps, "full")
            times.setdefault(label, []).append(t)
            key = {(4, 4): "super", (2, 2): "base"}.get(blocks, "other")
            rows.setdefault(label, {}).setdefault(key, []).append(
                100 * tr.evaluate(test, presets=["full"])["full"]["accuracy"])
        print(f"seed {seed} done", flush=True)
    m = lambda v: f"{statistics.mean(v):.2f}" if v else "-"  # noqa: E731
    print(f"\ndigits, DigitsResNet c={args.channels}, 2 stages x 4 blocks (2 skippable), {args.steps} updates, "
          f"mean of {args.seeds} seed(s); accuracy %")
    header = ["training", "super-net", "base-net", "super-net, BN recalibrated", "base-net, BN recalibrated",
              "train s"]
    cells = [[name, m(r.get("super", [])), m(r.get("base", [])), m(r.get("super (recal)", [])),
              m(r.get("base (recal)", [])), f"{statistics.mean(times[name]):.1f}"] for name, r in rows.items()]
    print(_results.markdown(_results.table(header, cells)))
    sep = sum(statistics.mean(v) for k, v in times.items() if k.endswith("alone"))
    ours = statistics.mean(times["self-distillation + switchable BN"])
    print(f"\ntraining cost: one skip-aware run / the 4 depth variants trained separately = {ours / sep:.2f}x "
          f"({ours:.1f} s vs {sep:.1f} s)")
    _results.write(__file__, [
        _results.table(header, cells, title=f"accuracy %, mean of {args.seeds} seed(s)"),
        _results.table(["measure", "result"], [["one skip-aware run (all 4 depth variants) / the 4 variants trained "
                                                "separately", f"{ours / sep:.2f}x ({ours:.1f} s vs {sep:.1f} s)"]])],
        dest=args.results, quick=args.quick, machine_text=_results.machine(1))


if __name__ == "__main__":
    main()
