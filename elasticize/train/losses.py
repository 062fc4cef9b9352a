"""Output functions and the losses of the sorted trainer.

Batches (a tensor, ``(x, y)`` or a mapping of keyword inputs) are handled by
:mod:`elasticize.batches`; its names (``split_batch``, ``forward_batch``, ``to_device``,
``batch_size``, ``default_output``, ``TARGET_KEYS``) are re-exported here for the trainer.

A model's output is reduced to one tensor by an *output function* ``(output, batch) ->
tensor``: :func:`~elasticize.batches.default_output` takes the tensor itself, or ``logits``, or
``last_hidden_state`` of a Hugging Face ``ModelOutput``; :func:`mean_pooled` gives the
sentence embedding of a text encoder (mask-weighted mean over tokens, as sentence-transformers'
pooling layer does); :func:`masked_hidden` keeps every token, for :func:`hidden_distillation`.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..batches import TARGET_KEYS, OutputFn, batch_size, default_output, forward_batch, split_batch, to_device

__all__ = ["split_batch", "forward_batch", "default_output", "mean_pooled", "masked_hidden", "kl_distillation",
           "cosine_distillation", "mse_distillation", "hidden_distillation", "DISTILL_LOSSES", "TARGET_KEYS",
           "batch_size", "to_device", "OutputFn"]


def mean_pooled(output: Any, batch: Any) -> torch.Tensor:
    """Sentence embedding ``(batch, hidden)``: mean of ``last_hidden_state`` over the tokens the attention mask keeps."""
    hidden = default_output(output)
    _, kwargs, _ = split_batch(batch)
    mask = kwargs.get("attention_mask")
    if mask is None:
        return hidden.mean(1)
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def masked_hidden(output: Any, batch: Any) -> torch.Tensor:
    """Token states ``(batch, tokens, hidden)``: ``last_hidden_state`` with padded positions set to 0.

    Their sum over tokens is the :func:`mean_pooled` sentence embedding times the token count,
    so a cosine of token sums is the cosine of sentence embeddings (the ``"cosine"`` metric pools
    a 3-D output this way).
    """
    hidden = default_output(output)
    _, kwargs, _ = split_batch(batch)
    mask = kwargs.get("attention_mask")
    return hidden if mask is None else hidden * mask.unsqueeze(-1).to(hidden.dtype)


def kl_distillation(student: torch.Tensor, teacher: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """``T^2 · KL(softmax(teacher/T) ‖ softmax(student/T))`` over the last axis, mean over samples.

    Knowledge distillation (Hinton et al., 2015); the in-place distillation of Universally
    Slimmable Networks (Yu & Huang, 2019) and the skip-aware self-distillation of Adaptive Depth
    Networks (arXiv 2312.16392) use it with the largest sub-network as teacher.

    Args:
        student: logits ``(..., classes)``.
        teacher: logits of the same shape (detached by the caller).
    """
    t = temperature
    s = F.log_softmax(student.float() / t, dim=-1).flatten(0, -2)
    p = F.log_softmax(teacher.float() / t, dim=-1).flatten(0, -2)
    return F.kl_div(s, p, reduction="batchmean", log_target=True) * (t * t)


def cosine_distillation(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``mean(1 - cos(student, teacher))`` over the last axis: for embeddings ``(batch, hidden)``."""
    return (1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()


def mse_distillation(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error between student and teacher outputs (any shape)."""
    return F.mse_loss(student.float(), teacher.float())


def hidden_distillation(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Sentence-embedding cosine loss plus token-level relative MSE, for :func:`masked_hidden` outputs.

    ``mean(1 - cos(Σ_t s_t, Σ_t t_t)) + ‖s - t‖² / ‖t‖²`` with ``s, t`` of shape
    ``(batch, tokens, hidden)`` (padded tokens zero in both). The first term is the
    sentence-embedding objective; the second matches every token's final hidden state, as the
    hidden-state losses of TinyBERT (Jiao et al., 2020) and the layer distillation of CoFi
    pruning (Xia et al., ACL 2022) do (here on the last layer only, relative to the teacher's
    energy): it gives ``tokens x hidden`` targets per sentence instead of ``hidden``.

    Raises:
        ValueError: outputs that are not 3-D ``(batch, tokens, hidden)``.
    """
    if student.dim() != 3:
        raise ValueError(f"hidden distillation takes (batch, tokens, hidden) outputs (output_fn=masked_hidden), "
                         f"got shape {tuple(student.shape)}")
    s, t = student.float(), teacher.float()
    cos = 1.0 - F.cosine_similarity(s.sum(1), t.sum(1), dim=-1)
    return cos.mean() + (s - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-12)


#: Distillation losses by name, ``(student, teacher) -> scalar``.
DISTILL_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "kl": kl_distillation,
    "cosine": cosine_distillation,
    "mse": mse_distillation,
    "hidden": hidden_distillation,
}
