"""Concatenation per segment (issue 19): a ``torch.cat`` of different groups keeps each input's group.

Each model's joins are real torchvision blocks (DenseNet's dense layers and transitions, GoogLeNet's and
Inception-v3's Inception blocks) or YOLOv8's (C2f, SPPF, an FPN/PAN neck, :class:`elasticize.testing.zoo.TinyYOLO`),
with random weights; the full-size torchvision models are in ``benchmarks/bench_coverage.py``. For each:
identity at full size, exact extraction and ``load_subnet`` at every preset, the plan's MACs equal to
``FlopCounterMode`` at every preset (:func:`elasticize.testing.check_conformance`), and the smallest preset
cut to a small share of the full MACs, which a kept-whole concatenation cannot reach.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import elasticize
from elasticize.plan import Axis, Plan, Segments, is_segmented
from elasticize.plan.parse import ManifestError
from elasticize.testing import check_conformance
from elasticize.testing.zoo import TinyYOLO


class _Join(nn.Module):
    """A stem joined with two branches, then that join joined again (a cat of a cat); a second join of four
    branches chunked in two halves of one layout: ``(batch, 3, 12, 12) -> (batch, 5)``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU())
        self.a, self.b = nn.Conv2d(16, 8, 1), nn.Sequential(nn.Conv2d(16, 12, 3, padding=1), nn.BatchNorm2d(12))
        self.c = nn.Conv2d(36, 20, 1)
        self.bn = nn.BatchNorm2d(56)
        self.p, self.q, self.p2, self.q2 = nn.Conv2d(16, 4, 1), nn.Conv2d(16, 6, 1), nn.Conv2d(16, 4, 1), \
            nn.Conv2d(16, 6, 1)
        self.left, self.right = nn.Conv2d(10, 6, 1), nn.Conv2d(10, 6, 1)
        self.fc = nn.Linear(56 + 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = torch.cat([x, self.a(x), self.b(x)], 1)
        z = torch.relu(self.bn(torch.cat([y, self.c(y)], 1)))
        u = torch.cat([self.p(x), self.q(x), self.p2(x), self.q2(x)], 1)
        left, right = u.chunk(2, 1)  # [p, q] and [p2, q2]: one layout, so p2 follows p and q2 follows q
        return self.fc(torch.cat([z, self.left(left) + self.right(right)], 1).mean((2, 3)))


def _densenet() -> nn.Module:
    from torchvision.models import DenseNet

    return DenseNet(growth_rate=8, block_config=(2, 3), num_init_features=16, bn_size=2, num_classes=5)


def _googlenet_blocks() -> nn.Module:
    from torchvision.models.googlenet import Inception

    return nn.Sequential(nn.Conv2d(3, 16, 3), Inception(16, 4, 4, 8, 2, 4, 4), Inception(20, 8, 4, 8, 2, 4, 4),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 5))


def _inception_v3_blocks() -> nn.Module:
    from torchvision.models import inception as tv

    # InceptionB max-pools its (segmented) input as one branch; InceptionE concatenates concatenations
    return nn.Sequential(tv.BasicConv2d(3, 16, kernel_size=3), tv.InceptionA(16, 8), tv.InceptionB(232),
                         tv.InceptionE(712), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, 5))


CASES = {  # name -> (builder, input shape, largest share of the full MACs allowed at the smallest preset)
    "join": (_Join, (2, 3, 12, 12), 0.15),
    "densenet": (_densenet, (2, 3, 32, 32), 0.20),
    "googlenet_blocks": (_googlenet_blocks, (2, 3, 12, 12), 0.15),
    "inception_v3_blocks": (_inception_v3_blocks, (1, 3, 9, 9), 0.10),
    "tiny_yolo": (TinyYOLO, (2, 3, 32, 32), 0.10),
}


@pytest.mark.parametrize("name", list(CASES))
def test_concatenation_is_sliced_per_segment(name):
    build, shape, share = CASES[name]
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(*shape)
    rep = check_conformance(model, (x,))  # identity, extraction, load, load_subnet, MACs == FlopCounterMode
    assert rep.macs["full"][0] == rep.macs["full"][1]
    smallest = min(rep.macs.values())[0]
    assert smallest <= share * rep.macs["full"][0], (name, smallest / rep.macs["full"][0])
    em = elasticize.elasticize(copy.deepcopy(model), (x,))
    segmented = [f for f, info in em.plan.tensors.items() if any(is_segmented(a) for a in info.axes.values())]
    assert segmented, "no consumer reads a concatenation per segment"
    assert not [w for w, why in em.plan.not_elastic if "concatenated" in why]


class _LiteralSplit(nn.Module):
    """A join split in literal sizes, which a sub-network's segments would not follow: ``(batch, 3, 8, 8) -> (batch, 4)``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1), nn.Conv2d(4, 6, 1), nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = torch.cat([self.a(x), self.b(x)], 1).split([4, 12], 1)
        return self.d(torch.relu(self.c(left))).mean((2, 3)) + right.sum((1, 2, 3))[:, None]


def test_chunks_of_one_layout_keep_the_segments():
    torch.manual_seed(0)
    em = elasticize.elasticize(_Join().eval(), (torch.randn(2, 3, 12, 12),))
    axes = {f: info.axes for f, info in em.plan.tensors.items()}
    assert isinstance(axes["left.weight"][1], Segments)
    assert axes["left.weight"][1].groups == axes["right.weight"][1].groups == ("p:out", "q:out")
    assert axes["p2.weight"][0] == Axis("p:out", 1) and axes["q2.weight"][0] == Axis("q:out", 1)
    fc_in = axes["fc.weight"][1]  # [stem, a, b, c] of z, then the branch sum, which is left's group
    assert fc_in.groups == ("stem.0:out", "a:out", "b.0:out", "c:out", "left:out")
    assert Plan.from_json(em.plan.to_json()) == em.plan  # segments round-trip exactly through JSON
    sub = em.extract({"width": 0.5})
    assert sub.c.in_channels == sub.c.weight.shape[1] == 8 + 4 + 6  # each segment's half, summed
    assert sub.bn.num_features == sub.bn.weight.shape[0] == 8 + 4 + 6 + 10
    lit = elasticize.elasticize(_LiteralSplit().eval(), (torch.randn(2, 3, 8, 8),))
    assert [g.name for g in lit.plan.groups] == ["c:out"]
    assert any("in literal sizes" in why for _, why in lit.plan.not_elastic)


def test_plan_check_rejects_malformed_segments():
    torch.manual_seed(0)
    plan = elasticize.elasticize(_Join().eval(), (torch.randn(2, 3, 12, 12),)).plan.to_json()
    Plan.from_json(copy.deepcopy(plan))  # the plan as written passes
    bad = {
        "a segment too many": lambda e: e + [3],
        "an unknown group": lambda e: [["nope:out", 1]] + e[1:],
        "no group at all": lambda e: [36],
        "a bool as channels": lambda e: e[:-1] + [True],
    }
    for what, change in bad.items():
        p = copy.deepcopy(plan)
        p["tensors"]["c.weight"]["axes"]["1"] = change(p["tensors"]["c.weight"]["axes"]["1"])
        with pytest.raises(ManifestError, match=r"c\.weight"):
            Plan.from_json(p)
        assert what
