"""The audited op table (issue 19, part 3): every swept op has a row, and each op handled by
:mod:`elasticize.graph.ops.channels` (and the others the audit names) passes the conformance checker on a
tiny model built around it: identity at full size, exact extraction and ``load_subnet`` at every preset,
the plan's MACs equal to ``FlopCounterMode`` (:func:`elasticize.testing.check_conformance`), and the
channels around the op elastic (its producer convolution is sliced at the smallest preset)."""

from __future__ import annotations

import json
from importlib import resources
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import elasticize
from elasticize.graph.ops import audit, registered_ops
from elasticize.testing import check_conformance


class _Around(nn.Module):
    """``conv(3 -> c) -> op -> conv(c' -> 6) -> mean``: the op between a producer and a consumer convolution,
    ``(batch, 3, 8, 8) -> (batch, 6)``; ``c_out`` is the consumer's input channels after the op."""

    def __init__(self, fn: Callable[["_Around", torch.Tensor], torch.Tensor], c: int = 8, c_out: int | None = None,
                 extra: Callable[[], dict[str, nn.Module]] | None = None) -> None:
        super().__init__()
        self.fn = fn
        self.a = nn.Conv2d(3, c, 3, padding=1)
        for k, m in (extra() if extra else {}).items():
            setattr(self, k, m)
        self.b = nn.Conv2d(c if c_out is None else c_out, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.fn(self, self.a(x))).mean((2, 3))


def _grid_buffer() -> dict[str, nn.Module]:
    theta = torch.tensor([[[0.9, 0.1, 0.0], [-0.1, 0.9, 0.0]]])
    m = nn.Module()
    m.register_buffer("grid", F.affine_grid(theta.expand(2, 2, 3), [2, 8, 6, 6], align_corners=False))
    return {"g": m}


def _shuffle(m: nn.Module, y: torch.Tensor) -> torch.Tensor:
    left, right = y.chunk(2, 1)  # ShuffleNet's pattern: two equal halves, one changed, joined and shuffled
    return F.channel_shuffle(torch.cat([left, 2 * right], 1), 2)


def _bag() -> nn.Module:
    class Bag(nn.Module):  # (batch, 4) indices -> (batch, 5)
        def __init__(self) -> None:
            super().__init__()
            self.bag, self.fc = nn.EmbeddingBag(20, 8, mode="mean"), nn.Linear(8, 5)

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            return self.fc(F.relu(self.bag(idx)))
    return Bag()


def _hot() -> nn.Module:
    class Hot(nn.Module):  # (batch, 4) indices -> (batch, 4, 5): a one-hot code read by a linear layer
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(10, 8), nn.Linear(8, 5)

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.relu(self.fc1(F.one_hot(idx, 10).float())))
    return Hot()


