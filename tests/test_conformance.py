"""The elastic invariants on real architectures (random weights, no downloads).

For each model: the largest sub-network equals the original; every preset's extraction
equals the elastic model at that preset; save -> load gives identical outputs; load_subnet
equals extraction; the smallest CNN preset has <= 30% of the full MACs; MACs of extracted
sub-networks agree within 1% with FlopCounterMode (FLOPs / 2).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import elasticize
from conftest import counted, math_attention, max_diff, scratch_dir, tol

MODELS = [
    ("timm", "resnet18"),
    ("timm", "resnet50"),
    ("timm", "convnext_tiny"),
    ("timm", "efficientnet_b0"),
    ("timm", "mobilenetv3_large_100"),
    ("timm", "vit_small_patch16_224"),
    ("timm", "swin_tiny_patch4_window7_224"),
    ("torchvision", "resnet50"),
    ("torchvision", "mobilenet_v2"),
    ("torchvision", "swin_t"),
]
CNN = {"resnet18", "resnet50", "convnext_tiny", "efficientnet_b0", "mobilenetv3_large_100", "mobilenet_v2"}


@pytest.fixture(scope="module", params=MODELS, ids=lambda p: f"{p[0]}:{p[1]}")
def case(request, tmp_path_factory):
    family, name = request.param
    torch.manual_seed(0)
    em = elasticize.convert(f"{family}:{name}", pretrained=False)
    original = elasticize.adapters.build_from_recipe(em.recipe)  # same architecture, to copy the original weights
    x = torch.randn(2, 3, 224, 224)
    with scratch_dir(tmp_path_factory, name) as d:
        path = d / "m.safetensors"
        elasticize.save(em, path)
        yield name, em, x, path, original


def _outputs(em, x):
    out = {}
    with torch.no_grad():
        for p in em.presets:
            with em.subnet(p):
                out[p] = em(x)
    return out


@pytest.mark.slow
def test_largest_subnetwork_equals_original(case):
    torch.manual_seed(1)
    name, em, x, path, _ = case
    # conversion is checked on a fresh model against its own unconverted outputs
    fresh = elasticize.adapters.build_from_recipe(em.recipe)
    with torch.no_grad():
        ref = fresh(x)
    em2 = elasticize.elasticize(fresh, x[:1])
    assert any(p.data_ptr() == q.data_ptr() for p, q in zip(fresh.parameters(), em2.model.parameters()))
    with torch.no_grad():
        got = em2(x)
    assert max_diff(got, ref) <= tol(ref)


@pytest.mark.slow
def test_extraction_equals_elastic_at_every_preset(case):
    name, em, x, path, _ = case
    outs = _outputs(em, x)
    for p, y in outs.items():
        dense = em.extract(p).eval()
        assert not any(type(m).__name__.startswith("Elastic") for m in dense.modules())
        with torch.no_grad():
            assert max_diff(dense(x), y) <= 1e-5, p


@pytest.mark.slow
def test_save_load_identical(case):
    name, em, x, path, _ = case
    outs = _outputs(em, x)
    em2 = elasticize.load(path)
    for p, y in outs.items():
        with torch.no_grad(), em2.subnet(p):
            assert max_diff(em2(x), y) == 0.0, p


@pytest.mark.slow
def test_load_subnet_equals_extraction(case):
    name, em, x, path, _ = case
    for p in em.presets:
        with torch.no_grad():
            a = elasticize.load_subnet(path, p)(x)
            b = em.extract(p).eval()(x)
        assert max_diff(a, b) == 0.0, p


@pytest.mark.slow
def test_macs_match_flop_counter(case):
    name, em, x, path, _ = case
    for p in em.presets:
        dense = em.extract(p).eval()
        _, measured = counted(dense, x[:1])  # timm's matmul attention: the counter misses the CPU fused kernel
        assert abs(em.macs(p) - measured) <= 0.01 * measured, (p, em.macs(p), measured)
        assert em.params(p) == sum(t.numel() for t in dense.parameters()), p


@pytest.mark.slow
def test_presets_sorted_and_smallest_cnn_is_small(case):
    name, em, x, path, _ = case
    macs = [em.macs(p) for p in em.presets]
    assert macs == sorted(macs, reverse=True) and len(set(macs)) == len(macs)
    assert list(em.presets)[0] == "full" and em.macs("full") == macs[0]
    if name in CNN:
        assert macs[-1] <= 0.30 * macs[0]


def test_multihead_attention_macs_match_flop_counter():
    """torchvision's ViT: ``nn.MultiheadAttention``'s heads follow the residual width, and the patch
    embedding's reshape to ``self.hidden_dim`` (a literal once traced) follows it through that
    attribute. MACs at every preset against FlopCounterMode (math attention kernel, whose matmuls
    it counts), skipped blocks dropped; every extraction equals the elastic model."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128,
                              num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    em = elasticize.elasticize(model, x)
    g = em.plan.group("conv_proj:out")
    assert g.unit == 16 and em.plan.attrs[""]["hidden_dim"].group == "conv_proj:out"
    assert len({em.macs(p) for p in em.presets}) == len(em.presets) and em.plan.stages  # width and depth vary
    for p in em.presets:
        sub = em.extract(p).eval()
        with FlopCounterMode(display=False) as fc, sdpa_kernel(SDPBackend.MATH):
            y = sub(x)
        assert em.macs(p) == fc.get_total_flops() / 2, p
        width = em.resolve(p)["width"]["conv_proj:out"]
        assert sub.hidden_dim == width and sub.encoder.layers[0].self_attention.num_heads == width // 16
        with torch.no_grad(), em.subnet(p):
            assert max_diff(em(x), y) < 1e-5, p


