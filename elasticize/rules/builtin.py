"""Built-in rules: convolutions, linear layers, norms, embeddings and attention heads."""

from __future__ import annotations

import sys
from typing import Any

from torch import nn

from ..graph import SiteContext
from . import Rule, register_rule


@register_rule("conv")
class ConvRule(Rule):
    """``nn.Conv1d/2d/3d`` and subclasses: output channels are a width dimension.

    Depthwise convolutions (``groups == in == out``) pass their input's channels through,
    so ``groups`` follows the width; other grouped convolutions are left fixed.
    """

    module_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

    def analyze(self, ctx: SiteContext, x: Any, *rest: Any) -> Any:
        return ctx.conv(x, ctx.module.groups)


@register_rule("linear")
class LinearRule(Rule):
    """``nn.Linear`` and subclasses: output features are a width dimension."""

    module_types = (nn.Linear,)

    def analyze(self, ctx: SiteContext, x: Any, *rest: Any) -> Any:
        y = ctx.linear(x)
        w = ctx.tensor("weight")
        if y is not None:
            ctx.attr("out_features", w[0])
            ctx.attr("in_features", w[1])
        return y


@register_rule("batchnorm")
class BatchNormRule(Rule):
    """BatchNorm (1d/2d/3d, and subclasses such as timm's ``BatchNormAct2d``) over axis 1."""

    module_types = (nn.modules.batchnorm._BatchNorm,)

    def analyze(self, ctx: SiteContext, x: Any, *rest: Any) -> Any:
        if not isinstance(x, tuple):
            return None
        ctx.norm(x, 1, ("weight", "bias", "running_mean", "running_var"))
        ctx.attr("num_features", x[1])
        return x


@register_rule("layernorm")
class LayerNormRule(Rule):
    """LayerNorm over one axis: the last, or axis 1 for a channels-first ``LayerNorm2d``."""

    module_types = (nn.LayerNorm,)

    def analyze(self, ctx: SiteContext, x: Any, *rest: Any) -> Any:
        m = ctx.module
        if not isinstance(x, tuple):
            return None
        if len(m.normalized_shape) != 1:
            ctx.fix(x, f"LayerNorm over {len(m.normalized_shape)} axes")
            return x
        shape = ctx.in_shape(0)
        channels_first = "2d" in type(m).__name__.lower() or (shape[-1] != m.normalized_shape[0] and len(shape) > 1
                                                               and shape[1] == m.normalized_shape[0])
        axis = 1 if channels_first else -1
        ctx.norm(x, axis, ("weight", "bias"))
        ctx.attr("normalized_shape", x[axis], kind="shape")
        return x


@register_rule("groupnorm")
class GroupNormRule(Rule):
    """GroupNorm over axis 1; width moves in whole groups (``unit = channels // num_groups``)."""

    module_types = (nn.GroupNorm,)

    def analyze(self, ctx: SiteContext, x: Any, *rest: Any) -> Any:
        m = ctx.module
        if not isinstance(x, tuple):
            return None
        per_group = m.num_channels // m.num_groups
        ctx.norm(x, 1, ("weight", "bias"))
        ctx.c.unit[ctx.c.find(x[1])] = max(ctx.c.unit.get(ctx.c.find(x[1]), 1), per_group)
        ctx.attr("num_channels", x[1])
        ctx.attr("num_groups", x[1], div=per_group)
        return x


@register_rule("embedding")
class EmbeddingRule(Rule):
    """``nn.Embedding``: the embedding dimension is a width dimension."""

    module_types = (nn.Embedding,)

    def analyze(self, ctx: SiteContext, idx: Any, *rest: Any) -> Any:
        w = ctx.tensor("weight")
        if not isinstance(idx, tuple):
            return None
        ctx.producer(w[1])
        ctx.attr("embedding_dim", w[1])
        return idx + (w[1],)


