"""Learning-rate schedules of ``elasticize train``: constant vs cosine vs one-cycle on real digits.

Runs the job ``elasticize train`` runs (:func:`elasticize.train.train_file`) on scikit-learn's
bundled digits written as an image folder (1,797 8x8 PNGs, one sub-folder per class), with a
``DigitsResNet`` (16 channels, elastic width 25/50/75/100%, random initial weights) converted by
``elasticize convert``. For every ``--lr`` and ``--schedule`` it trains ``--steps`` updates of
the ``sortednet`` strategy with each seed (the seed also picks the 20% held out) and prints the
mean held-out accuracy of each preset over the seeds, and the mean seconds per run (CPU).

    python benchmarks/bench_train_schedule.py --steps 300 --lrs 1e-3,3e-3 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from toy_models import digits  # noqa: E402

import _results  # noqa: E402
from elasticize.cli import main  # noqa: E402
from elasticize.train.run import SCHEDULES, train_file  # noqa: E402


def image_folder(root: Path) -> Path:
    """Every digits image (train and test splits of ``toy_models.digits``) as a PNG per class folder."""
    from PIL import Image

    x, y, xt, yt = digits()
    folder = root / "digits"
    for i, (img, label) in enumerate(zip(torch.cat([x, xt]), torch.cat([y, yt]))):
        cls = folder / str(int(label))
        cls.mkdir(parents=True, exist_ok=True)
        Image.fromarray((img[0].numpy() * 255).astype("uint8"), mode="L").save(cls / f"{i}.png")
    return folder


def main_() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lrs", default="1e-3,3e-3")
    ap.add_argument("--schedules", default=",".join(SCHEDULES))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--threads", type=int, default=1)
    _results.add_argument(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = image_folder(root)
        model = root / "digits.safetensors"
        with contextlib.redirect_stdout(io.StringIO()):  # the convert report's tables
            main(["convert", "toy_models:DigitsResNet", "--kwarg", "c=16", "--no-pretrained", "--dims", "width",
                  "-o", str(model)], standalone_mode=False)
        print(f"digits image folder ({sum(1 for _ in folder.rglob('*.png'))} images, 20% held out), "
              f"{args.steps} sortednet steps, batch 32, AdamW, mean of seeds {seeds}, "
              f"{args.threads} CPU thread(s)", flush=True)
        rows = []
        for lr in args.lrs.split(","):
            for schedule in args.schedules.split(","):
                acc: dict[str, list[float]] = {}
                t0 = time.perf_counter()
                for seed in seeds:
                    res = train_file(model, data=folder, steps=args.steps, output=root / "out.safetensors",
                                     lr=float(lr), schedule=schedule, seed=seed, eval_fraction=0.2, overwrite=True,
                                     trust_remote_code=True)  # the file this script just wrote from its own model
                    for preset, m in res["metrics"].items():
                        acc.setdefault(preset, []).append(m["accuracy"])
                sec = (time.perf_counter() - t0) / len(seeds)
                rows.append((lr, schedule, {p: sum(v) / len(v) for p, v in acc.items()}, sec))
                print(f"  lr {lr} {schedule}: " + ", ".join(f"{p} {a:.4f}" for p, a in rows[-1][2].items()), flush=True)
    presets = list(rows[0][2])
    header = ["lr", "schedule", *presets, "s/run"]
    cells = [[lr, f"`{schedule}`", *(f"{acc[p]:.4f}" for p in presets), f"{sec:.0f}"]
             for lr, schedule, acc, sec in rows]
    print("\n" + _results.markdown(_results.table(header, cells)))
    _results.write(__file__, [_results.table(header, cells, title=f"held-out accuracy, mean of seeds {args.seeds} "
                                                                  f"({args.steps} sortednet steps)")],
                   dest=args.results, machine_text=_results.machine(args.threads))


if __name__ == "__main__":
    main_()
