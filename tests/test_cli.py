"""The CLI over the Python API: convert, inspect, extract, and bad input (clear message, exit != 0, no file)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import elasticize
from elasticize import checkpoint
from elasticize.cli import main
from conftest import scratch_dir


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    with scratch_dir(tmp_path_factory, "cli") as d:
        out = d / "r18.safetensors"
        res = CliRunner().invoke(main, ["convert", "resnet18", "--no-pretrained", "-o", str(out)])
        assert res.exit_code == 0, res.output
        yield d, out, res.output


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_convert_prints_what_became_elastic_and_presets(converted):
    d, out, text = converted
    for s in ("Elastic width", "layer1.0.conv1:out", "Elastic depth", "Not elastic", "fc:out", "model output",
              "Presets", "tiny", "wrote"):
        assert s in text, s
    assert elasticize.read_manifest(out)["recipe"] == {"adapter": "timm", "name": "resnet18", "kwargs": {},
                                                        "pretrained": False}


def test_inspect_and_extract(converted, tmp_path):
    d, out, _ = converted
    res = CliRunner().invoke(main, ["inspect", str(out)])
    assert res.exit_code == 0 and "super-network" in res.output and "medium" in res.output
    res = CliRunner().invoke(main, ["inspect", str(out), "--json"])
    assert json.loads(res.output)["format_version"] == 1
    em = elasticize.load(out)
    budget = em.macs("medium")
    small = tmp_path / "sub.safetensors"
    res = CliRunner().invoke(main, ["extract", str(out), "--max-macs", str(budget), "-o", str(small)])
    assert res.exit_code == 0, res.output
    dense = elasticize.load_subnet(small)
    x = torch.randn(1, 3, 64, 64)
    cfg = em.select(max_macs=budget)
    with torch.no_grad(), em.subnet(cfg):
        assert (dense(x) - em(x)).abs().max().item() < 1e-5
    res = CliRunner().invoke(main, ["extract", str(out), "--preset", "tiny", "-o", str(tmp_path / "t.safetensors")])
    assert res.exit_code == 0 and "MACs" in res.output


def test_user_model_by_import_path(tmp_path):
    out = tmp_path / "toy.safetensors"
    res = CliRunner().invoke(main, ["convert", "toy_models:ToyCNN", "--kwarg", "c=8", "-o", str(out)])
    assert res.exit_code == 0, res.output
    with pytest.raises(ValueError, match="trust_remote_code=True"):  # the recipe imports and calls toy_models
        elasticize.load(out)
    em = elasticize.load(out, trust_remote_code=True)
    assert em.recipe == {"adapter": "import", "name": "toy_models:ToyCNN", "kwargs": {"c": 8},
                         "pretrained": True}
    assert em.model.stem[0].out_channels == 8


@pytest.mark.parametrize("args, message", [
    (["convert", "resnett18", "--no-pretrained"], "unknown timm model 'resnett18'; did you mean"),
    (["convert", "torchvision:resnet5O", "--no-pretrained"], "unknown torchvision model"),
    (["convert", "toy_models:NothingElastic"], "nothing in NothingElastic could be made elastic"),
    (["convert", "toy_models:NoSuchThing"], "has no 'NoSuchThing'"),
])
def test_convert_bad_input_writes_nothing(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, args + ["-o", "out.safetensors"])
    assert res.exit_code != 0 and message in res.output, res.output
    assert list(tmp_path.iterdir()) == []


def test_file_errors_change_nothing(converted, tmp_path):
    d, out, _ = converted
    before = _files(d)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(out.read_bytes()[:1000])
    runner = CliRunner()
    cases = [
        (["inspect", str(cut)], "not a readable safetensors file"),
        (["extract", str(cut), "--preset", "tiny", "-o", str(tmp_path / "a.safetensors")], "safetensors"),
        (["extract", str(out), "--preset", "tiny", "-o", str(out)], "-o points at the input"),
        (["extract", str(out), "--config", '{"width": {"layer1.0.conv1:out": 7}}', "-o", str(tmp_path / "b.safetensors")],
         "outside the search space"),
        (["extract", str(out), "--preset", "gigantic", "-o", str(tmp_path / "c.safetensors")], "no preset 'gigantic'"),
        (["extract", str(out), "--max-macs", "10", "-o", str(tmp_path / "d.safetensors")], "no sub-network meets"),
    ]
    for args, message in cases:
        res = runner.invoke(main, args)
        assert res.exit_code != 0 and message in res.output, (args, res.output)
    assert _files(d) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.safetensors"]


def test_newer_format_from_the_cli(converted, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    d, out, _ = converted
    with safe_open(str(out), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["elasticize"])
    meta["format_version"] = checkpoint.FORMAT_VERSION + 1
    newer = tmp_path / "newer.safetensors"
    save_file(tensors, str(newer), metadata={"elasticize": json.dumps(meta)})
    res = CliRunner().invoke(main, ["inspect", str(newer)])
    assert res.exit_code == 1 and "Upgrade: pip install -U elasticize" in res.output


def test_weights_file_must_be_safetensors(tmp_path):
    bad = tmp_path / "w.pth"
    bad.write_bytes(b"PK\x03\x04 not a safetensors file")
    res = CliRunner().invoke(main, ["convert", "resnet18", "--weights", str(bad), "-o", str(tmp_path / "o.safetensors")])
    assert res.exit_code == 1 and "never unpickles" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pth"]


@pytest.mark.parametrize("args, message", [
    (["--max-macs", "inf"], "is not a macs budget"),
    (["--max-macs", "nan"], "is not a macs budget"),
    (["--max-params", "-5"], "is not a params budget"),
    (["--max-macs", "0"], "not a positive, finite budget"),
    (["--max-macs", "150%"], "must be in (0, 100]%"),
    (["--max-macs", "5ms"], "is not a macs budget"),
    (["--config", '{"width": ' + "9" * 5000 + "}"], "not valid JSON"),
    (["--config", "[" * 100_000 + "]" * 100_000], "nests deeper"),
])
def test_hostile_command_line_values_are_one_line_errors(converted, tmp_path, args, message):
    _, out, _ = converted
    res = CliRunner().invoke(main, ["extract", str(out), *args, "-o", str(tmp_path / "x.safetensors")])
    assert res.exit_code == 2 and message in res.output, res.output
    assert not isinstance(res.exception, (RecursionError, OverflowError))
    assert list(tmp_path.iterdir()) == []


def test_torchvision_builds_without_fetching_a_backbone(monkeypatch, tmp_path):
    """torchvision's segmentation builders default to an ImageNet backbone checkpoint; without
    pretrained weights elasticize asks for none, so building touches neither the network nor a cache."""
    import socket

    def refuse(*a, **k):
        raise AssertionError("the builder opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache: a checkpoint could only be downloaded
    with torch.device("meta"):
        m = elasticize.adapters.get_adapter("torchvision").build("fcn_resnet50", pretrained=False, kwargs={})
    assert type(m).__name__ == "FCN" and list(tmp_path.iterdir()) == []


def test_extract_budgets_in_the_grammar(converted, tmp_path):
    """``--max-macs 50%`` and ``--max-macs 1.2G``-style budgets: the pick is the one the resolved budget gives,
    and the CLI prints what the budget came to."""
    _, out, _ = converted
    em = elasticize.load(out)
    full = em.macs(None)
    for text, limit in (("50%", int(0.5 * full)), (f"{full * 0.3 / 1e6:.3f}M", int(round(full * 0.3 / 1e6, 3) * 1e6))):
        sub = tmp_path / f"{len(text)}.safetensors"
        res = CliRunner().invoke(main, ["extract", str(out), "--max-macs", text, "-o", str(sub)])
        assert res.exit_code == 0, res.output
        line = next(ln for ln in res.output.splitlines() if ln.startswith("budget: "))
        assert (" of " in line) == text.endswith("%") and line.endswith(" MACs"), line
        assert elasticize.read_manifest(sub)["config"] == em.select(max_macs=limit)
        assert elasticize.read_manifest(sub)["macs"] <= limit


def test_extract_says_how_a_ratio_was_rounded(converted, tmp_path):
    _, out, _ = converted
    res = CliRunner().invoke(main, ["extract", str(out), "--config", '{"width": 0.3}', "-o", str(tmp_path / "a.safetensors")])
    assert res.exit_code == 0, res.output
    assert "--config width 0.3 was rounded to the nearest choices: 25% of full" in res.output
    res = CliRunner().invoke(main, ["extract", str(out), "--config", '{"width": 0.5}', "-o", str(tmp_path / "b.safetensors")])
    assert res.exit_code == 0 and "rounded" not in res.output, res.output
