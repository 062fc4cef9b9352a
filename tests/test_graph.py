"""Analysis: coupling groups, fixed axes with reasons, residual stages, untraceable modules, export fallback."""

from __future__ import annotations

import pytest
import torch

import elasticize
from elasticize.plan import Attr, Axis, Segments
import toy_models as toys
from conftest import max_diff


def _reasons(em):
    return {w: r for w, r in em.plan.not_elastic}


def test_residual_blocks_share_one_group_and_form_a_stage():
    em = elasticize.elasticize(toys.ToyCNN())
    g = em.plan.group("stem.0:out")
    members = {m for m, info in em.plan.tensors.items() if any(g.name in a.groups for a in info.axes.values())}
    # the residual adds tie the stem, every block's conv2/bn2 and the depthwise conv into one group
    for t in ("stem.0.weight", "stem.1.running_mean", "stage.0.conv2.weight", "stage.2.bn2.bias", "dw.weight",
              "stage.1.conv1.weight"):
        assert t in members, t
    assert em.plan.attrs["dw"]["groups"].group == g.name
    assert [s.name for s in em.plan.stages] == ["stage"]
    assert em.plan.stages[0].choices == (3, 2, 1)


def test_residual_chain_may_pass_through_reshapes():
    m = toys.SwinLike().eval()
    x = m.example_inputs()[0]
    em = elasticize.elasticize(m)
    assert [(s.name, s.choices) for s in em.plan.stages] == [("blocks", (3, 2, 1))]
    for p in em.presets:
        with torch.no_grad(), em.subnet(p):
            assert max_diff(em.extract(p)(x), em(x)) < 1e-6, p
    with torch.no_grad(), em.subnet({"depth": {"blocks": 1}}):  # skipped blocks return their input
        y = em(x)
    assert max_diff(y, m.head(m.blocks[0](m.stem(x)).mean((1, 2)))) < 1e-6


def test_grouped_conv_and_output_are_fixed_with_reasons():
    em = elasticize.elasticize(toys.ToyCNN())
    r = _reasons(em)
    assert "grouped convolution" in r["grouped:out"] and "grouped convolution" in r["expand:out"]
    # the concatenation's branches stay elastic, in whole groups of the GroupNorm that reads them (issue 19)
    assert {g.name: g.unit for g in em.plan.groups if g.name.startswith("branch")} == {
        "branch_a:out": 8, "branch_b:out": 8}
    assert em.plan.attrs["gn"]["num_groups"] == Attr(Segments((Axis("branch_a:out"), Axis("branch_b:out"))), "int", 1, 8)
    assert em.plan.attrs["gn"]["num_groups"].to_json() == [[["branch_a:out", 1], ["branch_b:out", 1]], "int", 1, 8]
    assert r["fc:out"] == "model output"
    assert em.plan.tensors["grouped.weight"].axes == {}


def test_group_norm_width_moves_in_whole_groups():
    class GN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 32, 3)
            self.gn = torch.nn.GroupNorm(8, 32)
            self.head = torch.nn.Linear(32, 2)

        def forward(self, x):
            return self.head(self.gn(self.conv(x)).mean((2, 3)))

    m = GN().eval()
    x = torch.randn(2, 3, 8, 8)
    ref = m(x)
    em = elasticize.elasticize(m, x)
    g = em.plan.group("conv:out")
    assert g.unit == 4 and all(c % 4 == 0 for c in g.choices)
    assert max_diff(em(x), ref) < 1e-5
    with torch.no_grad(), em.subnet({"width": 0.5}):
        assert em.model.gn.num_groups == 4
        assert max_diff(em.extract({"width": 0.5})(x), em(x)) < 1e-6


def test_group_norms_of_different_group_sizes_share_a_unit_that_fits_both():
    class GN2(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 24, 3)
            self.gn1 = torch.nn.GroupNorm(6, 24)  # 4 channels per group
            self.gn2 = torch.nn.GroupNorm(4, 24)  # 6 channels per group
            self.head = torch.nn.Linear(24, 2)

        def forward(self, x):
            return self.head(self.gn2(self.gn1(self.conv(x))).mean((2, 3)))

    m = GN2().eval()
    x = torch.randn(2, 3, 8, 8)
    em = elasticize.elasticize(m, x)
    g = em.plan.group("conv:out")
    assert g.unit == 12 and g.choices == (24, 12)  # lcm(4, 6): 18 channels would split neither norm
    for c in g.choices:
        with torch.no_grad(), em.subnet({"width": c / 24}):
            assert max_diff(em.extract({"width": c / 24})(x), em(x)) < 1e-6, c


