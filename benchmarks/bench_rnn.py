"""Subnetwork-to-go's Table 1 at small scale: one dynamic BSRNN vs stand-alone models of each size.

On the espeak-ng two-voice separation task of ``examples/bsrnn_separation.py`` (needs
``apt-get install -y espeak-ng`` once), with the same number of updates for every run:

* **dynamic (TAC)**: one BSRNN (depth D = 12 residual RNN layers, width W = 16 parallel FC
  modules with TAC reweighting) trained with Subnetwork-to-go's recipe (full network + one
  uniformly drawn sub-network per update), evaluated at several depth x width sub-networks;
* **dynamic (mean)**: the same with plain averaging of the modules instead of TAC (ablation);
* **stand-alone**: a BSRNN of each evaluated size, trained alone.

Printed: SI-SDR (dB) on held-out mixtures per configuration and run, MACs per second of audio,
the dynamic run's training time vs the summed time of the stand-alone runs, and the MAC range
of the one dynamic model (Subnetwork-to-go: 1.44G to 30.02G MACs, about 21x).

Usage::

    python benchmarks/bench_rnn.py            # ~10 min of CPU on 1 thread
    python benchmarks/bench_rnn.py --quick    # smoke run, ~1 min
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.bsrnn_separation import (BSRNN, batches, build, evaluate, load_corpus, mixtures, si_sdr,  # noqa: E402
                                       subnet, train)

CONFIGS = [(12, 16), (6, 8), (3, 4), (1, 1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few updates only: checks that everything runs")
    ap.add_argument("--steps", type=int, default=150, help="updates per run")
    ap.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate (cosine decay)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--interference", choices=["noise", "voice"], default="noise",
                    help="coloured noise (enhancement, default) or the second espeak-ng voice (separation)")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "elasticize-examples")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    steps = 3 if args.quick else args.steps
    corpus = load_corpus(args.cache)
    train_mix, train_ref = mixtures(corpus, "train", 2000, interference=args.interference, seed=0)
    test_mix, test_ref = mixtures(corpus, "test", 16 if args.quick else 96, interference=args.interference, seed=1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); {steps} updates of batch {args.batch} "
          f"(1 s mixtures at 8 kHz, {args.interference} interference) per run; {test_mix.shape[0]} held-out mixtures "
          f"(unprocessed SI-SDR {si_sdr(test_mix, test_ref).mean():.2f} dB)", flush=True)

    results: dict[str, dict[tuple[int, int], float]] = {}
    times: dict[str, float] = {}
    dyn = {}
    for reweight in ("tac", "mean"):
        em = build(reweight=reweight)
        t = train(em, batches(train_mix, train_ref, args.batch, seed=0), steps, dynamic=True, lr=args.lr, log_every=50)
        times[f"dynamic ({reweight})"] = t
        results[f"dynamic ({reweight})"] = {}
        for d, w in CONFIGS:
            with em.subnet(subnet(em, d, w)):
                results[f"dynamic ({reweight})"][d, w] = evaluate(em, test_mix, test_ref)
        dyn[reweight] = em
        print(f"dynamic ({reweight}) trained in {t:.0f} s", flush=True)
    results["stand-alone"] = {}
    for d, w in CONFIGS:
        torch.manual_seed(0)
        model = BSRNN(depth=d, modules=w)
        t = train(model, batches(train_mix, train_ref, args.batch, seed=0), steps, dynamic=False, lr=args.lr, log_every=50)
        times[f"stand-alone d={d} w={w}"] = t
        results["stand-alone"][d, w] = evaluate(model, test_mix, test_ref)
        print(f"stand-alone depth {d} width {w} trained in {t:.0f} s", flush=True)

    em = dyn["tac"]
    print()
    print("| depth d | width w | MACs / s of audio | dynamic, TAC | dynamic, plain average | stand-alone |")
    print("|---|---|---|---|---|---|")
    for d, w in CONFIGS:
        macs = em.macs(subnet(em, d, w))
        print(f"| {d} | {w} | {macs / 1e6:.1f}M | {results['dynamic (tac)'][d, w]:.2f} dB | "
              f"{results['dynamic (mean)'][d, w]:.2f} dB | {results['stand-alone'][d, w]:.2f} dB |")
    alone = sum(v for k, v in times.items() if k.startswith("stand-alone"))
    print()
    print(f"training time: one dynamic run {times['dynamic (tac)']:.0f} s vs {len(CONFIGS)} stand-alone runs "
          f"{alone:.0f} s in total (ratio {times['dynamic (tac)'] / alone:.2f}); the dynamic model holds all "
          f"{len(em.space.depth['layers']) * len(next(iter(em.space.modules.values())))} depth x width configurations")
    full, smallest = em.macs(None), em.macs(subnet(em, 1, 1))
    print(f"MAC range of the one model: {smallest / 1e6:.2f}M to {full / 1e6:.1f}M MACs per second of audio "
          f"({full / smallest:.1f}x; Subnetwork-to-go: 1.44G to 30.02G, 21x)")


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - t0:.0f} s")
