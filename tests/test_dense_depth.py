"""Depth where blocks concatenate instead of add (issue 19, part 2): dense layers and ``y = cat([x, f(x)])`` chains.

A skipped block's segment leaves every concatenation that reads it; extraction deletes a dense layer
(or puts ``nn.Identity`` for a chain block) and the later layers' and the transition's input columns of
that segment. Real torchvision DenseNet blocks with random weights; full densenet121 is in
``benchmarks/bench_coverage.py``.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import elasticize
from elasticize.plan import Plan
from elasticize.plan.parse import ManifestError
from elasticize.testing import check_conformance


def _densenet() -> nn.Module:
    from torchvision.models import DenseNet

    return DenseNet(growth_rate=8, block_config=(2, 3), num_init_features=16, num_classes=5)


class _Grow(nn.Module):
    """``y = cat([x, f(x)], 1)``: ``(batch, c, h, w) -> (batch, c + 4, h, w)``."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, 4, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.f(x)], 1)


def _chain() -> nn.Module:
    """A stem, three chained ``_Grow`` blocks and a head: ``(batch, 3, 8, 8) -> (batch, 5)``."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Sequential(_Grow(8), _Grow(12), _Grow(16)),
                         nn.Conv2d(20, 6, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))


def _macs(model: nn.Module, x: torch.Tensor) -> float:
    with FlopCounterMode(display=False) as fc:
        model(x)
    return fc.get_total_flops() / 2 / x.shape[0]


def test_densenet_depth_extracts_fewer_dense_layers():
    torch.manual_seed(0)
    model, x = _densenet().eval(), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    em = elasticize.elasticize(copy.deepcopy(model), (x,))
    stages = {s.name: s for s in em.plan.stages}
    assert set(stages) == {"features.denseblock1", "features.denseblock2"}
    assert stages["features.denseblock2"].outputs[2] == ("features.denseblock2.denselayer3.conv2:out",)
    assert stages["features.denseblock2"].skip_empty and stages["features.denseblock2"].drop == "remove"
    with torch.no_grad():
        assert torch.allclose(em(x), ref, atol=1e-5)  # identity at full size
        cfg = {"depth": 0.5}  # 1 of 2 and 2 of 3 dense layers, full width
        with em.subnet(cfg):
            y = em(x)
        sub = em.extract(cfg).eval()
        assert list(sub.features.denseblock1) == ["denselayer1"]
        assert list(sub.features.denseblock2) == ["denselayer1", "denselayer2"]
        assert not any("Elastic" in type(m).__name__ for m in sub.modules())
        # the deleted layers' columns are gone: the transition reads 16 + 8 of 16 + 2 * 8 channels, the final
        # norm 16 + 2 * 8 of 16 + 3 * 8
        assert sub.features.transition1.conv.in_channels == sub.features.transition1.conv.weight.shape[1] == 24
        assert sub.features.norm5.num_features == sub.features.norm5.weight.shape[0] == 32
        assert torch.allclose(sub(x), y, atol=1e-5)
    assert em.macs(cfg) == pytest.approx(_macs(sub, x))
    assert em.macs(cfg) < em.macs("full")


def test_cat_chain_depth():
    torch.manual_seed(0)
    model, x = _chain().eval(), torch.randn(2, 3, 8, 8)
    rep = check_conformance(model, (x,))  # identity, extraction, load, load_subnet, MACs at every preset
    em = elasticize.elasticize(copy.deepcopy(model), (x,))
    (st,) = em.plan.stages
    assert st.blocks == ("1.0", "1.1", "1.2") and not st.skip_empty and len(st.outputs) == 3
    assert "skip_empty" not in st.to_json()
    sub = em.extract({"depth": {"1": 1}}).eval()
    assert isinstance(sub[1][1], nn.Identity) and isinstance(sub[1][2], nn.Identity)
    assert sub[2].in_channels == 12
    with torch.no_grad(), em.subnet({"depth": {"1": 1}}):
        assert torch.allclose(sub(x), em(x), atol=1e-5)
    assert min(v[0] for v in rep.macs.values()) < rep.macs["full"][0]


def test_depth_alone_and_the_plan_check():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    em = elasticize.elasticize(_densenet().eval(), (x,), dims=("depth",))
    # the dense layers' output groups are offered at full size only, so their skips can remove their segments
    assert [s.name for s in em.plan.stages] == ["features.denseblock1", "features.denseblock2"]
    assert all(len(g.choices) == 1 for g in em.plan.groups)
    assert {g.name for g in em.plan.groups} == {g for s in em.plan.stages for gs in s.outputs for g in gs}
    with torch.no_grad(), em.subnet({"depth": 0.5}):
        y = em(x)
    assert torch.allclose(em.extract({"depth": 0.5}).eval()(x), y, atol=1e-5)
    typed = elasticize.elasticize(_densenet().eval(), (x,)).plan
    plan = typed.to_json()
    # the typed round trip is exact (as tests/test_spine.py): outputs and skip_empty come back as written
    again = Plan.from_json(json.loads(json.dumps(plan)))
    assert again == typed and again.stages[0].outputs == typed.stages[0].outputs and again.stages[0].skip_empty
    assert json.dumps(again.to_json(), separators=(",", ":")) == json.dumps(plan, separators=(",", ":"))
    assert plan["stages"][0]["skip_empty"] == 1 and len(plan["stages"][0]["outputs"]) == 2
    for v in (0, 2, True):  # written only as 1, so a round trip is exact
        p = copy.deepcopy(plan)
        p["stages"][0]["skip_empty"] = v
        with pytest.raises(ManifestError, match=r"stages\[0\]\.skip_empty"):
            Plan.from_json(p)
    for bad in (lambda o: o[:-1], lambda o: [["nope:out"]] + o[1:], lambda o: [o[0], o[0]]):
        p = copy.deepcopy(plan)
        p["stages"][0]["outputs"] = bad(p["stages"][0]["outputs"])
        with pytest.raises(ManifestError, match=r"stages\[0\]\.outputs"):
            Plan.from_json(p)