def test_op_table_lists_every_handled_op_with_how_it_couples_axes():
    from elasticize.graph.ops import op, registered_ops

    table = registered_ops()
    assert {"add", "relu", "reshape", "permute", "cat", "getitem", "conv2d", "layer_norm", "matmul", "einsum",
            "scaled_dot_product_attention"} <= set(table)
    assert list(table) == sorted(table)
    assert all(row.couples and row.handler.startswith("elasticize.graph.ops.") for row in table.values())
    assert table["conv1d"].handler == table["conv3d"].handler == "elasticize.graph.ops.layers.conv"

    def handler(p, node):
        """Keeps the input's slots."""

    with pytest.raises(ValueError, match="'add' already has a handler"):  # one handler per op
        op("add")(handler)
    with pytest.raises(TypeError, match="docstring"):
        op("not_an_op")(lambda p, node: None)
    assert registered_ops() == table


def test_sizes_read_from_an_elastic_axis_fix_it():
    # D = x.shape[-1]; reshape(B, T, 3, heads, D // heads): slicing D would break the head split
    m = toys.TracedAttention().eval()
    x = m.example_inputs()[0]
    em = elasticize.elasticize(m)
    assert "inp:out" in _reasons(em)
    assert {g.name for g in em.plan.groups} == {"ff.0:out"}
    for p in em.presets:
        with torch.no_grad(), em.subnet(p):
            y = em(x)
        assert max_diff(em.extract(p)(x), y) < 1e-6, p


@pytest.mark.parametrize("name", ["TracedAttention", "FunctionalTransformer", "FunctionalTransformer-einsum"])
def test_matmul_and_attention_in_user_code_are_counted_and_sliced(name):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    m = (toys.FunctionalTransformer(einsum=True) if name.endswith("einsum") else getattr(toys, name)()).eval()
    x = m.example_inputs()[0]
    em = elasticize.elasticize(m)
    if name.startswith("FunctionalTransformer"):  # x @ W: W's columns are a width, as a linear layer's outputs
        assert "blocks.1.w1:out" in {g.name for g in em.plan.groups}
        assert em.plan.stages[0].choices == (3, 2, 1)
    assert len({em.macs(p) for p in em.presets}) == len(em.presets)
    for p in em.presets:
        sub = em.extract(p)
        with FlopCounterMode(display=False) as fc, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            sub(x[:1])
        assert em.macs(p) == fc.get_total_flops() / 2, p  # q @ k, a @ v, x @ W (or einsums) included; skipped blocks not
        with torch.no_grad(), em.subnet(p):
            assert max_diff(sub(x), em(x)) < 1e-6, p


def test_keyword_arguments_and_wrapped_functions_are_counted():
    from torch.utils.flop_counter import FlopCounterMode

    m = toys.KeywordsAndWrapped().eval()
    x = m.example_inputs()[0]
    em = elasticize.elasticize(m)
    assert {g.name for g in em.plan.groups} == {"fc2:out"}
    assert "unsupported op window_mix" in _reasons(em)["fc1:out"]  # the wrapped function's inputs stay whole
    for p in em.presets:
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            em.extract(p)(x[:1])
        assert em.macs(p) == fc.get_total_flops() / 2, p  # F.linear(x, weight=...) and window_mix included


def test_equal_chunks_of_an_axis_are_sliced_alike():
    from torch.utils.flop_counter import FlopCounterMode

    m = toys.GatedMLP().eval()
    x = m.example_inputs()[0]
    ref = m(x)
    em = elasticize.elasticize(m)  # magnitude order: one permutation applied to both halves
    g = em.plan.tensors["fc2.weight"].axes[1].group
    assert em.plan.tensors["fc1.weight"].axes[0] == Axis(g, 2) and em.plan.group(g).size == 48
    assert max_diff(em(x), ref) < 1e-6
    for p in em.presets:
        sub = em.extract(p)
        with torch.no_grad(), em.subnet(p):
            assert max_diff(sub(x), em(x)) < 1e-6, p
        assert sub.fc1.out_features == 2 * sub.fc2.in_features
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            sub(x[:1])
        assert em.macs(p) == fc.get_total_flops() / 2, p


