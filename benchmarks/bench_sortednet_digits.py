"""SortedNet Table 1 at small scale on real data: scikit-learn's digits, a ResNet-style CNN with BatchNorm.

Widths 100/75/50/25% of every layer. Three ways, same optimizer, schedule and number of updates:

* **sorted**: one SortedNet run (stochastic loss, Eq. 1), then BN recalibration per width;
  once with a uniform ``P_B`` over the 4 widths and once with ``P_B`` weighted toward the full
  width (``--full-weight``, default 0.4, the rest uniform). The paper's BERT experiment notes that
  a sub-network does as well as its individual counterpart when it gets as many updates; under a
  uniform ``P_B`` the full width gets only a quarter of them;
* **individual**: each width trained alone as its own dense network;
* **truncation**: only the full network trained, then cut to each width (with BN recalibration).

Accuracy on held-out digits, mean over seeds; training time of the one sorted run vs the sum
of the individual runs, measured in the same process. ``--quick`` is a smoke run.

    OMP_NUM_THREADS=1 python benchmarks/bench_sortednet_digits.py
"""

from __future__ import annotations

import argparse
import statistics

import torch

import _results
from _digits import loaders, model, train

WIDTHS = {"full": 1.0, "large": 0.75, "medium": 0.5, "tiny": 0.25}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--full-weight", type=float, default=0.4, help="P_B of the full width in the weighted run")
    ap.add_argument("--quick", action="store_true")
    _results.add_argument(ap)
    args = ap.parse_args()
    if args.quick:
        args.steps, args.seeds = 40, 1
    torch.set_num_threads(1)
    c = args.channels
    rest = (1.0 - args.full_weight) / (len(WIDTHS) - 1)
    runs = {"sorted": None, "weighted": {"width": [args.full_weight] + [rest] * (len(WIDTHS) - 1)}}
    acc = {k: {w: [] for w in WIDTHS} for k in (*runs, "individual", "truncation")}
    t_sorted: dict[str, list[float]] = {k: [] for k in runs}
    t_indiv = []
    for seed in range(args.seeds):
        _, test = loaders(seed)
        for name, dist in runs.items():
            em = model(c, seed, dims=("width",))
            tr, t = train(em, seed, args.steps, "sortednet", distribution=dist)
            t_sorted[name].append(t)
            for w, v in tr.evaluate(test, metric="accuracy").items():
                acc[name][w].append(100 * v["accuracy"])
        total = 0.0
        for w, r in WIDTHS.items():
            dense = model(int(round(c * r)), seed, dims=("width",))
            trd, t = train(dense, seed, args.steps, "full")
            total += t
            acc["individual"][w].append(100 * trd.evaluate(test, metric="accuracy", presets=["full"])["full"]["accuracy"])
        t_indiv.append(total)
        em = model(c, seed, dims=("width",))
        tr, _ = train(em, seed, args.steps, "full")
        for w, v in tr.evaluate(test, metric="accuracy").items():
            acc["truncation"][w].append(100 * v["accuracy"])
        print(f"seed {seed}: sorted {t_sorted['sorted'][-1]:.1f} s, weighted {t_sorted['weighted'][-1]:.1f} s, "
              f"individual runs {total:.1f} s", flush=True)

    mean = {k: {w: statistics.mean(v) for w, v in d.items()} for k, d in acc.items()}
    print(f"\ndigits, DigitsResNet c={c}, {args.steps} updates, batch 64, AdamW 3e-3 cosine, mean of {args.seeds} seeds")
    header = ["width", "sorted, uniform `P_B`", f"sorted, `P_B` full {args.full_weight:g}", "individual",
              "uniform - individual", "weighted - individual", "full + truncation"]
    rows = []
    for w, r in WIDTHS.items():
        ind = mean["individual"][w]
        rows.append([f"{int(r * 100)}%", f"{mean['sorted'][w]:.2f}", f"{mean['weighted'][w]:.2f}", f"{ind:.2f}",
                     f"{mean['sorted'][w] - ind:+.2f}", f"{mean['weighted'][w] - ind:+.2f}",
                     f"{mean['truncation'][w]:.2f}"])
    print(_results.markdown(_results.table(header, rows)))
    print()
    summary = []
    for name in runs:
        ratio = sum(t_sorted[name]) / sum(t_indiv)
        worst_w = min(WIDTHS, key=lambda w: mean[name][w] - mean["individual"][w])
        worst = mean[name][worst_w] - mean["individual"][worst_w]
        print(f"{name}: one run / sum of individual runs, time {ratio:.2f}x ({sum(t_sorted[name]):.1f} s vs "
              f"{sum(t_indiv):.1f} s); every width within 0.5 points or better: {'met' if worst >= -0.5 else 'NOT met'} "
              f"(worst {worst:+.2f}); time <= 0.5x: {'met' if ratio <= 0.5 else 'NOT met'}")
        label = "uniform P_B" if runs[name] is None else f"P_B full {args.full_weight:g}"
        summary.append([
            label, f"{ratio:.2f}x ({sum(t_sorted[name]):.1f} s vs {sum(t_indiv):.1f} s)",
            f"{worst:+.2f} ({int(WIDTHS[worst_w] * 100)}%)",
            "met" if worst >= -0.5 and ratio <= 0.5 else
            "not met" + (f" at {int(WIDTHS[worst_w] * 100)}%" if worst < -0.5 else " (time)")])
    _results.write(__file__, [
        _results.table(header, rows, title=f"accuracy %, mean of {args.seeds} seeds (DigitsResNet c={c}, "
                                           f"{args.steps} updates, batch 64, AdamW 3e-3 cosine)"),
        _results.table(["run", "time of one sorted run / sum of the four individual runs", "worst width - individual",
                        "targets (every width within 0.5 points; <= 0.5x the time)"], summary)],
        dest=args.results, quick=args.quick, machine_text=_results.machine(1))


if __name__ == "__main__":
    main()