IMG = (2, 3, 8, 8)
#: op -> (builder, input shape or an input maker); each model's producer must be elastic
CASES: dict[str, tuple[Callable[[], nn.Module], object]] = {
    "prelu": (lambda: _Around(lambda m, y: m.act(y), extra=lambda: {"act": nn.PReLU(8)}), IMG),
    "glu": (lambda: _Around(lambda m, y: F.glu(y, 1), c=16, c_out=8), IMG),
    "pixel_shuffle": (lambda: _Around(lambda m, y: F.pixel_shuffle(y, 2), c=16, c_out=4), IMG),
    "pixel_unshuffle": (lambda: _Around(lambda m, y: m.down(y), c_out=32,
                                        extra=lambda: {"down": nn.PixelUnshuffle(2)}), IMG),
    "channel_shuffle": (lambda: _Around(_shuffle), IMG),
    "conv_transpose": (lambda: _Around(lambda m, y: m.up(y), extra=lambda: {"up": nn.ConvTranspose2d(8, 8, 2, 2)}),
                       IMG),
    "interpolate": (lambda: _Around(lambda m, y: F.interpolate(y, scale_factor=2, mode="bilinear")), IMG),
    "upsample": (lambda: _Around(lambda m, y: m.up(y), extra=lambda: {"up": nn.Upsample(scale_factor=2)}), IMG),
    "pad": (lambda: _Around(lambda m, y: F.pad(y, (1, 1, 2, 0), mode="reflect")), IMG),
    "roll": (lambda: _Around(lambda m, y: torch.roll(y, (1, 2), (2, 3))), IMG),
    "flip": (lambda: _Around(lambda m, y: torch.flip(y, (3,))), IMG),
    "softmax": (lambda: _Around(lambda m, y: F.softmax(y, 1) + F.log_softmax(y, 1)), IMG),
    "normalize": (lambda: _Around(lambda m, y: F.normalize(y, dim=1)), IMG),
    "instance_norm": (lambda: _Around(lambda m, y: m.n(y), extra=lambda: {"n": nn.InstanceNorm2d(8, affine=True)}),
                      IMG),
    "instance_norm_functional": (lambda: _Around(lambda m, y: F.instance_norm(y, weight=m.w, bias=None),
                                                 extra=lambda: {"w": nn.Parameter(torch.rand(8) + 0.5)}), IMG),
    "local_response_norm": (lambda: _Around(lambda m, y: m.n(y), extra=lambda: {"n": nn.LocalResponseNorm(3)}), IMG),
    "rms_norm": (lambda: _Around(lambda m, y: m.n(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2),
                                 extra=lambda: {"n": nn.RMSNorm(8)}), IMG),
    "layer_norm_non_affine": (lambda: _Around(lambda m, y: m.n(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2),
                                              extra=lambda: {"n": nn.LayerNorm(8, elementwise_affine=False)}), IMG),
    "group_norm_non_affine": (lambda: _Around(lambda m, y: m.n(y), extra=lambda: {"n": nn.GroupNorm(4, 8,
                                                                                                   affine=False)}),
                              IMG),
    "where": (lambda: _Around(lambda m, y: torch.where(y > 0, y, 0.1 * y)), IMG),
    "masked_fill": (lambda: _Around(lambda m, y: y.masked_fill(y < -1, 0.0)), IMG),
    "cumsum": (lambda: _Around(lambda m, y: torch.cumsum(y, 1) / 8), IMG),
    "adaptive_pool": (lambda: _Around(lambda m, y: F.adaptive_avg_pool2d(y, 3) + F.adaptive_max_pool2d(y, 3)), IMG),
    "unfold_fold": (lambda: _Around(lambda m, y: F.fold(F.unfold(y, 2, stride=2) * 0.5, (8, 8), 2, stride=2)), IMG),
    "unfold": (lambda: _Around(lambda m, y: F.unfold(y, 2, stride=2).unflatten(2, (4, 4)), c_out=32), IMG),
    "grid_sample": (lambda: _Around(lambda m, y: F.grid_sample(y, m.g.grid, align_corners=False), extra=_grid_buffer), IMG),
    "embedding_bag": (_bag, lambda: torch.randint(0, 20, (2, 4), generator=torch.Generator().manual_seed(0))),
    "one_hot": (_hot, lambda: torch.randint(0, 10, (2, 4), generator=torch.Generator().manual_seed(0))),
}


@pytest.mark.parametrize("name", list(CASES))
def test_handled_op_conforms(name):
    build, shape = CASES[name]
    torch.manual_seed(0)
    model = build().eval()
    x = shape() if callable(shape) else torch.randn(*shape)
    rep = check_conformance(model, (x,), rtol=1e-4)
    measured = [counted for _, counted in rep.macs.values()]
    assert min(measured) < 0.8 * max(measured), f"{name}: the smallest preset cut nothing"
    assert "a" in rep.elastic if isinstance(model, _Around) else rep.elastic


def test_order_dependent_ops_keep_their_groups_order():
    torch.manual_seed(0)
    em = elasticize.elasticize(CASES["cumsum"][0]().eval(), (torch.randn(*IMG),))
    g = next(g for g in em.plan.groups if g.name == "a:out")
    assert g.sort is False


def test_pixel_shuffle_moves_in_units_of_r_squared():
    torch.manual_seed(0)
    em = elasticize.elasticize(CASES["pixel_shuffle"][0]().eval(), (torch.randn(*IMG),))
    g = next(g for g in em.plan.groups if g.name == "a:out")
    assert g.unit == 4 and all(c % 4 == 0 for c in g.choices)
    small = em.extract(list(em.presets)[-1])
    assert small.b.in_channels * 4 == small.a.out_channels < 16


def test_every_swept_op_has_a_row():
    """The sweep's data (scripts/op_sweep.py) lists every op of torch.nn.functional and every op seen in the
    timm, torchvision, transformers and RNN/TAC models; each one is handled, fixed with its reason, or a
    non-tensor op the analysis passes by, or unsupported with what a handler would need."""
    data = json.loads(resources.files("elasticize.graph.ops").joinpath("audit.json").read_text())
    assert "relu" in data["ops"] and "conv2d" in data["ops"] and len(data["models"]["timm"]) > 20
    rows = audit.rows()
    missing = sorted(set(data["ops"]) - set(rows))
    assert not missing, f"ops with no row in the op table: {missing}"
    vague = sorted(n for n, r in rows.items() if r.status not in ("handled", "fixed", "passed by", "unsupported")
                   or not r.how)
    assert not vague, f"ops whose row gives no coupling or reason: {vague}"
    assert rows["prelu"].status == rows["pixel_shuffle"].status == "handled" and rows["mse_loss"].status == "fixed"
    assert set(registered_ops()) <= set(rows)