@register_rule("multihead_attention")
class MultiheadAttentionRule(Rule):
    """``nn.MultiheadAttention``: kept whole, and listed with the reason.

    Its fused kernel ties the heads' inner size to ``embed_dim``, so a sub-network with
    fewer heads has no plain ``nn.MultiheadAttention`` to be extracted into.
    """

    module_types = (nn.MultiheadAttention,)

    def analyze(self, ctx: SiteContext, *inputs: Any) -> Any:
        reason = ("nn.MultiheadAttention ties its heads to embed_dim, so fewer heads cannot be extracted into a "
                  "plain nn.MultiheadAttention; register a rule for your attention module to make its heads elastic")
        for v in inputs:
            ctx.fix(v, reason)
        ctx.macs(self.count_macs(ctx), [])
        out = ctx._p.fresh(ctx.node, reason)
        return out

    @staticmethod
    def count_macs(ctx: SiteContext) -> int:
        """MACs of one call (whole example batch; fixed, but dropped with a skipped block).

        With query ``(L, N, E)`` and key/value ``(S, N, kdim)`` / ``(S, N, vdim)`` (batch first:
        ``(N, L, E)``...): projections ``N L E^2`` (q) + ``N S E (kdim + vdim)`` (k, v) +
        ``N L E^2`` (output), and ``2 N L S E`` for the two attention matmuls over all heads.
        """
        m = ctx.module
        node = ctx.node
        query = ctx.in_shape(0)
        key_node = node.args[1] if len(node.args) > 1 else node.kwargs.get("key", node.args[0])
        key = ctx._p.shape(key_node) or query
        n_axis, t_axis = (0, 1) if m.batch_first else (1, 0)
        if len(query) == 2:  # unbatched (L, E)
            n, l_q, l_k = 1, query[0], key[0]
        else:
            n, l_q, l_k = query[n_axis], query[t_axis], key[t_axis]
        e = m.embed_dim
        return n * (2 * l_q * e * e + l_k * e * (m.kdim + m.vdim) + 2 * l_q * l_k * e)


class _TimmAttentionBase(Rule):
    def matches(self, module: nn.Module) -> bool:
        timm_attn = sys.modules.get("timm.layers.attention")
        cls = getattr(timm_attn, "Attention", None) if timm_attn else None
        return cls is not None and type(module) is cls


@register_rule("timm_attention")
class TimmAttentionRule(_TimmAttentionBase):
    """timm ``Attention`` (ViT, DeiT, EVA-style blocks): whole heads are elastic.

    The fused ``qkv`` rows are three chunks (q, k, v) that keep the same first heads;
    ``proj`` keeps the matching input columns; ``num_heads`` and ``attn_dim`` follow.
    MACs: q/k/v and output projections, plus ``2 * tokens^2 * heads * head_dim`` for the
    two attention matmuls (SortedNet, arXiv 2309.00255, Section 3: nested heads).
    """

    def analyze(self, ctx: SiteContext, x: Any, *rest: Any) -> Any:
        m = ctx.module
        if not isinstance(x, tuple):
            return None
        d = m.head_dim
        ctx.chunked("qkv.weight", 0, 3)
        if m.qkv.bias is not None:
            ctx.chunked("qkv.bias", 0, 3)
        qkv_w = ctx.tensor("qkv.weight")
        heads = qkv_w[0]
        ctx.producer(heads, unit=d, kind="heads")
        ctx.couple(x[-1], qkv_w[1])
        if m.qkv.bias is not None:
            ctx.couple(heads, ctx.tensor("qkv.bias")[0])
        proj_w = ctx.tensor("proj.weight")
        ctx.couple(heads, proj_w[1])
        if m.proj.bias is not None:
            ctx.couple(proj_w[0], ctx.tensor("proj.bias")[0])
        ctx.producer(proj_w[0])
        if getattr(m, "gate", None) is not None:
            gw = ctx.tensor("gate.weight")
            ctx.couple(heads, gw[0])
            ctx.couple(x[-1], gw[1])
            if m.gate.bias is not None:
                ctx.couple(heads, ctx.tensor("gate.bias")[0])
            ctx.attr("out_features", heads, module="gate")
        if isinstance(m.norm, nn.LayerNorm):
            for n in ("norm.weight", "norm.bias"):
                t = ctx.tensor(n)
                if t is not None:
                    ctx.couple(heads, t[0])
            ctx.attr("normalized_shape", heads, kind="shape", module="norm")
        elif not isinstance(m.norm, nn.Identity):
            ctx.fix((heads,), f"attention scale norm {type(m.norm).__name__}")
        ctx.attr("num_heads", heads, div=d)
        ctx.attr("attn_dim", heads)
        ctx.attr("out_features", heads, mul=3, module="qkv")
        ctx.attr("in_features", heads, module="proj")
        ctx.attr("in_features", x[-1], module="qkv")
        ctx.attr("out_features", proj_w[0], module="proj")
        shape = ctx.in_shape(0)
        tokens, n = shape[0] * shape[1], shape[1]
        size = ctx.c.size
        ctx.macs(tokens * 3 * size[heads] * size[x[-1]], [heads, x[-1]])
        ctx.macs(tokens * size[heads] * size[proj_w[0]], [heads, proj_w[0]])
        ctx.macs(2 * shape[0] * n * n * size[heads], [heads])
        if getattr(m, "gate", None) is not None:
            ctx.macs(tokens * size[heads] * size[x[-1]], [heads, x[-1]])
        return x[:-1] + (proj_w[0],)
