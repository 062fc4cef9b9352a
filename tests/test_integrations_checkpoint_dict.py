"""elasticize.integrations.checkpoint_dict: resume dicts as safetensors + JSON, exact round trips, loud refusals."""

from __future__ import annotations

import copy
import enum
import functools
import json
import math
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from toy_models import DigitsResNet, digits

from elasticize._files import file_mode
from elasticize.integrations.checkpoint_dict import CHECKPOINT_KEY, load_checkpoint_dict, save_checkpoint_dict


def same(a, b, path="") -> None:
    """``a`` and ``b`` equal down to every container's type, every key's type, and every tensor's dtype and values."""
    assert type(a) is type(b), (path, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert list(a) == list(b) and [type(k) for k in a] == [type(k) for k in b], path
        for k in a:
            same(a[k], b[k], f"{path}[{k!r}]")
        assert getattr(a, "_metadata", None) == getattr(b, "_metadata", None), path
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    else:
        assert a == b and (not isinstance(a, float) or math.copysign(1, a) == math.copysign(1, b)), path


@functools.lru_cache(maxsize=1)
def _trained():
    """A real model's state_dict and AdamW state after two steps on the digits."""
    torch.manual_seed(0)
    model = DigitsResNet(c=8, blocks=1)
    x, y, _, _ = digits()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.9))
    for i in range(2):
        torch.nn.functional.cross_entropy(model(x[i * 32:(i + 1) * 32]), y[i * 32:(i + 1) * 32]).backward()
        opt.step()
        opt.zero_grad()
    return model.state_dict(), opt.state_dict()


def _trained_state():
    return copy.deepcopy(_trained())


def test_round_trip_is_exact(tmp_path):
    sd, opt = _trained_state()
    w = next(iter(sd.values()))
    assert w.dim() == 4 and w.shape[0] > 2  # a conv weight: its transpose and slices are real views
    obj = {
        "state_dict": sd, "optimizer_states": [opt], "tied": {"a": w, "b": w}, "views": [w.transpose(0, 1), w[1:3], w[:, :1]],
        "keys": {3: "int", None: "none", True: "bool", 1.5: "float", (1, "a"): "tuple", "$ref": "dollar", "3": "str"},
        "nums": [math.inf, -math.inf, math.nan, -0.0, 1e-300, 2 ** 70], "nested": (1, [2, (3, ())], {}),
        "dtypes": [torch.bfloat16, torch.int64], "where": Path("/data/run"),
        "tensors": [torch.arange(5), torch.ones(2, dtype=torch.bfloat16), torch.tensor([True, False]), torch.zeros(0, 3)],
        "__metadata__": torch.ones(1),
    }
    assert type(sd) is OrderedDict and sd._metadata and isinstance(opt["param_groups"][0]["betas"], tuple)
    assert isinstance(next(iter(opt["state"])), int) and opt["state"][0]["step"].dim() == 0
    p = save_checkpoint_dict(obj, tmp_path / "new" / "epoch=0-step=2.ckpt")
    back = load_checkpoint_dict(p)
    same(obj, back)
    assert back["tied"]["a"] is back["tied"]["b"]  # the same tensor under two keys loads as one tensor
    assert back["views"][0].is_contiguous()
    model = DigitsResNet(c=8, blocks=1)
    model.load_state_dict(back["state_dict"])  # a real state dict loads strictly
    opt2 = torch.optim.AdamW(model.parameters())
    opt2.load_state_dict(back["optimizer_states"][0])
    assert opt2.param_groups[0]["betas"] == (0.8, 0.9)


def test_the_file_is_safetensors_and_loading_never_unpickles(tmp_path, monkeypatch):
    sd, opt = _trained_state()
    p = save_checkpoint_dict({"state_dict": sd, "optimizer_states": [opt]}, tmp_path / "last.ckpt")
    assert p.stat().st_mode & 0o777 == file_mode()  # 0o666 & ~umask, as open() gives
    raw = p.read_bytes()
    assert raw[:4] != b"PK\x03\x04" and raw[0] != 0x80 and b"elasticize.checkpoint" in raw[:int.from_bytes(raw[:8], "little") + 8]
    with safe_open(str(p), framework="pt") as f:
        assert set(f.keys()) == {f"state_dict.{k}" for k in sd} | {
            f"optimizer_states[0].state[{i}].{k}" for i, s in opt["state"].items() for k in s}
        tree = json.loads(f.metadata()[CHECKPOINT_KEY])
    assert tree["format_version"] == 1

    def refuse(*a, **k):
        raise AssertionError("unpickled")

    for name in ("loads", "load", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert torch.equal(load_checkpoint_dict(p)["state_dict"]["fc.weight"], sd["fc.weight"])


class Colour(enum.IntEnum):
    RED = 1


class Config:
    pass


@pytest.mark.parametrize("value, where, what", [
    ({"hyper_parameters": {"cfg": Config()}}, "hyper_parameters.cfg", "test_integrations_checkpoint_dict.Config"),
    ({"lr_schedulers": [{"lr_lambdas": [lambda e: 0.5]}]}, r"lr_schedulers\[0\].lr_lambdas\[0\]", "function"),
    ({"x": {"y": np.zeros(3)}}, "x.y", "numpy.ndarray"),
    ({"mode": Colour.RED}, "mode", "Colour"),
    ({"s": torch.zeros(3).to_sparse()}, "s", "sparse"),
    ({"m": {torch.ones(1): 1}}, "m", "key"),
])
def test_a_value_json_cannot_hold_is_refused_by_its_key_path_and_nothing_is_written(tmp_path, value, where, what):
    target = tmp_path / "ckpt" / "x.ckpt"
    with pytest.raises(TypeError, match=where) as e:
        save_checkpoint_dict(value, target)
    assert what in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "ckpt").exists()


