"""Depth: SortedNet prefix depth and Adaptive-Depth skippable sub-paths with switchable norms."""

from __future__ import annotations

import pytest
import timm
import torch

import elasticize
from conftest import max_diff


def _model():
    torch.manual_seed(0)
    return timm.create_model("resnet50", pretrained=False).eval()


def test_prefix_depth_keeps_the_first_blocks():
    em = elasticize.elasticize(_model(), torch.randn(1, 3, 64, 64), dims=("depth",))
    st = {s.name: s for s in em.plan.stages}
    assert st["layer3"].choices == (6, 5, 4, 3, 2, 1) and st["layer3"].n_mandatory == 1
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), em.subnet({"depth": {"layer3": 2}}):
        y = em(x)
        dense = em.extract(em.active)
    assert isinstance(dense.layer3[2], torch.nn.Identity) and not isinstance(dense.layer3[1], torch.nn.Identity)
    assert max_diff(dense(x), y) < 1e-5


def test_skippable_subpaths_with_switchable_batchnorm(tmp_path):
    m = _model()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = m(x)
    em = elasticize.elasticize(m, x[:1], depth_mode="skippable", recipe={"adapter": "timm", "name": "resnet50",
                                                                       "kwargs": {}})
    st = {s.name: s for s in em.plan.stages}
    # ResNet-50 stages of 3, 4, 6, 3 blocks: mandatory halves of 2, 2, 3, 2 (arXiv 2312.16392)
    assert [st[f"layer{i}"].first_skippable for i in (1, 2, 3, 4)] == [2, 2, 3, 2]
    assert [st[f"layer{i}"].choices for i in (1, 2, 3, 4)] == [(3, 2), (4, 2), (6, 3), (3, 2)]
    # every norm of a mandatory block is switchable; none of a skippable one
    assert "layer3.2.bn3" in em.plan.switchable and "layer3.3.bn1" not in em.plan.switchable
    bn = em.model.layer3[0].bn1
    assert bn.elastic_skip_weight is not bn.weight and torch.equal(bn.elastic_skip_running_var, bn.running_var)
    with torch.no_grad():
        assert max_diff(em(x), ref) <= 1e-5 * max(1, ref.abs().max().item())
        # give the base-net its own statistics, as skip-aware training would
        for mod, sw in em.plan.switchable.items():
            em.model.get_submodule(mod).elastic_skip_running_mean.add_(0.05)
        assert max_diff(em(x), ref) <= 1e-5 * max(1, ref.abs().max().item())  # super-net unaffected
        base = {"depth": {s: c.choices[-1] for s, c in st.items()}}
        with em.subnet(base):
            y_base = em(x)
            assert em.model.layer3[0].bn1.running_mean.data_ptr() == \
                em.model.layer3[0].bn1._buffers["elastic_skip_running_mean"].data_ptr()
        dense = em.extract(base)
        assert max_diff(dense(x), y_base) < 1e-5
        assert torch.equal(dense.layer3[0].bn1.running_mean, em.model.layer3[0].bn1.elastic_skip_running_mean)
    path = tmp_path / "adn.safetensors"
    elasticize.save(em, path)
    em2 = elasticize.load(path)
    with torch.no_grad(), em2.subnet(base):
        assert max_diff(em2(x), y_base) == 0
    with pytest.raises(ValueError, match="choose one of \\[6, 3\\]"):
        em.set_subnet({"depth": {"layer3": 4}})