def test_a_size_computed_onto_its_own_axis_keeps_it_elastic():
    class PoolThenView(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 32, 3)
            self.fc = torch.nn.Linear(32, 5)

        def forward(self, x):
            x = torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 1)
            return self.fc(x.view(x.size(0), x.size(1) * x.size(2) * x.size(3)))  # C * 1 * 1 is C

    m = PoolThenView().eval()
    x = torch.randn(2, 3, 8, 8)
    em = elasticize.elasticize(m, x)
    assert {g.name for g in em.plan.groups} == {"conv:out"}
    with torch.no_grad(), em.subnet("tiny"):
        assert max_diff(em.extract("tiny")(x), em(x)) < 1e-6


def test_untraceable_submodule_becomes_a_leaf_with_its_reason():
    m = toys.WithUntraceable().eval()
    x = m.example_inputs()[0]
    ref = m(x)
    em = elasticize.elasticize(m)
    r = _reasons(em)
    assert "odd" in r and "untraceable" in r["odd"]
    assert "fc1:out" in {g.name for g in em.plan.groups}  # before the leaf: still elastic
    assert "fc3:out" in {g.name for g in em.plan.groups}  # after it too
    assert "fc2:out" in r  # its output feeds the opaque module
    assert max_diff(em(x), ref) < 1e-6
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc, torch.no_grad():
        m(x[:1])
    assert em.macs(None) == fc.get_total_flops() / 2  # the opaque module's MACs are counted too
    with torch.no_grad():
        assert max_diff(em.extract("tiny")(x), em.eval().extract("tiny")(x)) == 0


def test_export_fallback_when_fx_cannot_trace_the_model():
    m = toys.LoopOverBatch().eval()
    x = m.example_inputs()[0]
    ref = m(x)
    em = elasticize.elasticize(m)
    assert em.plan.tracer == "export"
    assert [g.name for g in em.plan.groups] == ["fc1:out"]
    assert max_diff(em(x), ref) < 1e-6
    with torch.no_grad(), em.subnet("tiny"):
        assert max_diff(em.extract("tiny")(x), em(x)) < 1e-6


def test_export_fallback_couples_batchnorm_with_its_convolution():
    torch.manual_seed(0)
    m = toys.LoopOverBatchCNN().eval()
    for bn in (m.bn1, m.bn2):  # non-trivial statistics, so a wrong slice would show
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    x = m.example_inputs()[0]
    ref = m(x)
    em = elasticize.elasticize(m)
    assert em.plan.tracer == "export"
    assert [g.name for g in em.plan.groups] == ["conv1:out", "conv2:out"]
    assert em.plan.tensors["bn2.running_var"].axes == {0: Axis("conv2:out", 1)}
    assert max_diff(em(x), ref) < 1e-5
    with torch.no_grad(), em.subnet("tiny"):
        dense = em.extract("tiny")
        assert dense.bn2.running_var.shape == (8,) and dense.conv2.out_channels == 8
        assert max_diff(dense(x), em(x)) < 1e-5


def test_hard_coded_reshape_size_is_fixed():
    em_error = None
    try:
        elasticize.elasticize(toys.HardCodedReshape())
    except ValueError as e:
        em_error = str(e)
    assert em_error is not None and "hard-coded size 32" in em_error


def test_nothing_elastic_is_a_clear_error():
    with pytest.raises(ValueError, match="nothing in NothingElastic could be made elastic.*model output"):
        elasticize.elasticize(toys.NothingElastic())


def test_parameters_keep_identity_names_and_isinstance():
    m = toys.ToyCNN()
    before = {n: p for n, p in m.named_parameters()}
    em = elasticize.elasticize(m)
    after = dict(em.model.named_parameters())
    assert list(before) == list(after)
    assert all(before[n] is after[n] for n in before)
    assert isinstance(em.model.stage[0].conv1, torch.nn.Conv2d)
    assert type(em.model.stage[0].conv1).__name__ == "ElasticConv2d"


