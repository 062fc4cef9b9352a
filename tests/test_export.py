"""One extraction path (elasticize.export): ``load_subnet`` and ``ElasticModel.extract`` give the same
dense module, non-tensor state included, and the forward's sliced views read exactly the ranges
that extraction, the manifest's tables and ``load_subnet`` read."""

from __future__ import annotations

import pytest
import torch

import elasticize

from rnn_models import TokenTagger
from toy_models import TorchEncoder, ToyCNN


def _plain_attributes(module: torch.nn.Module) -> dict[str, object]:
    """Every plain (non-tensor) attribute of every submodule: sizes, counts, flags, names."""
    out: dict[str, object] = {}
    plain = (bool, int, float, str, type(None))
    for name, m in module.named_modules():
        out[f"{name}:class"] = type(m).__name__
        for k, v in vars(m).items():
            if k.startswith("_") or k == "training":
                continue
            if isinstance(v, plain) or (isinstance(v, (tuple, list)) and all(isinstance(x, plain) for x in v)):
                out[f"{name}.{k}"] = v
    return out


def _timm_resnet18():
    timm = pytest.importorskip("timm")
    return timm.create_model("resnet18", pretrained=False, num_classes=10).eval()


def _hf_bert():
    T = pytest.importorskip("transformers")
    cfg = T.BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
                       vocab_size=100, max_position_embeddings=64)
    return T.BertModel(cfg).eval()


@pytest.mark.parametrize("family", ["timm_resnet18", "hf_bert"])
def test_load_subnet_and_extract_agree_on_non_tensor_state(family, tmp_path):
    """A model converted from an object has no recipe, so only its adapter, found from the model,
    knows its non-tensor state: timm's ``num_features`` must follow the head's input width, a
    Hugging Face ``config`` the sub-network's sizes, in the extracted module and in the one
    ``load_subnet`` reads from the file alike."""
    build = {"timm_resnet18": _timm_resnet18, "hf_bert": _hf_bert}[family]
    torch.manual_seed(0)
    model = build()
    x = torch.randn(1, 3, 64, 64) if family == "timm_resnet18" else torch.randint(2, 100, (2, 9))
    em = elasticize.elasticize(model, x)
    assert em.recipe == {}
    path = tmp_path / "m.safetensors"
    elasticize.save(em, path)
    for preset in em.presets:
        extracted = em.extract(preset).eval()
        loaded = elasticize.load_subnet(path, preset, model=build())
        assert _plain_attributes(loaded) == _plain_attributes(extracted), preset
        if family == "timm_resnet18":
            assert loaded.num_features == extracted.num_features == extracted.fc.in_features, preset
        else:
            assert loaded.config.to_dict() == extracted.config.to_dict(), preset
            assert extracted.config.hidden_size == extracted.embeddings.word_embeddings.embedding_dim, preset
        with torch.no_grad():
            a, b = extracted(x), loaded(x)
        a = a if isinstance(a, torch.Tensor) else a.last_hidden_state
        b = b if isinstance(b, torch.Tensor) else b.last_hidden_state
        assert torch.equal(a, b), preset
    small = em.extract(list(em.presets)[-1])
    if family == "timm_resnet18":
        assert small.num_features == small.fc.in_features < 512
    else:
        assert small.config.num_attention_heads < 4 or small.config.intermediate_size < 48


@pytest.mark.parametrize("make", [ToyCNN, TorchEncoder, lambda: TokenTagger(kind="lstm")],
                         ids=["cnn", "fused_qkv", "lstm_gates"])
def test_the_forward_reads_exactly_the_ranges_extraction_reads(make):
    """For every elastic tensor at every preset, the view the forward reads (modules.prefix_view)
    holds exactly the entries of plan.tensor_ranges, the ranges extraction, the manifest's
    tables and load_subnet read, chunked axes (fused q/k/v rows, LSTM gates) included."""
    from elasticize.modules import prefix_view
    from elasticize.plan import slice_ranges, tensor_ranges

    torch.manual_seed(0)
    model = make().eval()
    em = elasticize.elasticize(model, sort=None)
    specs = {f"{name}.{t}" if name else t: spec for name, m in em.model.named_modules()
             for t, spec in m.__dict__.get("_el_tensors", {}).items() if spec}
    assert any(c > 1 for spec in specs.values() for _, _, c, _ in spec) or make is ToyCNN
    for preset in em.presets:
        em.set_subnet(preset)
        for fqn, spec in specs.items():
            shape = em.plan.tensors[fqn].shape
            index = torch.arange(torch.Size(shape).numel()).reshape(shape)
            view = prefix_view(index, spec)
            assert torch.equal(view, slice_ranges(index, tensor_ranges(em.plan, em._state, fqn))), (preset, fqn)
