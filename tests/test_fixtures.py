"""Files written by an earlier elasticize still load, bit for bit.

``tests/fixtures/`` holds small format-1 and format-2 files and, beside each, what ``load``,
``load_subnet`` and ``load(...).extract`` gave on a fixed input when it was written
(``<name>.expected.safetensors``; see ``tests/fixtures/make_fixtures.py``, which is run by hand
and never here). This test only reads them.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

import elasticize

from fixtures.make_fixtures import digest, outputs  # the writer's own output and digest functions

FIXTURES = Path(__file__).parent / "fixtures"
#: every fixture and the format version it was written in (a deleted or rewritten fixture fails here)
WRITTEN_IN = {"cnn_v1": 1, "cnn_v2": 2, "cnn_skippable_v2": 2, "cnn_small_subnet": 1, "bert": 1, "lstm": 1,
              "vit_named": 1}
#: the library each recipe's adapter needs
NEEDS = {"hf": "transformers", "timm": "timm", "torchvision": "torchvision"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The expected outputs were computed on one thread; keep the kernels' reduction order the same."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _expected(name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    with safe_open(str(FIXTURES / f"{name}.expected.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["elasticize.fixture"])
        return meta, {k: f.get_tensor(k) for k in f.keys()}


def _path(name: str) -> Path:
    path = FIXTURES / f"{name}.safetensors"
    recipe = elasticize.read_manifest(path, presets=False).get("recipe") or {}
    if recipe.get("adapter") in NEEDS:
        pytest.importorskip(NEEDS[recipe["adapter"]])
    return path


def _user_model(meta: dict[str, Any]) -> torch.nn.Module:
    """A fresh base model of the fixture's user architecture (its builder in the tests package)."""
    module, _, attr = meta["model"]["builder"].partition(":")
    return getattr(importlib.import_module(module), attr)(**meta["model"]["kwargs"])


def _check(key: str, model: torch.nn.Module, inputs: tuple, expected: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        got = outputs(model(*inputs))
    want = {k.removeprefix(key + "/"): v for k, v in expected.items() if k.startswith(key + "/")}
    assert want and set(got) == set(want), f"{key}: outputs {sorted(got)}, expected {sorted(want)}"
    for k, v in want.items():
        diff = (got[k].double() - v.double()).abs().max().item() if got[k].shape == v.shape else "shape"
        assert torch.equal(got[k], v), f"{key}/{k} differs from the stored output (max abs diff {diff})"


def test_every_fixture_is_there():
    have = {p.name.removesuffix(".expected.safetensors") for p in FIXTURES.glob("*.expected.safetensors")}
    assert have == set(WRITTEN_IN)
    assert all((FIXTURES / f"{n}.safetensors").is_file() for n in WRITTEN_IN)


@pytest.mark.parametrize("name", list(WRITTEN_IN))
def test_manifest_keeps_its_format_version_and_presets(name):
    meta, _ = _expected(name)
    manifest = elasticize.read_manifest(FIXTURES / f"{name}.safetensors")
    assert manifest["format_version"] == meta["format_version"] == WRITTEN_IN[name]
    assert manifest["format"] == "elasticize" and manifest["kind"] == meta["kind"]
    if meta["kind"] == "super-network":
        assert {p: e["config"] for p, e in manifest["presets"].items()} == meta["presets"]
        assert ("bn_stats" in manifest) == (meta["format_version"] == 2)
    else:
        assert [manifest["config"]] == list(meta["presets"].values())


#: (fixture, whether model= is passed): every super-network file rebuilt from its recipe, and user models
#: (the recipe names a builder in the tests package) also loaded into the architecture passed as model=
SUPER = [(n, given) for n in WRITTEN_IN if n != "cnn_small_subnet" for given in (False, True)
         if (FIXTURES / f"{n}.expected.safetensors").is_file() and (not given or _expected(n)[0]["model"] is not None)]


@pytest.mark.parametrize("name,given", SUPER, ids=[f"{n}-{'model=' if g else 'recipe'}" for n, g in SUPER])
def test_load_load_subnet_and_extract_give_the_storedoutputs(name, given):
    meta, expected = _expected(name)
    path = _path(name)
    fresh = (lambda: _user_model(meta)) if given else (lambda: None)
    inputs = tuple(expected[f"input/{i}"] for i in range(sum(k.startswith("input/") for k in expected)))
    # a recipe that imports a builder of the tests package runs code: loading it needs the opt-in
    trust = not given and meta["model"] is not None
    if trust:
        with pytest.raises(ValueError, match="trust_remote_code"):
            elasticize.load(path)
    em = elasticize.load(path, model=fresh(), trust_remote_code=trust)
    assert list(em.presets.items()) == list(meta["presets"].items())  # names (named ones too), configs, order
    assert digest(em.model.state_dict()) == meta["digests"]["load"]
    for preset in meta["presets"]:
        with em.subnet(preset):
            _check(f"load/{preset}", em, inputs, expected)
        dense = em.extract(preset)
        assert digest(dense.state_dict()) == meta["digests"][f"extract/{preset}"], preset
        _check(f"extract/{preset}", dense, inputs, expected)
        sub = elasticize.load_subnet(path, preset, model=fresh(), trust_remote_code=trust)
        assert digest(sub.state_dict()) == meta["digests"][f"load_subnet/{preset}"], preset
        _check(f"load_subnet/{preset}", sub, inputs, expected)


@pytest.mark.parametrize("given", [False, True], ids=["recipe", "model="])
def test_sub_network_file_gives_the_storedoutputs(given):
    meta, expected = _expected("cnn_small_subnet")
    path = _path("cnn_small_subnet")
    (preset, cfg), = meta["presets"].items()
    inputs = (expected["input/0"],)
    for subnet in (None, cfg):
        sub = elasticize.load_subnet(path, subnet, model=_user_model(meta) if given else None,
                                     trust_remote_code=not given)
        assert digest(sub.state_dict()) == meta["digests"][f"load_subnet/{preset}"]
        _check(f"load_subnet/{preset}", sub, inputs, expected)
    with pytest.raises(ValueError, match="load_subnet"):
        elasticize.load(path)
