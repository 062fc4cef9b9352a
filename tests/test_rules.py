"""The rule registry and a user rule that lives in one file (examples/user_rule.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import elasticize
from elasticize.plan import Axis
from elasticize.rules import Rule, get_rule, register_rule, registered_rules, unregister_rule
from conftest import max_diff
from toy_models import FixedReshape

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples.user_rule import ScaledLinear, TinyMLP  # noqa: E402  (registers "scaled_linear")


def test_duplicate_name_raises_and_unknown_name_lists_known():
    with pytest.raises(ValueError, match="already registered"):
        register_rule("linear")(type("Again", (Rule,), {}))
    with pytest.raises(KeyError, match="known rules: .*'conv'.*import the module"):
        get_rule("no_such_rule")
    with pytest.raises(TypeError, match="subclass of elasticize.rules.Rule"):
        register_rule("not_a_rule")(object)


def test_user_rule_converts_and_round_trips_by_name(tmp_path):
    torch.manual_seed(0)
    m = TinyMLP().eval()
    x = m.example_inputs()[0]
    ref = m(x)
    em = elasticize.elasticize(m, recipe={"adapter": "import", "name": "examples.user_rule:TinyMLP", "kwargs": {}})
    assert em.plan.sites["fc1"] == "scaled_linear"
    assert em.plan.tensors["fc1.scale"].axes == {0: Axis("fc1.linear:out", 1)}
    assert max_diff(em(x), ref) < 1e-6
    with torch.no_grad(), em.subnet("tiny"):
        y = em(x)
        dense = em.extract("tiny")
        assert dense.fc1.scale.shape[0] == 16 and dense.fc1.linear.out_features == 16
        assert max_diff(dense(x), y) < 1e-6
    path = tmp_path / "mlp.safetensors"
    elasticize.save(em, path)
    em2 = elasticize.load(path, trust_remote_code=True)  # rebuilt from the import path, rule found by its name
    with torch.no_grad(), em2.subnet("tiny"):
        assert max_diff(em2(x), y) == 0
    saved = registered_rules()["scaled_linear"]
    unregister_rule("scaled_linear")
    try:
        with pytest.raises(KeyError, match="no rule named 'scaled_linear'"):
            elasticize.load(path, trust_remote_code=True)
    finally:
        register_rule("scaled_linear")(type(saved))


def test_without_the_rule_the_custom_layer_is_traced_through():
    # with no rule, fx traces into ScaledLinear: linear + broadcast mul with a parameter
    from elasticize.graph import analyze
    from elasticize.rules import find_rule

    m = TinyMLP().eval()
    a = analyze(m, m.example_inputs(), lambda mod: None if isinstance(mod, ScaledLinear) else find_rule(mod))
    assert any(a.tensors["fc1.scale"]["axes"].values())


def test_a_subnetwork_that_cannot_run_is_kept_whole_at_conversion():
    @register_rule("overclaiming")
    class Overclaiming(Rule):  # claims lin's outputs are elastic, but the module's forward reshapes to self.n
        module_types = (FixedReshape,)

        def analyze(self, ctx, x):
            y = ctx.linear(x, weight="lin.weight", bias="lin.bias")
            ctx.attr("out_features", y[-1], module="lin")
            return y

    try:
        model = torch.nn.Sequential(FixedReshape(), torch.nn.ReLU(), torch.nn.Linear(16, 32), torch.nn.ReLU(),
                                    torch.nn.Linear(32, 3)).eval()
        x = torch.randn(2, 8)
        em = elasticize.elasticize(model, x)
        why = dict(em.plan.not_elastic)["0.lin:out"]
        assert "failed to run on the example inputs (RuntimeError: shape" in why
        assert {g.name for g in em.plan.groups} == {"2:out"}
        for p in em.presets:
            with torch.no_grad(), em.subnet(p):
                assert em(x).shape == (2, 3)
        assert not any(type(m).__name__.startswith("Elastic") for m in model[0].modules())  # surgery undone there
        alone = torch.nn.Sequential(FixedReshape(), torch.nn.ReLU(), torch.nn.Linear(16, 3)).eval()
        with pytest.raises(ValueError, match="nothing in Sequential could be made elastic: every group and stage "
                                             "failed to run at its smallest"):
            elasticize.elasticize(alone, x)  # its only group fails: a clear error, not an inert elastic model
    finally:
        unregister_rule("overclaiming")
