"""Rules of timm's attention modules: ``Attention``, Swin's ``WindowAttention``, BEiT's ``Attention`` and
EVA's ``EvaAttention`` (each matched by its exact class, looked up only where timm is imported already)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..graph import SiteContext
from . import Rule, register_rule
from ._attention import loaded_class, qkv_biases, qkv_heads


def _timm_attention(ctx: SiteContext, x: tuple, *, stream: bool) -> int:
    """A timm ``Attention`` / ``EvaAttention``: :func:`~elasticize.rules._attention.qkv_heads`, then the optional ``gate``
    (rows per head channel), the scale norm over the heads' width and the fused q/k/v biases
    (``q_bias``, ``k_bias``, ``v_bias``); ``num_heads`` follows. Returns the output's feature slot."""
    m = ctx.module
    heads, out = qkv_heads(ctx, x, m.head_dim, stream=stream)
    qkv_biases(ctx, heads)
    if getattr(m, "gate", None) is not None:
        gw = ctx.tensor("gate.weight")
        ctx.couple(heads, gw[0])
        ctx.couple(x[-1], gw[1])
        if m.gate.bias is not None:
            ctx.couple(heads, ctx.tensor("gate.bias")[0])
        ctx.attr("out_features", heads, module="gate")
        ctx.attr("in_features", x[-1], module="gate")
        shape = ctx.in_shape(0)
        ctx.macs(shape[0] * shape[1] * ctx.size(heads) * ctx.size(x[-1]), [heads, x[-1]])
    if isinstance(m.norm, nn.LayerNorm):
        for n in ("norm.weight", "norm.bias"):
            t = ctx.tensor(n)
            if t is not None:
                ctx.couple(heads, t[0])
        ctx.attr("normalized_shape", heads, kind="shape", module="norm")
    elif not isinstance(m.norm, nn.Identity):
        ctx.fix((heads,), f"attention scale norm {type(m.norm).__name__}")
    ctx.attr("num_heads", heads, div=m.head_dim)
    if isinstance(getattr(m, "attn_dim", None), int):
        ctx.attr("attn_dim", heads)
    return out


@register_rule("timm_attention")
class TimmAttentionRule(Rule):
    """timm ``Attention`` (ViT, DeiT, EVA-style blocks): whole heads are elastic.

    The fused ``qkv`` rows are three chunks (q, k, v) that keep the same first heads;
    ``proj`` keeps the matching input columns; ``num_heads`` and ``attn_dim`` follow.
    MACs: q/k/v and output projections, plus ``2 * tokens^2 * heads * head_dim`` for the
    two attention matmuls (SortedNet, arXiv 2309.00255, Section 3: nested heads).
    """

    def matches(self, module: nn.Module) -> bool:
        return type(module) is loaded_class("timm.layers.attention", "Attention")

    def analyze(self, ctx: SiteContext, x: Any, *rest: Any) -> Any:
        if not isinstance(x, tuple):
            return None
        return x[:-1] + (_timm_attention(ctx, x, stream=False),)


@register_rule("timm_window_attention")
class TimmWindowAttentionRule(Rule):
    """timm Swin ``WindowAttention``: whole heads are elastic, with their relative position bias.

    As :class:`TimmAttentionRule` for ``qkv`` and ``proj``; the relative position bias table
    ``((2 Wh - 1)(2 Ww - 1), num_heads)`` keeps one column per active head, and ``num_heads``
    follows (Swin, Liu et al., ICCV 2021, Eq. 4; SortedNet, arXiv 2309.00255, Section 3:
    nested heads). Input ``(windows * batch, Wh * Ww, channels)``.
    """

    def matches(self, module: nn.Module) -> bool:
        return type(module) is loaded_class("timm.models.swin_transformer", "WindowAttention")

    def analyze(self, ctx: SiteContext, x: Any, *rest: Any) -> Any:
        m = ctx.module
        if not isinstance(x, tuple):
            return None
        head_dim = m.qkv.out_features // 3 // m.num_heads
        heads, out = qkv_heads(ctx, x, head_dim)
        ctx.per_unit("relative_position_bias_table", 1, heads, head_dim)
        ctx.attr("num_heads", heads, div=head_dim)
        return x[:-1] + (out,)



