"""``elasticize train``'s defaults are the recipe the training guide documents, and a run names its recipe."""

from __future__ import annotations

import inspect
import logging
import sys
from pathlib import Path

from click.testing import CliRunner

import elasticize
from elasticize.cli import main
from elasticize.cli.train import _always, train as train_command
from elasticize.train.run import DEFAULTS, train_file

sys.path.insert(0, str(Path(__file__).parent))
from conftest import WIDE  # noqa: E402
from toy_models import digit_folder  # noqa: E402

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guides" / "training.md"


def test_defaults_are_the_documented_recipe():
    """The API's, the command's and the guide's defaults are one recipe (benchmarks/bench_defaults.py's pick)."""
    assert DEFAULTS == {"strategy": "subnetwork-to-go", "strategy_options": {"full_weight": 3.0}, "lr": 5e-5,
                        "schedule": "onecycle", "dropout": False, "always": None}
    api = inspect.signature(train_file).parameters
    cli = {p.name: p.default for p in train_command.params}
    for key in ("strategy", "lr", "schedule", "dropout", "always"):
        assert api[key].default == DEFAULTS[key], key
    for key in ("strategy", "lr", "schedule", "dropout"):
        assert cli[key] == DEFAULTS[key], key
    assert _always(()) is None and _always(("none",)) == () and _always(("tiny",)) == ("tiny",)
    guide = GUIDE.read_text()
    assert ("recipe: subnetwork-to-go (full_weight=3.0) + distillation from the original (cosine), lr 5e-05 one-cycle "
            "(6% warm-up), dropout off, always: full, large, medium, small, tiny, units sorted by activation importance "
            "on 8 batches of the data") in guide


def test_a_default_run_names_its_recipe_at_the_start(tmp_path, caplog):
    """No recipe option: the command's first line names the defaults (every preset always trained); the
    API logs the same line, and ``--always none`` with other options changes it."""
    d = tmp_path
    digit_folder(d / "digits", 24)
    model = d / "digits.safetensors"
    res = CliRunner().invoke(main, ["convert", "toy_models:DigitsResNet", "--kwarg", "c=4", "--no-pretrained",
                                    "--dims", "width", "-o", str(model)])
    assert res.exit_code == 0, res.output
    args = ["train", "--trust-remote-code", str(model), "--data", str(d / "digits"), "--steps", "2",
            "--batch-size", "8"]
    res = CliRunner().invoke(main, [*args, "-o", str(d / "a.safetensors")], terminal_width=WIDE)
    assert res.exit_code == 0, res.output
    presets = ", ".join(elasticize.read_manifest(model)["presets"])  # largest first
    assert res.output.splitlines()[0] == (
        "recipe: subnetwork-to-go (full_weight=3.0) + task loss, lr 5e-05 one-cycle (6% warm-up), dropout off, "
        f"always: {presets}, units sorted by activation importance on 1 batch of the data"), res.output
    res = CliRunner().invoke(main, [*args, "--strategy", "sandwich", "--n-random", "1", "--lr", "1e-3",
                                    "--schedule", "constant", "--always", "none", "--dropout",
                                    "-o", str(d / "b.safetensors")], terminal_width=WIDE)
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[0] == ("recipe: sandwich (n=1) + task loss, lr 0.001 constant, dropout on, "
                                          "always: none, units sorted by activation importance on 1 batch of the "
                                          "data"), res.output
    with caplog.at_level(logging.INFO, logger="elasticize.train.run"):
        r = train_file(model, data=d / "digits", steps=1, batch_size=8, output=d / "c.safetensors",
                       always=["tiny"], model=None, trust_remote_code=True)
    assert r["recipe"].endswith("always: tiny, units sorted by activation importance on 1 batch of the data")
    assert r["recipe"] in caplog.messages
    assert {"full", "random", "tiny"} <= set(r["history"][0]["losses"])
