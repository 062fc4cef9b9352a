"""Subnetwork-to-go's TAC dynamic width and residual RNN layers: conversion from Linear, modules dimension, depth."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import elasticize
from conftest import max_diff
from elasticize.tac import ResidualRNN, TACLinear, linear_to_tac
from rnn_models import ResRNNStack


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 5)).eval()


@pytest.mark.parametrize("reweight", ["tac", "mean"])
def test_tac_from_linear_equals_the_linear_for_every_width(reweight):
    m = _mlp()
    x = torch.randn(4, 3, 8)
    with torch.no_grad():
        ref = m(x)
    assert linear_to_tac(m, ["2"], num_modules=6, reweight=reweight) == ["2"]
    em = elasticize.elasticize(m, x, dims=("modules",))
    group = "2:modules"
    assert em.space.dimensions["modules"] == {group: [6, 5, 4, 3, 2, 1]}
    with torch.no_grad():
        for w in range(6, 0, -1):
            with em.subnet({"modules": {group: w}}):
                y = em(x)
                assert em.model[2].weight.shape[0] == w
            assert max_diff(y, ref) <= 1e-5, w
            dense = em.extract({"modules": {group: w}})
            assert isinstance(dense[2], TACLinear) and dense[2].num_modules == w
            assert max_diff(dense(x), ref) <= 1e-5, w


def test_tac_reweighting_depends_on_the_active_modules():
    torch.manual_seed(0)
    block = TACLinear(8, 6, 4).eval()  # independent modules: the TAC scalars matter
    x = torch.randn(5, 8)
    with torch.no_grad():
        y = block(x).detach()
        plain = torch.stack([x @ block.weight[i].T + block.bias[i] for i in range(4)]).mean(0)
        assert max_diff(y, plain) > 1e-4  # not a plain average
        a = TACLinear(8, 6, 2).eval()
        a.load_state_dict({k: (v[:2] if k in ("weight", "bias") else v) for k, v in block.state_dict().items()})
        assert max_diff(a(x), y) > 1e-4  # the first two modules alone give another output


def test_linear_to_tac_errors():
    m = _mlp()
    with pytest.raises(ValueError, match="no nn.Linear matches"):
        linear_to_tac(m, "nope.*", num_modules=2)
    with pytest.raises(TypeError, match="not an nn.Linear"):
        linear_to_tac(m, "1", num_modules=2)
    with pytest.raises(ValueError, match="num_modules"):
        TACLinear(3, 3, 0)


def test_residual_rnn_stack_depth_times_width(tmp_path):
    torch.manual_seed(0)
    m = ResRNNStack(depth=4, modules=4).eval()
    x = m.example_inputs()[0]
    with torch.no_grad():
        ref = m(x)
    em = elasticize.elasticize(m, x, dims=("modules", "depth"))
    assert em.space.depth == {"layers": [4, 3, 2, 1]}
    assert sorted(em.space.modules) == [f"layers.{i}.fc:modules" for i in range(4)]
    path = tmp_path / "stack.safetensors"
    elasticize.save(em, path)
    em2 = elasticize.load(path, model=ResRNNStack(depth=4, modules=4))
    macs = {}
    with torch.no_grad():
        assert max_diff(em(x), ref) <= 1e-5
        for d in (4, 2, 1):
            for w in (4, 2, 1):
                cfg = {"depth": {"layers": d}, "modules": w / 4}
                with em.subnet(cfg), em2.subnet(cfg):
                    y = em(x)
                    assert max_diff(em2(x), y) == 0.0
                dense = em.extract(cfg)
                assert sum(isinstance(b, ResidualRNN) for b in dense.layers) == d
                assert all(b.fc.num_modules == w for b in dense.layers if isinstance(b, ResidualRNN))
                assert max_diff(dense(x), y) <= 1e-5, cfg
                macs[d, w] = em.macs(cfg)
    assert macs[4, 4] > macs[4, 2] > macs[4, 1] > macs[2, 1] > macs[1, 1]
    # a layer's MACs: LSTM + w * FC module + w * TAC; the difference between widths is linear in w
    assert macs[4, 4] - macs[4, 2] == 2 * (macs[4, 2] - macs[4, 1])


def test_presets_shrink_the_modules_with_the_width():
    torch.manual_seed(0)
    m = ResRNNStack(depth=2, modules=8).eval()
    em = elasticize.elasticize(m, dims=("modules", "depth"))
    tiny = em.resolve("tiny")
    assert set(tiny["modules"].values()) == {2} and tiny["depth"]["layers"] == 1
    assert em.resolve({"modules": 0.5})["modules"]["layers.0.fc:modules"] == 4


def test_cli_lists_the_modules_dimension(tmp_path):
    from click.testing import CliRunner

    from elasticize.cli import main

    out = tmp_path / "stack.safetensors"
    res = CliRunner().invoke(main, ["convert", "rnn_models:ResRNNStack", "--no-pretrained", "--dims", "modules,depth",
                                    "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "layers.0.fc:modules" in res.output and "4 modules" in res.output
    manifest = elasticize.read_manifest(out)
    assert manifest["search_space"]["modules"]["layers.3.fc:modules"] == [4, 3, 2, 1]
    res = CliRunner().invoke(main, ["extract", str(out), "--config", '{"modules": 0.5, "depth": 0.5}',
                                    "-o", str(tmp_path / "half.safetensors"), "--trust-remote-code"])
    assert res.exit_code == 0, res.output
    dense = elasticize.load_subnet(tmp_path / "half.safetensors", trust_remote_code=True)
    assert [b.fc.num_modules for b in dense.layers if isinstance(b, ResidualRNN)] == [2, 2]