def test_a_failed_save_keeps_the_old_file_and_a_cycle_is_refused(tmp_path):
    p = save_checkpoint_dict({"step": 1}, tmp_path / "last.ckpt")
    with pytest.raises(TypeError, match="hyper_parameters.obj"):
        save_checkpoint_dict({"step": 2, "hyper_parameters": {"obj": object()}}, p)
    loop: dict = {"a": []}
    loop["a"].append(loop)
    with pytest.raises(ValueError, match=r"a\[0\] contains itself"):
        save_checkpoint_dict(loop, p)
    assert load_checkpoint_dict(p) == {"step": 1} and [x.name for x in tmp_path.iterdir()] == ["last.ckpt"]


class _Marker:
    """Unpickling this would create a file: the test shows it never is."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_a_pickle_is_refused_unread(tmp_path):
    marker = tmp_path / "ran"
    for proto in (2, 5):
        p = tmp_path / f"p{proto}.ckpt"
        p.write_bytes(pickle.dumps({"state_dict": _Marker(marker)}, protocol=proto))
        with pytest.raises(ValueError, match="not a safetensors checkpoint: it is a pickle.*never unpickles"):
            load_checkpoint_dict(p)
    z = tmp_path / "zip.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, z)  # what Lightning's TorchCheckpointIO writes
    with pytest.raises(ValueError, match="zip archive.*torch.save"):
        load_checkpoint_dict(z)
    assert not marker.exists()


def _write(path, tensors, tree, version=1):
    save_file(tensors, str(path), metadata={CHECKPOINT_KEY: json.dumps({"format_version": version, "tree": tree})})
    return path


@pytest.mark.parametrize("tensors, tree, version, match", [
    ({}, {"w": {"$tensor": "w"}}, 1, "checkpoint key w: it references the tensor 'w', which the file does not hold"),
    ({"w": torch.ones(1), "x": torch.ones(1)}, {"w": {"$tensor": "w"}}, 1, "1 tensor.*no key references .x"),
    ({}, {"a": {"$pickle": "..."}}, 1, "checkpoint key a: unknown tagged object"),
    ({}, {"a": {"$tuple": [1], "b": 2}}, 1, "unknown tagged object"),
    ({}, {"a": {"$float": "1e999"}}, 1, r"'1e999' is not \$float: one of"),
    ({}, {"a": {"$float": [1]}}, 1, r"\[1\] is not \$float"),
    ({}, {"a": {"$dtype": "Tensor"}}, 1, r"is not \$dtype: a torch dtype"),
    ({}, {"a": {"$dict": [[[1], 2]]}}, 1, "a dict key must be"),
    ({}, {"a": {"$dict": [[1, 2], [1, 3]]}}, 1, "appears twice"),
    ({}, [1], 1, "the root must be a dict"),
    ({}, {}, 2, "format version 2; this elasticize reads 1; upgrade"),
])
def test_a_malformed_tree_is_refused(tmp_path, tensors, tree, version, match):
    with pytest.raises(ValueError, match=match):
        load_checkpoint_dict(_write(tmp_path / "bad.ckpt", tensors, tree, version))


def test_a_truncated_or_foreign_file_is_refused(tmp_path):
    sd, _ = _trained_state()
    p = save_checkpoint_dict({"state_dict": sd}, tmp_path / "a.ckpt")
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_checkpoint_dict(cut)
    plain = tmp_path / "weights.safetensors"
    save_file(dict(sd), str(plain))
    with pytest.raises(ValueError, match="not an elasticize checkpoint dict"):
        load_checkpoint_dict(plain)
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_checkpoint_dict(tmp_path / "empty.ckpt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint_dict(tmp_path / "missing.ckpt")
