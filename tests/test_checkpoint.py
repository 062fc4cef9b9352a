"""Checkpoint files: bad input gets a clear error and nothing is written or changed."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import elasticize
from elasticize.checkpoint import METADATA_KEY, read_manifest
from conftest import max_diff, scratch_dir

PKG = Path(elasticize.__file__).parent


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    em = elasticize.convert("resnet18", pretrained=False)
    with scratch_dir(tmp_path_factory, "ckpt") as d:
        path = d / "r18.safetensors"
        elasticize.save(em, path)
        yield em, path


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_manifest_lets_a_plain_reader_cut_a_preset(saved):
    em, path = saved
    m = read_manifest(path)
    preset = m["presets"]["small"]
    out = {}
    with safe_open(str(path), framework="pt") as f:  # what another language does with a safetensors reader
        for name, spec in preset["tensors"].items():
            t = f.get_tensor(spec["source"])
            if spec["slices"] is not None:
                for ax, ranges in enumerate(spec["slices"]):
                    t = torch.cat([t.narrow(ax, a, b - a) for a, b in ranges], dim=ax)
            assert list(t.shape) == spec["shape"]
            out[name] = t
    dense = em.extract("small")
    ref = dense.state_dict()
    assert set(out) == set(ref) and all(torch.equal(out[k], ref[k]) for k in ref)
    assert preset["bytes"] == sum(t.numel() * t.element_size() for t in ref.values())
    assert preset["macs"] == em.macs("small") and preset["params"] == em.params("small")


def test_truncated_file(saved, tmp_path):
    _, path = saved
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated"):
        elasticize.load(bad)
    with pytest.raises(ValueError, match="truncated"):
        elasticize.load_subnet(bad, "small")


def test_corrupted_header_and_not_safetensors(tmp_path):
    bad = tmp_path / "junk.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + b"\0" * 64)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        elasticize.load(bad)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="without an elasticize manifest"):
        elasticize.load(plain)
    with pytest.raises(FileNotFoundError):
        elasticize.load(tmp_path / "missing.safetensors")


def test_newer_format_version(saved, tmp_path):
    _, path = saved
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()[METADATA_KEY])
    meta["format_version"] = 99
    newer = tmp_path / "newer.safetensors"
    save_file(tensors, str(newer), metadata={METADATA_KEY: json.dumps(meta)})
    with pytest.raises(ValueError, match="format 99.*Upgrade: pip install -U elasticize"):
        elasticize.load(newer)


def test_never_overwrites_the_input_and_leaves_no_partial_file(saved, tmp_path):
    em, path = saved
    em2 = elasticize.load(path)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="it is the input file"):
        elasticize.save(em2, path, overwrite=True)
    assert path.read_bytes() == before
    out = tmp_path / "copy.safetensors"
    elasticize.save(em2, out)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        elasticize.save(em2, out)

    class Boom(Exception):
        pass

    folder = tmp_path / "atomic"
    folder.mkdir()
    import elasticize.checkpoint as ck

    real = ck.save_file

    def failing(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        raise Boom  # dies after writing the temporary file

    ck.save_file = failing
    try:
        with pytest.raises(Boom):
            elasticize.save(em2, folder / "x.safetensors")
    finally:
        ck.save_file = real
    assert list(folder.iterdir()) == []


def test_load_with_the_users_model_and_a_model_that_does_not_fit(saved):
    import timm

    em, path = saved
    x = torch.randn(1, 3, 64, 64)
    em2 = elasticize.load(path, model=timm.create_model("resnet18"))
    with torch.no_grad(), em.subnet("tiny"), em2.subnet("tiny"):
        assert max_diff(em(x), em2(x)) == 0
    with pytest.raises(ValueError, match="does not fit the model: missing 96 .layer1.2.conv1.weight"):
        elasticize.load(path, model=timm.create_model("resnet34"))


def test_no_pickle_in_the_package():
    pattern = re.compile(r"import pickle|pickle\.load|torch\.load\(|weights_only\s*=\s*False")
    hits = [p for p in PKG.rglob("*.py") if pattern.search(p.read_text())]
    assert hits == []


def test_manifest_records_the_importance_order(saved, tmp_path):
    from click.testing import CliRunner

    from elasticize.cli import main

    em, path = saved  # convert() with no calibration data: magnitude importance
    assert read_manifest(path)["importance"] == {"order": "magnitude"} == elasticize.load(path).importance
    torch.manual_seed(0)

    def mlp():
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))

    batches = (torch.randn(4, 8) for _ in range(3))  # a generator: counted, and still read for the ranking
    act = elasticize.elasticize(mlp(), example_inputs=torch.randn(2, 8), calibration=batches)
    out = elasticize.save(act, tmp_path / "act.safetensors")
    assert read_manifest(out)["importance"] == {"order": "activation", "calibration_batches": 3}
    assert "activation importance order (3 calibration batches)" in CliRunner().invoke(main, ["inspect", str(out)]).output
    plain = elasticize.elasticize(mlp(), example_inputs=torch.randn(2, 8), sort=None)
    assert elasticize.load(elasticize.save(plain, tmp_path / "plain.safetensors"), model=mlp()).importance == \
        {"order": None}
