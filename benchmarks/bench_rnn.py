"""Subnetwork-to-go's Table 1 at small scale: one dynamic BSRNN vs stand-alone models of each size.

On the espeak-ng speech task of ``examples/bsrnn_separation.py`` (needs ``apt-get install -y
espeak-ng`` once), every run trained by elasticize's sorted trainer with the same number of
updates, loss, schedule and data order:

* **dynamic (TAC)**: one BSRNN (depth D = 12 residual RNN layers, width W = 16 parallel FC
  modules with TAC reweighting) trained with Subnetwork-to-go's recipe (strategy
  ``subnetwork-to-go``: full network + one random sub-network per update), evaluated at
  several depth x width sub-networks. The random sub-network's depth and width are drawn
  with ``P(k-th largest choice) ∝ k`` by default (``--sampling small``: the smallest drawn
  D or W times as often as the largest); ``--sampling uniform`` is the paper's uniform draw;
* **dynamic (mean)**: the same with plain averaging of the modules instead of TAC (ablation);
* **stand-alone**: a BSRNN of each evaluated size, trained alone (strategy ``full``).

Printed: SI-SDR (dB) on held-out mixtures per configuration and run, MACs per second of audio,
the dynamic run's training time vs the summed time of the stand-alone runs, and the MAC range
of the one dynamic model (Subnetwork-to-go: 1.44G to 30.02G MACs, about 21x).

Defaults (400 updates, Adam at lr 1e-2 with cosine decay, small-biased sampling) come from
150-update runs on this task: lr 1e-2 beat 5e-3 for the dynamic and the stand-alone models
alike, and the small-biased draw lifted the smallest sub-networks of the dynamic model without
changing the full one. The figures go to ``benchmarks/results/bench_rnn.json``.

Usage::

    python benchmarks/bench_rnn.py                          # ~20 min of CPU on 1 thread
    python benchmarks/bench_rnn.py --quick                  # smoke run, ~1 min
    python benchmarks/bench_rnn.py --runs tac,alone --steps 150   # a subset
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _results  # noqa: E402
from examples.bsrnn_separation import (build, load_corpus, loader, make_trainer, mixtures, si_sdr,  # noqa: E402
                                       si_sdr_metric, standalone, subnet)

CONFIGS = [(12, 16), (6, 8), (3, 4), (1, 1)]
RUNS = ("tac", "mean", "alone")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few updates only: checks that everything runs")
    ap.add_argument("--steps", type=int, default=400, help="updates per run")
    ap.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate (cosine decay)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sampling", choices=["uniform", "small"], default="small",
                    help="the random sub-network's depth and width: uniform over the choices (the paper), or "
                         "'small': P(k-th largest choice) proportional to k, the smallest drawn D (W) times as "
                         "often as the largest (the full network is trained at every update anyway)")
    ap.add_argument("--runs", default=",".join(RUNS),
                    help="which runs: tac (dynamic, TAC), mean (dynamic, plain average), alone (stand-alone models)")
    ap.add_argument("--interference", choices=["noise", "voice"], default="noise",
                    help="coloured noise (enhancement, default) or the second espeak-ng voice (separation)")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "elasticize-examples")
    _results.add_argument(ap)
    args = ap.parse_args()
    runs = [r for r in args.runs.split(",") if r]
    if set(runs) - set(RUNS):
        raise SystemExit(f"--runs takes {', '.join(RUNS)}; got {args.runs}")
    torch.set_num_threads(args.threads)
    steps = 3 if args.quick else args.steps
    corpus = load_corpus(args.cache)
    train_mix, train_ref = mixtures(corpus, "train", 2000, interference=args.interference, seed=0)
    test_mix, test_ref = mixtures(corpus, "test", 16 if args.quick else 96, interference=args.interference, seed=1)
    test = list(loader(test_mix, test_ref, 16, shuffle=False))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); {steps} updates of batch {args.batch} "
          f"(1 s mixtures at 8 kHz, {args.interference} interference, lr {args.lr}, {args.sampling} sampling) per run; "
          f"{test_mix.shape[0]} "
          f"held-out mixtures (unprocessed SI-SDR {si_sdr(test_mix, test_ref).mean():.2f} dB)", flush=True)

    def trained(em, strategy: str) -> tuple:
        dist = None
        if args.sampling == "small" and strategy != "full":
            dist = {"depth": list(range(1, len(em.space.depth["layers"]) + 1)),
                    "modules": list(range(1, len(next(iter(em.space.modules.values()))) + 1))}
        tr = make_trainer(em, loader(train_mix, train_ref, args.batch), steps, strategy=strategy, lr=args.lr,
                          distribution=dist)
        t0 = time.perf_counter()
        tr.train_steps(steps)
        return tr, time.perf_counter() - t0

    results: dict[str, dict[tuple[int, int], float]] = {}
    times: dict[str, float] = {}
    em = build()  # the TAC model: its MACs are the table's
    for reweight in [r for r in ("tac", "mean") if r in runs]:
        dyn = em if reweight == "tac" else build(reweight=reweight)
        tr, times[reweight] = trained(dyn, "subnetwork-to-go")
        results[reweight] = {(d, w): tr.measure(test, subnet(dyn, d, w), metric=si_sdr_metric) for d, w in CONFIGS}
        print(f"dynamic ({reweight}) trained in {times[reweight]:.0f} s: "
              + ", ".join(f"d={d} w={w} {v:.2f} dB" for (d, w), v in results[reweight].items()), flush=True)
    if "alone" in runs:
        results["alone"] = {}
        for d, w in CONFIGS:
            tr, times[f"alone {d} {w}"] = trained(standalone(d, w), "full")
            results["alone"][d, w] = tr.measure(test, None, metric=si_sdr_metric)
            print(f"stand-alone depth {d} width {w} trained in {times[f'alone {d} {w}']:.0f} s: "
                  f"{results['alone'][d, w]:.2f} dB", flush=True)

    def cell(run: str, key: tuple[int, int]) -> str:
        return f"{results[run][key]:.2f} dB" if run in results else "-"

    print()
    header = ["depth d", "width w", "MACs / s of audio", "dynamic, TAC", "dynamic, plain average", "stand-alone"]
    rows = [[str(d), str(w), f"{em.macs(subnet(em, d, w)) / 1e6:.1f}M", cell("tac", (d, w)), cell("mean", (d, w)),
             cell("alone", (d, w))] for d, w in CONFIGS]
    print(_results.markdown(_results.table(header, rows)))
    full, smallest = em.macs(None), em.macs(subnet(em, 1, 1))
    measures = [["MAC range of the one model", f"{smallest / 1e6:.2f}M to {full / 1e6:.1f}M MACs per second of audio, "
                 f"{full / smallest:.1f}x (d=1, w=1 to d=12, w=16)", "1.44G to 30.02G, 21x"]]
    alone = sum(v for k, v in times.items() if k.startswith("alone"))
    if "tac" in times and alone:
        print()
        print(f"training time: one dynamic run {times['tac']:.0f} s vs {len(CONFIGS)} stand-alone runs "
              f"{alone:.0f} s in total (ratio {times['tac'] / alone:.2f}); the dynamic model holds all "
              f"{len(em.space.depth['layers']) * len(next(iter(em.space.modules.values())))} depth x width "
              "configurations")
        measures.append(["training time", f"one dynamic run {times['tac']:.0f} s vs {alone:.0f} s for the "
                         f"{len(CONFIGS)} stand-alone runs ({times['tac'] / alone:.2f}x)",
                         "dynamic run much shorter than training every sub-network"])
    if "tac" in results and "alone" in results:
        gaps = [results["tac"][k] - results["alone"][k] for k in CONFIGS]
        measures.append(["dynamic (TAC) - stand-alone, per size above",
                         ", ".join(f"{g:+.2f} dB" for g in gaps), "dynamic better at every size"])
    if "tac" in results and "mean" in results:
        gaps = [results["tac"][k] - results["mean"][k] for k in CONFIGS]
        measures.append(["TAC - plain average, per size above", ", ".join(f"{g:+.2f} dB" for g in gaps), "TAC better"])
    print(f"MAC range of the one model: {smallest / 1e6:.2f}M to {full / 1e6:.1f}M MACs per second of audio "
          f"({full / smallest:.1f}x; Subnetwork-to-go: 1.44G to 30.02G, 21x)")
    _results.write(__file__, [
        _results.table(header, rows, title=f"SI-SDR on {test_mix.shape[0]} held-out mixtures (unprocessed: "
                                           f"{si_sdr(test_mix, test_ref).mean():.2f} dB)"),
        _results.table(["measure", "result", "paper"], measures, title="Against Subnetwork-to-go's Table 1")],
        dest=args.results, quick=args.quick, machine_text=_results.machine(args.threads))


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - t0:.0f} s")