def test_switching_touches_no_tensor():
    em = elasticize.elasticize(toys.ToyCNN())
    ptrs = {n: (p.data_ptr(), p.shape) for n, p in em.model.named_parameters()}
    em.set_subnet("tiny")
    assert {n: (p.data_ptr(), p.shape) for n, p in em.model.named_parameters()} == ptrs
    w = em.model.stage[0].conv1.weight  # a view of the same storage, smaller
    assert w.data_ptr() == em.model.stage[0].conv1._parameters["weight"].data_ptr()
    assert w.shape[0] < em.model.stage[0].conv1._parameters["weight"].shape[0]
    with em.subnet("full"):
        assert em.model.stage[0].conv1.weight.shape == em.model.stage[0].conv1._parameters["weight"].shape
    assert em.active == em.resolve("tiny")


def test_stochastic_depth_keeps_the_residual_width_elastic():
    """torchvision's ``stochastic_depth`` (an fx-wrapped function in ConvNeXt, EfficientNet, Swin)
    scales whole samples; before it was known, it fixed every stage's residual width."""
    torch.manual_seed(0)
    em = elasticize.convert("torchvision:convnext_tiny", pretrained=False)
    layer_scales = [f"features.{i}.0.layer_scale" for i in (1, 3, 5, 7)]
    groups = [em.plan.tensors[t].axes[0].group for t in layer_scales]
    assert [em.plan.group(g).size for g in groups] == [96, 192, 384, 768]
    smallest = min(em.presets, key=em.macs)
    x = torch.randn(2, 3, 64, 64)
    em.train()  # stochastic depth active (p up to 0.1): it must follow the narrower stream
    with em.subnet(smallest):
        em(x).sum().backward()
        active = em.model.features[1][0].layer_scale.shape[0]  # a sliced view while the sub-network is set
    assert active < 96 and em.model.features[1][0].layer_scale.grad[active:].abs().sum() == 0
    em.eval()
    with torch.no_grad(), em.subnet(smallest):
        assert max_diff(em.extract(smallest)(x), em(x)) < 1e-5


def test_concatenated_copies_of_one_axis_are_sliced_alike():
    """Patch merging in user code: neighbouring tokens' channels side by side, ``cat`` of copies of
    one index space; the next layer's input columns are that many chunks of the stream's group."""

    class Merge(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.norm, self.reduce = torch.nn.Linear(6, 16), torch.nn.LayerNorm(32), torch.nn.Linear(32, 3)

        def forward(self, x):  # (batch, tokens, 6)
            h = self.embed(x)
            return self.reduce(self.norm(torch.cat([h[:, 0::2], h[:, 1::2]], dim=-1))).mean(1)

    torch.manual_seed(0)
    m, x = Merge().eval(), torch.randn(2, 8, 6)
    em = elasticize.elasticize(m, x)
    assert em.plan.tensors["reduce.weight"].axes[1] == Axis("embed:out", 2)
    assert em.plan.tensors["norm.weight"].axes[0] == Axis("embed:out", 2)
    for p in em.presets:
        sub = em.extract(p)
        assert sub.reduce.in_features == 2 * sub.embed.out_features
        with torch.no_grad(), em.subnet(p):
            assert max_diff(sub(x), em(x)) < 1e-6, p


def test_a_stage_that_is_a_segment_of_its_list_extracts_and_counts():
    """Dropped blocks are deleted from their list (they take two arguments), and the stage is
    ``blocks[1:4]``: the blocks after a removed one move up, whichever stage they belong to. The
    token-mixing ``Linear`` runs over the elastic channels as its batch axis: its MACs follow them."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    m = toys.SegmentStage().eval()
    x = m.example_inputs()[0]
    em = elasticize.elasticize(m)
    (stage,) = em.plan.stages
    assert stage.name == "blocks[1:3]" and stage.drop == "remove"
    for cfg in [*em.presets, {"depth": {stage.name: 1}, "width": 0.5}]:
        sub = em.extract(cfg)
        with torch.no_grad(), em.subnet(cfg):
            assert max_diff(sub(x), em(x)) < 1e-6, cfg
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            sub(x[:1])
        assert em.macs(cfg) == fc.get_total_flops() / 2, cfg
