"""Conversion as passes (elasticize.conversion): typed options, and a report that names the passes
run and the fallback steps taken."""

from __future__ import annotations

import pytest
import torch

import elasticize
from elasticize import ConvertOptions
from elasticize.rules import Rule, register_rule, unregister_rule

from toy_models import FixedReshape, ToyCNN


def _converted(**kw):
    torch.manual_seed(0)
    model = ToyCNN().eval()
    return elasticize.elasticize(model, **kw)


def test_options_and_keywords_give_the_same_model():
    kw = dict(dims=("width", "depth"), width_ratios=(1.0, 0.5), depth_mode="skippable", exclude=("stage.2*",),
              sort="magnitude")
    by_kw = _converted(**kw)
    by_opts = _converted(options=ConvertOptions(**kw))
    assert by_opts.plan.to_json() == by_kw.plan.to_json()
    assert by_opts.presets == by_kw.presets
    a, b = by_kw.model.state_dict(), by_opts.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    positional = elasticize.elasticize(ToyCNN().eval(), None, ConvertOptions(dims=("width",)))
    assert {g.kind for g in positional.plan.groups} == {"width"} and not positional.plan.stages


def test_options_are_typed_frozen_and_json_native():
    opts = ConvertOptions(dims=["width", "heads"], width_ratios=[1.0, 0.5])
    assert opts.dims == ("width", "heads") and opts.width_ratios == (1.0, 0.5)
    with pytest.raises(Exception):  # frozen
        opts.dims = ("depth",)
    assert ConvertOptions.from_json(opts.to_json()) == opts
    assert opts.to_json()["version"] == ConvertOptions.VERSION
    assert opts.replace(sort=None).sort is None and opts.sort == "auto"
    with pytest.raises(TypeError, match="dims takes a sequence"):
        ConvertOptions(dims="width")
    with pytest.raises(ValueError, match="sort must be"):
        ConvertOptions(sort="wanda")
    with pytest.raises(ValueError, match="newer than this elasticize reads"):
        ConvertOptions.from_json({"version": ConvertOptions.VERSION + 1})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['hook'\]"):
        ConvertOptions.from_json({"version": 1, "hook": "x"})
    with pytest.raises(ValueError, match="need a version"):
        ConvertOptions.from_json({"dims": ["width"]})


def test_options_and_a_differing_keyword_together_are_refused():
    with pytest.raises(TypeError, match="dims given both"):
        elasticize.elasticize(ToyCNN().eval(), options=ConvertOptions(), dims=("width",))
    with pytest.raises(TypeError, match="ConvertOptions"):
        elasticize.elasticize(ToyCNN().eval(), options={"dims": ("width",)})
    with pytest.raises(TypeError, match="dims given both"):
        elasticize.convert("toy_models:ToyCNN", options=ConvertOptions(), dims=("width",))


def test_the_report_names_the_passes_and_no_fallback():
    em = _converted()
    conv = em.report()["conversion"]
    assert conv == em.conversion
    assert conv["passes"] == ["analyze", "plan", "sort", "check_function", "apply", "check_smallest"]
    assert conv["fallbacks"] == []
    assert _converted(sort=None).conversion["passes"] == ["analyze", "plan", "apply", "check_smallest"]


def test_the_report_names_the_keep_whole_fallback():
    @register_rule("overclaiming_for_report")
    class Overclaiming(Rule):  # claims lin's outputs are elastic, but the forward reshapes to self.n
        module_types = (FixedReshape,)

        def analyze(self, ctx, x):
            y = ctx.linear(x, weight="lin.weight", bias="lin.bias")
            ctx.attr("out_features", y[-1], module="lin")
            return y

    try:
        model = torch.nn.Sequential(FixedReshape(), torch.nn.ReLU(), torch.nn.Linear(16, 32), torch.nn.ReLU(),
                                    torch.nn.Linear(32, 3)).eval()
        em = elasticize.elasticize(model, torch.randn(2, 8))
    finally:
        unregister_rule("overclaiming_for_report")
    conv = em.report()["conversion"]
    assert conv["passes"] == ["analyze", "plan", "sort", "check_function", "apply", "check_smallest", "keep_whole",
                              "plan", "apply", "check_smallest"]
    (fallback,) = conv["fallbacks"]
    assert fallback["step"] == "keep_whole" and list(fallback["kept"]) == ["0.lin:out"]
    assert fallback["kept"]["0.lin:out"].startswith("RuntimeError: shape")
    assert "failed to run on the example inputs" in dict(em.plan.not_elastic)["0.lin:out"]


class _HiddenScale(torch.nn.Module):
    """Scales its input channels before its linear layer, by a tensor its rule does not declare."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(32, 3)
        self.scale = torch.nn.Parameter(torch.linspace(0.5, 2.0, 32))

    def forward(self, x):
        return self.lin(x * self.scale)


def test_the_report_names_the_keep_order_and_keep_whole_fallbacks():
    """A rule that leaves out a tensor reading its input channels (``scale``): sorting those
    channels changes the output, so check_function puts the width order back (keep_order), and a
    narrower input cannot meet the full-size scale, so check_smallest keeps that group whole."""
    @register_rule("hidden_scale_for_report")
    class HiddenScale(Rule):
        module_types = (_HiddenScale,)

        def analyze(self, ctx, x):
            return ctx.linear(x, weight="lin.weight", bias="lin.bias")

    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 32), torch.nn.ReLU(),
                                    _HiddenScale()).eval()
        x = torch.randn(4, 8)
        with torch.no_grad():
            before = model(x).clone()
        em = elasticize.elasticize(model, x, dims=("width",))
    finally:
        unregister_rule("hidden_scale_for_report")
    conv = em.conversion
    assert [f["step"] for f in conv["fallbacks"]] == ["keep_order", "keep_whole"]
    assert conv["fallbacks"][0]["kinds"] == ["width"] and list(conv["fallbacks"][1]["kept"]) == ["2:out"]
    assert conv["passes"][-4:] == ["keep_whole", "plan", "apply", "check_smallest"]
    reasons = dict(em.plan.not_elastic)
    assert reasons["width"].startswith("kept in the original order")
    assert "failed to run on the example inputs" in reasons["2:out"]
    assert [g.name for g in em.plan.groups] == ["0:out"] and em.plan.groups[0].sort is False
    with torch.no_grad():
        assert torch.equal(em(x), before)
