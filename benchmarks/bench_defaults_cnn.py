"""``elasticize train``'s defaults on images: a pretrained digits CNN, trained from an image folder.

`bench_defaults.py` chose the defaults on MiniLM; this checks them on a BatchNorm CNN. A
``DigitsResNet(c=8)`` (``tests/toy_models.py``) is trained to convergence on scikit-learn's digits
(8x8, normalised as ``elasticize train`` normalises a one-channel model without a timm data config:
``(x - 0.5) / 0.5``) as the "pretrained" model. Its weights are converted with ``elasticize convert
--weights`` (no other option: magnitude order), the training digits are written as PNGs (one
sub-folder per class) and the held-out ones as ``--val-data``. Every recipe then runs ``python -m
elasticize train FILE --data train --val-data val --steps N --batch-size 32`` plus its options; the
held-out accuracy of each preset is what the command measured (BN recalibration per preset on the
training images) and wrote into the file. "Before" is the same measurement of the converted file, and
"ranked" of the file after only the ranking ``--sort auto`` does.

    OMP_NUM_THREADS=2 python benchmarks/bench_defaults_cnn.py --steps 300
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import _results
from _digits import digits
from bench_measured import _train_cnn

RECIPES = {
    "defaults": [],
    "defaults-unsorted": ["--sort", "keep"],
    "previous": ["--lr", "1e-4", "--full-weight", "1", "--sort", "keep"],
}


def _folder(root: Path, x: torch.Tensor, y: torch.Tensor) -> Path:
    from PIL import Image

    for i in range(len(y)):
        d = root / str(int(y[i]))
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray((x[i, 0].numpy() * 255).round().astype("uint8"), mode="L").save(d / f"{i}.png")
    return root


def _accuracy(path: Path, train: Path, val: Path, *, rank: bool = False) -> dict[str, float]:
    """Every preset's held-out accuracy as ``elasticize train`` measures it (BN recalibrated on ``train``)."""
    import elasticize
    from elasticize.train import Trainer, sort_by_activation
    from elasticize.train.data import calibration_batches, image_folder_data

    em = elasticize.load(str(path), trust_remote_code=True)
    if rank:
        sort_by_activation(em, calibration_batches(train, input_shapes=em.input_shapes, recipe=em.recipe))
    data, _ = image_folder_data(train, em, batch_size=32, eval_fraction=0.0)
    held = list(image_folder_data(val, em, batch_size=32, eval_fraction=0.0)[0])
    tr = Trainer(em, data, optimizer=torch.optim.SGD(em.parameters(), lr=0.0), loss_fn=torch.nn.CrossEntropyLoss())
    return {p: v["accuracy"] for p, v in tr.evaluate(held, metric="accuracy").items()}


def _cli(args: list[str], log: Path, threads: int) -> str:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), COLUMNS="250",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1] / "tests"),
                                           os.environ.get("PYTHONPATH", "")]))
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, "-m", "elasticize", *args], stdout=f, stderr=subprocess.STDOUT,
                            env=env).returncode
    text = log.read_text()
    if rc:
        raise SystemExit(f"elasticize {' '.join(args)} failed ({rc}); see {log}:\n{text[-2000:]}")
    return next((ln.strip() for ln in text.splitlines() if ln.startswith("recipe:")), "")


def main() -> None:
    import elasticize
    from safetensors.torch import save_file

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--epochs", type=int, default=12, help="pre-training epochs of the CNN")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, of {', '.join(RECIPES)}")
    ap.add_argument("--work", help="folder for the files and logs (default: a temporary one)")
    ap.add_argument("--quick", action="store_true", help="2 steps, 2 pre-training epochs (a smoke run)")
    _results.add_argument(ap)
    args = ap.parse_args()
    if args.quick:
        args.steps, args.epochs = 2, 2
    torch.set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_defaults_cnn_"))
    work.mkdir(parents=True, exist_ok=True)
    xtr, ytr, xte, yte = digits(seed=0)
    net = _train_cnn((xtr - 0.5) / 0.5, ytr, 0, args.epochs)
    with torch.no_grad():
        pre = (net((xte - 0.5) / 0.5).argmax(1) == yte).float().mean().item()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(work / "pretrained.safetensors"))
    train, val = _folder(work / "train", xtr, ytr), _folder(work / "val", xte, yte)
    src = work / "digits.elastic.safetensors"
    _cli(["convert", "toy_models:DigitsResNet", "--kwarg", "c=8", "--weights", str(work / "pretrained.safetensors"),
          "-o", str(src), "--force"], work / "convert.log", args.threads)
    before, ranked = _accuracy(src, train, val), _accuracy(src, train, val, rank=True)
    presets = list(before)
    rows = [["before training", "", *(f"{before[p]:.4f}" for p in presets), "", ""],
            ["ranked, before training", "(what --sort auto starts from)", *(f"{ranked[p]:.4f}" for p in presets), "", ""]]
    print(f"pre-trained CNN: {pre:.4f} held-out accuracy; before: "
          + ", ".join(f"{p} {v:.4f}" for p, v in before.items()), flush=True)
    for name in filter(None, args.recipes.split(",")):
        out = work / f"{name}.safetensors"
        recipe = _cli(["train", "--trust-remote-code", str(src), "--data", str(train), "--val-data", str(val),
                       "--steps", str(args.steps), "--batch-size", "32", "--device", "cpu", "--seed", "0",
                       "-o", str(out), "--force", *RECIPES[name]], work / f"{name}.log", args.threads)
        after = {p: v["metrics"]["accuracy"] for p, v in elasticize.read_manifest(out)["presets"].items()}
        gain = min(after[p] - before[p] for p in presets if p != "full")
        rows.append([name, " ".join(RECIPES[name]) or "(none)", *(f"{after[p]:.4f}" for p in presets),
                     f"{after['full'] - before['full']:+.4f}", f"{gain:+.4f}"])
        print(f"{name}: {recipe}; " + ", ".join(f"{p} {after[p]:.4f}" for p in presets), flush=True)
    header = ["recipe", "options", *presets, "full: change", "smallest gain of a smaller preset"]
    _results.write(__file__, [_results.table(
        header, rows, title=f"held-out accuracy ({len(yte)} digits), DigitsResNet(c=8) pre-trained {args.epochs} epochs "
                            f"({pre:.4f} held-out), after {args.steps} steps of `elasticize train` (batch 32)")],
        dest=args.results, quick=args.quick, machine_text=_results.machine(args.threads, "cpu"))
    print("\n" + _results.markdown(_results.table(header, rows)))


if __name__ == "__main__":
    main()
