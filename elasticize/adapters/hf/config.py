"""A dense transformers sub-network's ``config`` and layer indices, brought in line with its tensors."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .roles import in_out, is_conv1d, is_experts, role_of

__all__ = ["sync_config"]

#: config keys that hold the FFN width, first found wins (``hidden_dim`` only for DistilBERT)
FFN_CONFIG = ("intermediate_size", "n_inner", "hidden_dim", "ffn_dim")


def _uniform(values: list[int]) -> int | None:
    return values[0] if values and all(v == values[0] for v in values) else None


def _layer_stack(dense: nn.Module) -> nn.ModuleList | None:
    """The shallowest ``nn.ModuleList`` of layers of one class (``...Layer``, ``...Block``), or None."""
    found = None
    for name, m in dense.named_modules():
        if isinstance(m, nn.ModuleList) and m and all(type(x) is type(m[0]) for x in m) and \
                type(m[0]).__name__.endswith(("Layer", "Block", "DecoderLayer", "EncoderLayer")):
            if found is None or name.count(".") < found[0].count("."):
                found = (name, m)
    return None if found is None else found[1]


def _renumber(layers: nn.ModuleList, cfg: Any, full_layers: int) -> None:
    """Number the kept layers' ``layer_idx`` 0, 1, ... and keep their entries of ``config.layer_types``."""
    lt = getattr(cfg, "layer_types", None)
    kept_idx = []
    for j, layer in enumerate(layers):
        old = None
        for m in layer.modules():
            if isinstance(m.__dict__.get("layer_idx"), int):
                old = m.layer_idx if old is None else old
                m.layer_idx = j
        kept_idx.append(old if old is not None else j)
    if isinstance(lt, list) and len(lt) == full_layers:
        cfg.layer_types = [lt[i] for i in kept_idx]


def _layer_sizes(layers: nn.ModuleList, hd: int, rep: int
                 ) -> tuple[list[int], list[int], list[int], list[int], list[dict[str, int | None]]]:
    """Per layer, from its tensors: query heads, key/value heads, FFN (or experts') width, shared
    experts' width; and each layer's ``{"heads", "intermediate"}``."""
    heads: list[int] = []
    kv: list[int] = []
    inter: list[int] = []
    shared: list[int] = []
    per_layer: list[dict[str, int | None]] = []
    for layer in layers:
        roles = {}
        for name, m in layer.named_modules():
            if is_experts(m):
                roles.setdefault("experts", m)
            elif isinstance(m, nn.Linear) or is_conv1d(m):
                role = role_of(name)
                if role is not None:
                    roles.setdefault(role, m)
        if "q" in roles:
            heads.append(in_out(roles["q"])[1] // hd)
            kv.append(in_out(roles["k"])[1] // hd)
        elif "qkv" in roles:  # rows: q, then k and v with one head per `rep` query heads (Phi-3's GQA)
            heads.append(in_out(roles["qkv"])[1] * rep // (hd * (rep + 2)))
            kv.append(heads[-1] // rep)
        if "experts" in roles:
            inter.append(roles["experts"].down_proj.shape[2])
            if "down" in roles:
                shared.append(in_out(roles["down"])[0])
        elif "down" in roles:
            inter.append(in_out(roles["down"])[0])
        per_layer.append({"heads": heads[-1] if heads else None, "intermediate": inter[-1] if inter else None})
    return heads, kv, inter, shared, per_layer


def sync_config(dense: nn.Module) -> None:
    """Make a dense sub-network's ``config`` and layer indices describe it.

    Sets ``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``, ``head_dim`` (when the
    config has it), the FFN size (``intermediate_size`` / ``n_inner`` / ``hidden_dim``) and
    ``hidden_size`` from the actual tensors, slices per-layer lists (``layer_types``), and renumbers
    ``layer_idx`` so that the KV cache has one slot per kept layer. Non-uniform values (layers of
    different sizes) are recorded in ``config.elasticize_layers`` and left out of the standard fields.

    Raises:
        ValueError: GPT-2 with ``scale_attn_by_inverse_layer_idx`` after layers were dropped (the
            scaling depends on the layer index, so the renumbered model would compute otherwise).
    """
    cfg = dense.config
    full_layers = int(cfg.num_hidden_layers)
    layers = _layer_stack(dense)
    if layers is None:
        return
    n = len(layers)
    if n != full_layers and getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
        raise ValueError("this GPT-2 config scales attention by the inverse layer index, so a model with dropped "
                         "layers cannot be renumbered; convert without the depth dimension")
    _renumber(layers, cfg, full_layers)
    cfg.num_hidden_layers = n
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rep = cfg.num_attention_heads // (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    heads, kv, inter, shared, per_layer = _layer_sizes(layers, hd, rep)
    emb = dense.get_input_embeddings() if hasattr(dense, "get_input_embeddings") else None
    hidden = emb.embedding_dim if isinstance(emb, nn.Embedding) else None
    nh, nkv, ni = _uniform(heads), _uniform(kv), _uniform(inter)
    if hidden is not None and hidden != cfg.hidden_size:
        cfg.hidden_size = hidden
    if nh is not None:
        if "head_dim" in cfg.to_dict():
            cfg.head_dim = hd
        cfg.num_attention_heads = nh
    if nkv is not None and hasattr(cfg, "num_key_value_heads"):
        cfg.num_key_value_heads = nkv
    keys = FFN_CONFIG
    if any(l is not None and any(is_experts(m) for m in l.modules()) for l in layers):  # experts' own keys
        keys = ("moe_intermediate_size", "intermediate_size")
        ns = _uniform(shared)
        if ns is not None and "shared_expert_intermediate_size" in cfg.to_dict():
            cfg.shared_expert_intermediate_size = ns
    if ni is not None:
        for a in keys:
            if a in cfg.to_dict() and (a != "hidden_dim" or cfg.model_type == "distilbert"):
                setattr(cfg, a, ni)
                break
    if nh is None or ni is None:
        cfg.elasticize_layers = per_layer
    if hasattr(dense, "tie_weights") and getattr(cfg, "tie_word_embeddings", False):
        out = dense.get_output_embeddings() if hasattr(dense, "get_output_embeddings") else None
        if out is not None and emb is not None and out.weight.shape == emb.weight.shape and \
                torch.equal(out.weight, emb.weight):
            out.weight = emb.weight