@register_rule("timm_beit_attention")
class TimmBeitAttentionRule(Rule):
    """timm BEiT ``Attention``: whole heads, tied to the stream.

    BEiT's attention reshapes its output to its input width (``reshape(B, N, C)``), so, as in
    ``nn.MultiheadAttention``, its heads (``qkv`` rows in three chunks, ``proj`` columns, the
    ``q_bias`` / ``k_bias`` / ``v_bias`` entries; ``k_bias`` is a non-persistent buffer of zeros)
    and the residual stream are one group in whole heads; each head keeps its relative position
    bias column and ``num_heads`` follows (BEiT, Bao et al., ICLR 2022, Section 2.1; SortedNet,
    arXiv 2309.00255, Section 3: nested heads and hidden width). Kept whole, with the reason,
    when the blocks share one relative position bias or the heads' total width is not the input
    width (``attn_head_dim``). Input ``(batch, tokens, channels)``.
    """

    def matches(self, module: nn.Module) -> bool:
        return type(module) is loaded_class("timm.models.beit", "Attention")

    def analyze(self, ctx: SiteContext, x: Any, *rest: Any) -> Any:
        m = ctx.module
        if not isinstance(x, tuple):
            return None
        reason = None
        if any(isinstance(r, tuple) or hasattr(r, "op") for r in [*rest, *ctx.node.kwargs.values()]):
            reason = "BEiT attention with a relative position bias shared by all blocks"
        elif m.qkv.out_features != 3 * m.qkv.in_features:
            reason = "BEiT attention whose heads' total width (attn_head_dim) is not its input width"
        head_dim = m.qkv.out_features // 3 // m.num_heads
        heads, _ = qkv_heads(ctx, x, head_dim, stream=reason is None)  # MACs counted either way
        if reason is not None:
            return ctx.refuse(reason, x, (heads,))
        qkv_biases(ctx, heads)
        if m.relative_position_bias_table is not None:
            ctx.per_unit("relative_position_bias_table", 1, x[-1], head_dim)
        ctx.attr("num_heads", x[-1], div=head_dim)
        return x


@register_rule("timm_eva_attention")
class TimmEvaAttentionRule(Rule):
    """timm ``EvaAttention`` (EVA-02, and the ViTs built on it): whole heads, tied to the stream.

    It reshapes its attention output to its input width (``reshape(B, N, C)``), so, as for
    :class:`TimmBeitAttentionRule`, its heads and the residual stream are one group in whole
    heads: the fused ``qkv`` rows (three chunks) with ``q_bias`` / ``k_bias`` / ``v_bias``, or the
    separate ``q_proj`` / ``k_proj`` / ``v_proj`` rows, the optional ``gate`` rows and scale norm,
    and ``proj``'s columns; rotary embeddings act within a head and need nothing (EVA-02, Fang
    et al., 2023; SortedNet, arXiv 2309.00255, Section 3: nested heads and hidden width). Kept
    whole, with the reason, when the heads' total width is not the input width (``attn_head_dim``).
    """

    def matches(self, module: nn.Module) -> bool:
        return type(module) is loaded_class("timm.models.eva", "EvaAttention")

    def analyze(self, ctx: SiteContext, x: Any, *rest: Any) -> Any:
        m = ctx.module
        if not isinstance(x, tuple):
            return None
        if m.head_dim * m.num_heads != ctx.size(x[-1]):
            heads, _ = qkv_heads(ctx, x, m.head_dim)  # MACs counted
            return ctx.refuse("EVA attention whose heads' total width (attn_head_dim) is not its input width",
                              x, (heads,))
        return x[:-1] + (_timm_attention(ctx, x, stream=True),)
