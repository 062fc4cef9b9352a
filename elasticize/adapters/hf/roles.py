"""Finding a transformers layer's parts by name: the layer stack, the projections' roles
(``q_proj``/``query``/``c_attn``...), norms, mixture-of-experts blocks, and the module attributes
that hold their sizes."""

from __future__ import annotations

import re

from torch import nn

__all__ = ["role_of", "QK_NORM_RE", "INTERLEAVED_QKV", "HEADS_ATTRS", "HEAD_CHANNEL_ATTRS", "KV_ATTRS", "FFN_ATTRS",
           "HIDDEN_ATTRS", "is_conv1d", "is_norm", "is_experts", "is_router", "proj_axes", "in_out", "find_layers"]

# Role of a projection inside one layer, from its path relative to the layer (first match wins).
_ROLES: tuple[tuple[str, str], ...] = (
    ("qkv", r"(c_attn|qkv_proj|query_key_value|Wqkv|qkv)"),
    ("q", r"(query|q_proj|q_lin|query_proj)"),
    ("k", r"(key|k_proj|k_lin|key_proj)"),
    ("v", r"(value|v_proj|v_lin|value_proj)"),
    ("o", r"(o_proj|out_lin|attention\.output\.dense|attn\.c_proj|self_attn\.out_proj|attention\.out_proj|attn\.proj"
          r"|attn\.out_proj|self_attn\.dense|attention\.dense|self_attention\.dense|attn\.Wo)"),
    ("reads_hidden", r"shared_expert_gate"),
    ("gate_up", r"(gate_up_proj|mlp\.Wi)"),
    ("gate", r"(gate_proj|w1)"),
    ("up", r"(up_proj|intermediate\.dense|mlp\.c_fc|ffn\.lin1|fc1|fc_in|dense_h_to_4h|w3)"),
    ("down", r"(down_proj|output\.dense|mlp\.c_proj|ffn\.lin2|fc2|fc_out|dense_4h_to_h|w2|mlp\.Wo)"),
)
_ROLE_RE = [(role, re.compile(rf"(^|.*\.){pat}$")) for role, pat in _ROLES]


def role_of(name: str) -> str | None:
    """The role of the projection at ``name`` (its path inside a layer): ``"qkv"``, ``"q"``, ``"k"``,
    ``"v"``, ``"o"``, ``"reads_hidden"``, ``"gate_up"``, ``"gate"``, ``"up"`` or ``"down"``; None if unknown."""
    return next((r for r, rx in _ROLE_RE if rx.match(name)), None)


#: norms inside the attention over queries or keys (Qwen3, Gemma 3, OLMo 2, Phi): per head, or over all heads
QK_NORM_RE = re.compile(r"(^|.*\.)(q|k|query|key)_(norm|layernorm|ln)$")
#: families whose fused q/k/v projection interleaves the heads (``(heads, 3, head_dim)`` rows, or
#: CodeGen's model-parallel blocks), not three blocks q | k | v: their heads stay fixed
INTERLEAVED_QKV = ("gpt_neox", "bloom", "falcon", "persimmon", "codegen", "gpt_neox_japanese")
#: module attributes that hold a size (set to the active size where they hold the full one): in heads,
#: in query-head channels, in key/value heads, in FFN channels, in hidden channels
HEADS_ATTRS = ("num_attention_heads", "num_heads", "n_heads", "n_head")
HEAD_CHANNEL_ATTRS = ("all_head_size", "split_size", "inner_dim", "attn_dim")
KV_ATTRS = ("num_key_value_heads", "num_kv_heads")
FFN_ATTRS = ("intermediate_size", "ffn_dim")
HIDDEN_ATTRS = ("hidden_size", "embed_dim", "dim", "d_model")


def is_conv1d(m: nn.Module) -> bool:
    """Whether ``m`` is GPT-2's ``Conv1D`` (a linear layer whose weight is ``(in, out)``)."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and hasattr(m, "nx")


def is_norm(m: nn.Module) -> bool:
    """Whether ``m`` is a LayerNorm or an RMSNorm (by class name: each family defines its own)."""
    return isinstance(m, nn.LayerNorm) or type(m).__name__.endswith(("RMSNorm", "LayerNorm"))


def is_experts(m: nn.Module) -> bool:
    """A mixture-of-experts FFN stored as 3-D tensors (Mixtral, Qwen3-MoE, OLMoE in transformers 5):
    ``gate_up_proj (experts, 2 * intermediate, hidden)`` and ``down_proj (experts, hidden, intermediate)``."""
    gu, down = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
    return (isinstance(gu, nn.Parameter) and isinstance(down, nn.Parameter) and gu.dim() == 3 and down.dim() == 3
            and gu.shape[0] == down.shape[0] and gu.shape[1] == 2 * down.shape[2] and gu.shape[2] == down.shape[1])


def is_router(m: nn.Module, hidden: int) -> bool:
    """A mixture-of-experts router that is not an ``nn.Linear``: one ``weight (experts, hidden)``."""
    w = getattr(m, "weight", None)
    return (not isinstance(m, nn.Linear) and isinstance(w, nn.Parameter) and w.dim() == 2 and w.shape[1] == hidden
            and type(m).__name__.endswith(("Router", "Gate")))


def proj_axes(m: nn.Module) -> tuple[int, int]:
    """(output axis, input axis) of a projection's weight: Linear is (out, in), GPT-2 Conv1D (in, out)."""
    return (1, 0) if is_conv1d(m) else (0, 1)


def in_out(m: nn.Module) -> tuple[int, int]:
    """(in, out) features of a Linear or Conv1D."""
    return (m.nx, m.nf) if is_conv1d(m) else (m.in_features, m.out_features)


def find_layers(model: nn.Module, n_layers: int) -> tuple[str, nn.ModuleList] | None:
    """``(path, module)`` of the shallowest ``nn.ModuleList`` of ``n_layers`` modules (the layer stack), or None."""
    best = None
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) == n_layers and n_layers > 0:
            if best is None or name.count(".") < best[0].count("."):
                best = (name, m)
    return best
