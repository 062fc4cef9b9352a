"""elasticize.integrations.peft: LoRA on an elastic BERT at every sub-network, and merging."""

from __future__ import annotations

import copy

import pytest
import torch

import elasticize

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from elasticize.integrations.peft import add_lora, merge_lora  # noqa: E402


def _bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                    intermediate_size=96, vocab_size=100,
                                                    max_position_embeddings=32)).eval()


def test_lora_follows_coupling_groups_at_every_preset_and_merges():
    ids = torch.randint(0, 100, (3, 10), generator=torch.Generator().manual_seed(1))
    em = elasticize.elasticize(_bert(), example_inputs=(ids,)).eval()
    plain = copy.deepcopy(em)
    # random A and B (B is zero at PEFT's default init, which would hide a wrong slicing)
    lora = add_lora(em, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "dense"],
                                        init_lora_weights=False))
    # the reference: the elastic model without LoRA, each adapted weight plus its LoRA delta (alpha/r) B A
    adapted = 0
    with torch.no_grad():
        for name, mod in em.model.named_modules():
            if isinstance(mod, peft.tuners.lora.LoraLayer):
                a = mod.lora_A["default"]._parameters["weight"]
                b = mod.lora_B["default"]._parameters["weight"]
                plain.model.get_submodule(name)._parameters["weight"].add_(mod.scaling["default"] * b @ a)
                adapted += 1
    assert adapted == 2 * 5 + 1  # per layer: query, value, the attention, intermediate and output dense; pooler
    unmerged = {}
    with torch.no_grad():
        for p in em.presets:
            with em.subnet(p), plain.subnet(p):
                unmerged[p] = em(ids).logits
                assert (unmerged[p] - plain(ids).logits).abs().max() <= 1e-5, p
    merge_lora(em, lora)
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in em.modules())
    with torch.no_grad():
        for p in em.presets:
            with em.subnet(p):
                assert (em(ids).logits - unmerged[p]).abs().max() <= 1e-5, p


def test_lora_trains_a_sub_network_and_elasticize_refuses_a_peft_model():
    ids = torch.randint(0, 100, (3, 10), generator=torch.Generator().manual_seed(1))
    em = elasticize.elasticize(_bert(), example_inputs=(ids,))
    add_lora(em, peft.LoraConfig(r=2, target_modules=["query"]))
    trainable = [p for n, p in em.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in em.named_parameters() if p.requires_grad)
    with em.subnet("small"):
        em(ids).logits.sum().backward()  # crashed with a size mismatch before LoRA followed the groups
    grads = {n: p.grad for n, p in em.named_parameters() if p.requires_grad}
    assert all(g is not None for n, g in grads.items() if ".layer.0." in n)  # "small" skips layer 1
    with pytest.raises(TypeError, match="merge_and_unload"):
        elasticize.elasticize(peft.get_peft_model(_bert(), peft.LoraConfig(r=2, target_modules=["query"])),
                              example_inputs=(ids,))
