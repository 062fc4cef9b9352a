"""PyTorch's own transformer modules: nn.TransformerEncoder, nn.TransformerDecoder, nn.Transformer,
and nn.MultiheadAttention's heads with the residual width.

Their forwards branch on input properties (nested tensors, the fused inference kernel), which
``torch.fx`` cannot trace; the analysis traces an equivalent loop over their layers instead.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import elasticize
import toy_models as toys
from conftest import max_diff

CASES = {
    "post-norm encoder": lambda: toys.TorchEncoder(norm_first=False),
    "pre-norm encoder": lambda: toys.TorchEncoder(norm_first=True),
    "encoder-decoder": toys.TorchSeq2Seq,
}


@pytest.fixture(params=list(CASES), scope="module")
def case(request):
    torch.manual_seed(0)
    m = CASES[request.param]().eval()
    xs = m.example_inputs()
    with torch.no_grad():
        ref = m(*xs)
    return request.param, elasticize.elasticize(m), xs, ref


def test_ffn_width_heads_and_full_equals_original(case):
    name, em, xs, ref = case
    groups = {g.name: g for g in em.plan.groups}
    assert "enc.layers.1.linear1:out" in groups or "tr.decoder.layers.2.linear1:out" in groups
    # the residual width: every attention's embed_dim, in whole heads (head_dim 8)
    assert groups["inp:out"].unit == 8 and groups["inp:out"].choices == (32, 24, 16, 8)
    with torch.no_grad():
        assert max_diff(em(*xs), ref) < 1e-5
    sub = em.extract({"width": 0.5})
    attns = [m for m in sub.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    assert attns and all((a.embed_dim, a.num_heads, a.head_dim, a.in_proj_weight.shape[0]) == (16, 2, 8, 48)
                         for a in attns)


def test_depth_over_pre_and_post_norm_layers(case):
    name, em, xs, ref = case
    stages = {s.name: s for s in em.plan.stages}
    if name in ("post-norm encoder", "pre-norm encoder"):  # post-norm: norm(x + f(x)) is dropped whole (LayerDrop)
        assert stages["enc.layers"].choices == (4, 3, 2, 1) and stages["enc.layers"].drop == "remove"
    else:
        assert set(stages) == {"tr.encoder.layers", "tr.decoder.layers"}


def test_every_preset_extracts_counts_and_trains(case, tmp_path):
    name, em, xs, ref = case
    path = tmp_path / "m.safetensors"
    elasticize.save(em, path)
    for p in em.presets:
        with torch.no_grad(), em.subnet(p):
            y = em(*xs)  # eval + no_grad: PyTorch's fused encoder-layer kernel, on the sliced weights
        sub = em.extract(p)
        with torch.no_grad():
            assert max_diff(sub(*xs), y) < 1e-5, p
            assert max_diff(elasticize.load_subnet(path, p, model=CASES[name]())(*xs), sub(*xs)) == 0, p
        if name != "encoder-decoder":
            depth = em.resolve(p)["depth"]["enc.layers"]
            assert len(sub.enc.layers) == sub.enc.num_layers == depth
        torch.backends.mha.set_fastpath_enabled(False)  # FlopCounterMode does not see the fused kernels
        try:
            with FlopCounterMode(display=False) as fc, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
                sub(*(x[:1] for x in xs))
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
        assert em.macs(p) == fc.get_total_flops() / 2, p
        assert em.params(p) == sum(t.numel() for t in sub.parameters()), p
    em.train()
    smallest = list(em.presets)[-1]
    with em.subnet(smallest):
        em(*xs).square().mean().backward()
    em.eval()
    grads = [n for n, t in em.model.named_parameters() if t.grad is not None and t.grad.abs().sum() > 0]
    assert any("linear1" in n for n in grads)
    em.model.zero_grad()


class _CrossAttention(torch.nn.Module):
    def __init__(self, by_keyword: bool) -> None:
        super().__init__()
        self.by_keyword = by_keyword
        self.q, self.kv = torch.nn.Linear(8, 32), torch.nn.Linear(8, 32 if by_keyword else 24)
        self.attn = torch.nn.MultiheadAttention(32, 4, batch_first=True, kdim=None if by_keyword else 24,
                                                vdim=None if by_keyword else 24)
        self.out = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))

    def forward(self, x):
        q, kv = self.q(x), self.kv(x)
        y = self.attn(q, key=kv, value=kv)[0] if self.by_keyword else self.attn(q, kv, kv)[0]
        return self.out(y)


@pytest.mark.parametrize("by_keyword", [False, True])
def test_attention_it_cannot_slice_stays_whole_with_the_reason(by_keyword):
    m = _CrossAttention(by_keyword).eval()
    x = torch.randn(2, 5, 8)
    em = elasticize.elasticize(m, x)
    why = dict(em.plan.not_elastic)["q:out"]
    assert ("by keyword" in why) if by_keyword else ("kdim or vdim" in why)
    with FlopCounterMode(display=False) as fc, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            m(x[:1])
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
    assert em.macs(None) == fc.get_total_flops() / 2


def test_inspect_shows_the_residual_width_moving_in_whole_heads(tmp_path):
    from click.testing import CliRunner

    from elasticize.cli import main

    em = elasticize.elasticize(toys.TorchEncoder().eval())
    path = tmp_path / "enc.safetensors"
    elasticize.save(em, path)
    res = CliRunner().invoke(main, ["inspect", str(path)], terminal_width=200)
    assert res.exit_code == 0, res.output
    row = next(line for line in res.output.splitlines() if "inp:out" in line)
    assert "32 (in units of 8)" in row and "32, 24, 16, 8" in row
