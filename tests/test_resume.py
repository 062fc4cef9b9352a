"""Resume is exact: a run stopped by ``save_state`` and continued by ``load_state`` in a new
process ends with the weights of the run that was never stopped, bit for bit (``torch.equal`` on
every tensor), for a model with dropout, with the loaders users write and with ``elasticize
train --state`` / ``--resume``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from elasticize.cli import main

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from conftest import scratch_dir  # noqa: E402
from resume_helper import CASES, trainer  # noqa: E402
from toy_models import digits  # noqa: E402

#: 256 samples in batches of 32, two micro-batches a step: 4 steps an epoch, so the resumed
#: halves cross epoch boundaries (steps 4 and 8), and the states at step 6 are saved in epoch 1.
STEPS = 10
POINTS = {"plain": (3,), "generator": (3, 6), "distributed": (3, 4, 6), "unseeded": (3, 6)}  # 4: at an epoch's end


def _state_dict(tr) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in tr.em.model.state_dict().items()}


def _images(folder: Path, x: torch.Tensor, y: torch.Tensor) -> None:
    from PIL import Image

    for i in range(len(y)):
        cls = folder / str(int(y[i]))
        cls.mkdir(parents=True, exist_ok=True)
        Image.fromarray((x[i, 0].numpy() * 255).astype("uint8"), mode="L").save(cls / f"{i}.png")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every uninterrupted run and every state here; every resumed half in one new process."""
    with scratch_dir(tmp_path_factory, "resume") as d:
        x, y, _, _ = digits()
        x, y = x[:256].contiguous(), y[:256].contiguous()
        data = d / "digits.safetensors"
        save_file({"x": x, "y": y}, str(data))
        straight: dict[str, dict[str, torch.Tensor]] = {}
        jobs: list[dict] = [{"threads": torch.get_num_threads()}]
        outs: dict[tuple[str, int], Path] = {}
        for case in CASES:
            tr = trainer(case, x, y)
            tr.train_steps(STEPS)
            straight[case] = _state_dict(tr)
            tr = trainer(case, x, y)
            for k in POINTS[case]:
                tr.train_steps(k - tr.step)
                state = d / f"{case}{k}.safetensors"
                with warnings.catch_warnings():
                    warnings.simplefilter("error")  # every one of these loaders resumes exactly: no warning
                    tr.save_state(str(state))
                outs[case, k] = d / f"{case}{k}.out.safetensors"
                jobs.append({"kind": "trainer", "case": case, "data": str(data), "state": str(state), "steps": STEPS,
                             "out": str(outs[case, k])})
        # the CLI: 64 images, 58 to train on in 4 batches of 16 (2 steps an epoch); stopped at step 3
        _images(d / "digits", x[:64], y[:64])
        model = d / "dropout.safetensors"
        res = CliRunner().invoke(main, ["convert", "resume_helper:DropoutDigits", "--no-pretrained", "--dims", "width",
                                        "-o", str(model)])
        assert res.exit_code == 0, res.output
        args = ["train", "--trust-remote-code", str(model), "--data", str(d / "digits"), "--batch-size", "16", "--lr", "3e-3",
                "--strategy", "sortednet", "--accumulate", "2", "--schedule", "constant", "--dropout", "--always", "none"]
        for extra in (["--steps", "6", "-o", str(d / "cli_straight.safetensors")],
                      ["--steps", "6", "--eval-every", "2", "-o", str(d / "cli_straight_eval.safetensors")],
                      ["--steps", "3", "-o", str(d / "cli_half.safetensors"),
                       "--state", str(d / "cli_state.safetensors")]):
            torch.manual_seed(0)  # every run starts from the same global random state
            res = CliRunner().invoke(main, [*args, *extra])
            assert res.exit_code == 0, res.output
        for extra, out in (([], "cli_resumed"), (["--eval-every", "2"], "cli_resumed_eval")):
            jobs.append({"kind": "cli", "args": [*args, "--steps", "6", *extra, "-o", str(d / f"{out}.safetensors"),
                                                 "--resume", str(d / "cli_state.safetensors")]})
        (d / "jobs.json").write_text(json.dumps(jobs))
        r = subprocess.run([sys.executable, str(HERE / "resume_helper.py"), str(d / "jobs.json")], capture_output=True,
                           text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads())))
        assert r.returncode == 0, r.stdout + r.stderr
        yield d, straight, outs


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """The names of the tensors that differ (any bit)."""
    assert a.keys() == b.keys() and a
    return [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.parametrize("case,step", [(c, k) for c in CASES for k in POINTS[c]])
def test_resumed_in_a_new_process_equals_uninterrupted(runs, case, step):
    """DataLoader(shuffle=False), shuffle=True with a seeded generator, DistributedSampler with
    set_epoch (saved mid-epoch, at an epoch's end and in the second epoch) and shuffle=True
    without a generator: the resumed weights are the uninterrupted run's, every bit."""
    _, straight, outs = runs
    assert _equal(straight[case], load_file(str(outs[case, step]))) == []


def test_cli_resume_equals_uninterrupted(runs):
    """``elasticize train --steps 3 --state S``, then ``--steps 6 --resume S`` in a new process,
    writes the file a straight ``--steps 6`` run writes (weights and calibrated statistics)."""
    d, _, _ = runs
    a, b = load_file(str(d / "cli_straight.safetensors")), load_file(str(d / "cli_resumed.safetensors"))
    assert _equal(a, b) == []
    half = load_file(str(d / "cli_half.safetensors"))
    assert _equal(a, half)  # the half run is not the whole one: the comparison can fail


def test_warns_when_a_state_cannot_resume_exactly(tmp_path):
    """Persistent DataLoader workers past the first epoch draw from random states seeded in that
    epoch, which a resumed run cannot make again: ``save_state`` says so (in the first epoch it
    resumes exactly and does not). Loading a state into a trainer whose loader has other random
    generators warns too."""
    from torch.utils.data import DataLoader, TensorDataset

    x, y, _, _ = digits()
    tr = trainer("plain", x[:64], y[:64])  # one step an epoch
    tr.data = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=32, num_workers=1, persistent_workers=True)
    tr.train_steps(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tr.save_state(str(tmp_path / "first.safetensors"))
    tr.train_steps(1)
    with pytest.warns(UserWarning, match="persistent_workers=True"):
        tr.save_state(str(tmp_path / "second.safetensors"))
    shuffled = trainer("generator", x[:64], y[:64])
    shuffled.train_steps(1)
    shuffled.save_state(str(tmp_path / "shuffled.safetensors"))
    with pytest.warns(UserWarning, match=r"different random generators \(generator\)"):
        trainer("plain", x[:64], y[:64]).load_state(str(tmp_path / "shuffled.safetensors"))


def test_random_states_round_trip_through_safetensors_and_json(tmp_path):
    """torch, Python ``random`` (with a cached Gaussian), NumPy and a loader's generator come back."""
    import random

    import numpy as np

    from elasticize.train.state import rng_state, set_rng_state

    g = torch.Generator().manual_seed(3)
    random.gauss(0, 1), np.random.standard_normal()  # both keep a second Gaussian for the next call
    tensors, info = rng_state({"generator": g})
    assert all(t.dtype == torch.uint8 for t in tensors.values())
    save_file(tensors, str(tmp_path / "rng.safetensors"))

    def draws():
        return (random.gauss(0, 1), random.random(), np.random.standard_normal(), torch.rand(3),
                torch.rand(2, generator=g))

    first = draws()
    random.seed(1), np.random.seed(1), torch.manual_seed(1), g.manual_seed(1)
    assert set_rng_state(load_file(str(tmp_path / "rng.safetensors")), json.loads(json.dumps(info)),
                         {"generator": g}) == []
    again = draws()
    assert first[:3] == again[:3] and torch.equal(first[3], again[3]) and torch.equal(first[4], again[4])


def test_evaluating_between_steps_changes_neither_training_nor_resume(runs):
    """``--eval-every 2`` (BN recalibration and measuring every preset at steps 2 and 4, which
    iterates the training loader) leaves the random states as they were: the straight run and
    the resumed one (measuring at step 4 only) write the file of a run that never measures."""
    d, _, _ = runs
    a = load_file(str(d / "cli_straight.safetensors"))
    assert _equal(a, load_file(str(d / "cli_straight_eval.safetensors"))) == []
    assert _equal(a, load_file(str(d / "cli_resumed_eval.safetensors"))) == []