def test_swin_heads_keep_their_relative_position_bias():
    """timm Swin's window attention: whole heads, and the bias table keeps one column per active head."""
    from timm.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    model = SwinTransformer(img_size=32, patch_size=4, window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4),
                            num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    em = elasticize.elasticize(model, x[:1])
    with torch.no_grad():
        assert max_diff(em(x), ref) <= tol(ref)  # the importance order moved each head's bias column with it
    table = "layers.1.blocks.0.attn.relative_position_bias_table"
    a = em.plan.tensors[table].axes[1]
    g, div = a.group, a.div
    assert (em.plan.group(g).kind, em.plan.group(g).unit, div) == ("heads", 16, 16)
    sub = em.extract({"heads": 0.5})
    attn = sub.layers[1].blocks[0].attn
    assert attn.num_heads == 2 and attn.qkv.out_features == 3 * 32
    assert torch.equal(attn.relative_position_bias_table, em.model.state_dict()[table][:, :2])
    with torch.no_grad(), em.subnet({"heads": 0.5}):
        assert max_diff(sub(x), em(x)) <= 1e-5


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_torchvision_swin_heads_move_with_the_stream(version):
    """torchvision Swin's attention takes its head size as ``C // num_heads``: heads and the stage's
    stream are one group in whole heads, with each head's position-bias entries (V1 table column;
    V2 logit scale and position-bias MLP row). Patch merging's four neighbours are sliced alike.
    Windows are padded here (10x10 tokens, window 4): MACs at every preset against FlopCounterMode."""
    from torchvision.models import swin_transformer as tv

    torch.manual_seed(0)
    extra = dict(block=tv.SwinTransformerBlockV2, downsample_layer=tv.PatchMergingV2) if version == "v2" else {}
    model = tv.SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                               stochastic_depth_prob=0.1, num_classes=5, **extra).eval()
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        ref = model(x)
    em = elasticize.elasticize(model, x[:1])
    with torch.no_grad():
        assert max_diff(em(x), ref) <= tol(ref)  # the importance order moved whole heads on both sides
    assert not em.plan.not_elastic[:-1], em.plan.not_elastic  # only the model output stays whole
    g = em.plan.group("features.2.reduction:out")  # the second stage's stream: 64 channels, 4 heads of 16
    assert (g.size, g.unit) == (64, 16)
    for p in em.presets:
        sub = em.extract(p).eval()
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            y = sub(x[:1])
        assert em.macs(p) == fc.get_total_flops() / 2, p
        with torch.no_grad(), em.subnet(p):
            assert max_diff(em(x[:1]), y) <= 1e-5, p
        attn = sub.features[3][0].attn
        width = em.resolve(p)["width"][g.name]
        assert attn.num_heads == width // 16 and attn.qkv.out_features == 3 * width
        if version == "v2":
            assert attn.cpb_mlp[2].out_features == attn.logit_scale.shape[0] == width // 16
        else:
            assert attn.relative_position_bias_table.shape[1] == width // 16
    smallest = min(em.presets, key=em.macs)
    em.train()  # stochastic depth on, at the narrowest stream
    with em.subnet(smallest):
        em(x).sum().backward()


def test_beit_heads_move_with_the_stream_and_its_non_persistent_k_bias_is_sliced(tmp_path):
    """timm BEiT reshapes its attention output to the input width, so its heads move with the
    residual stream; ``k_bias`` is a non-persistent buffer: sliced like the rest, absent from the
    file, and taken from the built model by ``load_subnet`` (here built on ``meta`` from the recipe)."""
    from elasticize.checkpoint import read_manifest

    torch.manual_seed(0)
    small = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 4, "num_classes": 5}
    em = elasticize.convert("timm:beit_base_patch16_224", pretrained=False, kwargs=small)
    fresh = elasticize.adapters.build_from_recipe(em.recipe).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = fresh(x)
        em2 = elasticize.elasticize(fresh, x[:1])
        assert max_diff(em2(x), ref) <= tol(ref)  # the importance order moved whole heads on both sides
    info = em.plan.tensors["blocks.0.attn.k_bias"]
    assert info.persistent is False and info.axes[0].group == "patch_embed.proj:out"
    assert em.plan.group("patch_embed.proj:out").unit == 16
    em.model.blocks[0].attn.k_bias.normal_()  # not zeros, so a wrong slice would show
    path = elasticize.save(em, tmp_path / "beit.safetensors")
    tables = read_manifest(path)["presets"]
    assert all("blocks.0.attn.k_bias" not in t["tensors"] for t in tables.values())
    em.eval()
    for p in em.presets:
        sub = em.extract(p).eval()
        y, macs = counted(sub, x[:1])
        assert em.macs(p) == macs, p
        width = em.resolve(p)["width"]["patch_embed.proj:out"]
        attn = sub.blocks[0].attn
        assert attn.num_heads == width // 16 and attn.relative_position_bias_table.shape[1] == width // 16
        assert torch.equal(attn.k_bias, em.model.blocks[0].attn.k_bias[:width])
        with torch.no_grad(), em.subnet(p):
            assert max_diff(em(x[:1]), y) <= 1e-5, p
        loaded = elasticize.load_subnet(path, p)
        assert torch.equal(loaded.blocks[0].attn.k_bias, torch.zeros(width))  # the model's own zeros, cut
        math_attention(loaded)
        with torch.no_grad():
            sub.blocks[0].attn.k_bias.zero_()
            assert max_diff(loaded(x[:1]), sub(x[:1])) == 0.0, p


def test_beit_shared_relative_position_bias_keeps_heads_whole_with_the_reason():
    from timm.models.beit import Beit

    torch.manual_seed(0)
    model = Beit(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=5,
                 use_rel_pos_bias=False, use_shared_rel_pos_bias=True).eval()
    x = torch.randn(1, 3, 32, 32)
    em = elasticize.elasticize(model, x)
    reasons = dict(em.plan.not_elastic)
    assert reasons["blocks.0.attn"] == "BEiT attention with a relative position bias shared by all blocks"
    assert {g.name for g in em.plan.groups} == {"blocks.0.mlp.fc1:out", "blocks.1.mlp.fc1:out"}
    for p in em.presets:
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            em.extract(p).eval()(x)
        assert em.macs(p) == fc.get_total_flops() / 2, p  # the whole attention still counted


@pytest.mark.parametrize("fused", [True, False], ids=["qkv", "q_k_v_proj"])
def test_eva_heads_move_with_the_stream(fused):
    """timm EVA attention (rotary embeddings, SwiGLU MLP, inner scale norm) reshapes its output to
    the input width: heads move with the stream, whether q, k, v are one fused projection with
    separate biases (``k_bias`` non-persistent) or three projections."""
    from timm.models.eva import Eva

    torch.manual_seed(0)
    model = Eva(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=5, qkv_fused=fused,
                qkv_bias=True, swiglu_mlp=True, use_rot_pos_emb=True, ref_feat_shape=(4, 4),
                scale_attn_inner=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        em = elasticize.elasticize(model, x[:1])
        assert max_diff(em(x), ref) <= tol(ref)
    assert [n.to_json() for n in em.plan.not_elastic] == [["head:out", "model output"]]
    stream = em.plan.group("patch_embed.proj:out")
    assert stream.unit == 16 and em.plan.tensors["blocks.1.attn.norm.weight"].axes[0].group == stream.name
    for p in em.presets:
        sub = em.extract(p).eval()
        y, macs = counted(sub, x[:1])
        assert em.macs(p) == macs, p
        assert sub.blocks[0].attn.num_heads == em.resolve(p)["width"][stream.name] // 16
        with torch.no_grad(), em.subnet(p):
            assert max_diff(em(x[:1]), y) <= 1e-5, p


def test_float32_reordering_noise_is_not_taken_for_a_changed_function():
    """Importance sorting reorders float32 sums: through randomly initialised EfficientNetV2 at
    224x224 that alone moves the logits (up to ~800) by more than 1e-4 of their size, which the
    first check flags; the float64 confirmation sees the same function and keeps every order."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("efficientnetv2_rw_t", pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = model(x)
        em = elasticize.elasticize(model, x)
        rel = max_diff(em(x), ref) / ref.abs().max().item()
    assert 1e-4 < rel < 1e-2  # the float32 check alone would have put the widths back
    assert not [w for w, r in em.plan.not_elastic if r.startswith("kept in the original order")]
    assert all(g.sort for g in em.plan.groups)
    assert next(em.model.parameters()).dtype == torch.float32
