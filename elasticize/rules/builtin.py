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


@register_rule("instancenorm")
class InstanceNormRule(Rule):
    """InstanceNorm (1d/2d/3d) over axis 1, affine or not (its forward branches on the input's rank, so it is a
    leaf): the affine tensors and running statistics join the channels, and ``num_features`` follows."""

    module_types = (nn.modules.instancenorm._InstanceNorm,)

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
        ctx.unit(x[1], per_group)
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
    """``nn.MultiheadAttention``: whole heads, tied to ``embed_dim``.

    A plain ``nn.MultiheadAttention`` has ``head_dim * num_heads == embed_dim`` for its queries,
    keys and values and for its input and output, so the only sub-network it can be extracted
    into has fewer channels on its input and output too. The attention's inner index space
    (``in_proj_weight`` rows, three chunks q, k, v; ``out_proj`` columns) and the stream it reads
    and writes (``in_proj_weight`` columns, ``out_proj`` rows, the query, key and value inputs'
    last axis, ``bias_k`` / ``bias_v``) are joined into one group that moves in whole heads
    (unit ``head_dim``): at ``E'`` active channels the module has ``E' / head_dim`` heads, and
    ``embed_dim``, ``kdim``, ``vdim``, ``num_heads`` and ``out_proj``'s features follow. Each
    index space is permuted alike by the importance order (whole heads on both sides), which
    leaves the function unchanged. In a transformer the stream is the residual width, so heads
    and hidden width shrink together (SortedNet, arXiv 2309.00255, Section 3: nested heads and
    hidden width).

    Kept whole, with the reason, when its key and value come by keyword or it has separate
    ``kdim`` / ``vdim`` projections; its MACs are counted either way (:meth:`count_macs`).
    """

    module_types = (nn.MultiheadAttention,)

    def analyze(self, ctx: SiteContext, *inputs: Any) -> Any:
        m = ctx.module
        q, k, v = (list(inputs) + [None] * 3)[:3]
        reason = None
        if not m._qkv_same_embed_dim:
            reason = "nn.MultiheadAttention with kdim or vdim other than embed_dim (separate projections)"
        elif not all(isinstance(t, tuple) for t in (q, k, v)):
            reason = "nn.MultiheadAttention called with its key or value by keyword; pass query, key, value by position"
        if reason is not None:
            for t in (*inputs, *ctx.node.kwargs.values()):
                ctx.fix(ctx.value(t) if hasattr(t, "op") else t, reason)
            ctx.macs(self.count_macs(ctx), [])
            return ctx.fresh(reason)
        ctx.chunked("in_proj_weight", 0, 3)
        if m.in_proj_bias is not None:
            ctx.chunked("in_proj_bias", 0, 3)
        w = ctx.tensor("in_proj_weight")
        e = w[0]
        for slot in (w[1], q[-1], k[-1], v[-1]):
            ctx.couple(e, slot)
        ow = ctx.tensor("out_proj.weight")
        ctx.couple(e, ow[0])
        ctx.couple(e, ow[1])
        for name in ("in_proj_bias", "out_proj.bias", "bias_k", "bias_v"):
            t = ctx.tensor(name)
            if t is not None:
                ctx.couple(e, t[-1])
        ctx.unit(e, m.head_dim)
        for attr in ("embed_dim", "kdim", "vdim"):
            ctx.attr(attr, e)
        ctx.attr("num_heads", e, div=m.head_dim)
        ctx.attr("in_features", e, module="out_proj")
        ctx.attr("out_features", e, module="out_proj")
        n, l_q, l_k = self._lengths(ctx)
        size = ctx.size(e)
        ctx.macs(n * (2 * l_q + 2 * l_k) * size * size, [e, e])  # q, k, v and output projections
        ctx.macs(2 * n * l_q * l_k * size, [e])  # q @ k^T and attention @ v over all heads
        return [q[:-1] + (e,), ctx.fresh(item=1)]  # the attention weights, if returned

    @staticmethod
    def _lengths(ctx: SiteContext) -> tuple[int, int, int]:
        """Batch, query length and key length of the call (``batch_first`` or not, or unbatched)."""
        m, node = ctx.module, ctx.node
        query = ctx.in_shape(0)
        key_node = node.args[1] if len(node.args) > 1 else node.kwargs.get("key", node.args[0])
        key = ctx.shape_of(key_node) or query
        n_axis, t_axis = (0, 1) if m.batch_first else (1, 0)
        if len(query) == 2:  # unbatched (L, E)
            return 1, query[0], key[0]
        return query[n_axis], query[t_axis], key[t_axis]

    @classmethod
    def count_macs(cls, ctx: SiteContext) -> int:
        """MACs of one call at full size (whole example batch; dropped with a skipped block).

        With query ``(L, N, E)`` and key/value ``(S, N, kdim)`` / ``(S, N, vdim)`` (batch first:
        ``(N, L, E)``...): projections ``N L E^2`` (q) + ``N S E (kdim + vdim)`` (k, v) +
        ``N L E^2`` (output), and ``2 N L S E`` for the two attention matmuls over all heads.
        """
        m = ctx.module
        n, l_q, l_k = cls._lengths(ctx)
        e = m.embed_dim
        return n * (2 * l_q * e * e + l_k * e * (m.kdim + m.vdim) + 2 * l_q * l_k * e)


def _loaded_class(module_name: str, class_name: str) -> type | None:
    """A class of an optional library (timm, torchvision) if that module is already imported, else None."""
    mod = sys.modules.get(module_name)
    return getattr(mod, class_name, None) if mod else None


def _qkv_heads(ctx: SiteContext, x: tuple, head_dim: int, *, seq: tuple[int, int] | None = None,
               stream: bool = False) -> tuple[int, int]:
    """The heads of a timm / torchvision attention module, MACs included.

    The q, k, v projections are one fused ``qkv`` (rows in three chunks, q, k, v, that keep the
    same first heads) or separate ``q_proj`` / ``k_proj`` / ``v_proj``; ``proj`` keeps the matching
    input columns; the layers' feature attributes follow. MACs: the q/k/v and output
    projections, plus ``2 * sequences * length^2 * heads * head_dim`` for the two attention
    matmuls (``q @ k^T`` and ``attention @ v``).

    Args:
        ctx: the attention module's site.
        x: slots of its input, channels last.
        head_dim: channels per head (the unit of the heads).
        seq: ``(sequences, length)`` the attention runs over; default ``(batch, tokens)`` of an
            input ``(batch, tokens, channels)``. Window attention gives ``(batch * windows, window area)``.
        stream: the module ties its heads' total width to its input width (``C // num_heads`` as
            the head size, or ``reshape(B, N, C)`` of the attention output), so heads, input and
            output channels are one group, in units of ``head_dim`` (as in
            :class:`MultiheadAttentionRule`); otherwise the heads are their own group.

    Returns:
        ``(heads, out)``: the heads slot (in channels, unit ``head_dim``) and the output's feature slot.
    """
    m = ctx.module
    if getattr(m, "qkv", None) is not None:
        ctx.chunked("qkv.weight", 0, 3)
        if m.qkv.bias is not None:
            ctx.chunked("qkv.bias", 0, 3)
        names, mul = ("qkv",), 3
    else:
        names, mul = ("q_proj", "k_proj", "v_proj"), 1
    heads = None
    for name in names:
        w = ctx.tensor(f"{name}.weight")
        heads = w[0] if heads is None else ctx.couple(heads, w[0])
        ctx.couple(x[-1], w[1])
        if getattr(m, name).bias is not None:
            ctx.couple(heads, ctx.tensor(f"{name}.bias")[0])
        ctx.attr("out_features", heads, mul=mul, module=name)
        ctx.attr("in_features", x[-1], module=name)
    proj_w = ctx.tensor("proj.weight")
    ctx.couple(heads, proj_w[1])
    if m.proj.bias is not None:
        ctx.couple(proj_w[0], ctx.tensor("proj.bias")[0])
    if stream:
        ctx.unit(ctx.couple(ctx.couple(heads, x[-1]), proj_w[0]), head_dim)
    else:
        ctx.producer(heads, unit=head_dim, kind="heads")
        ctx.producer(proj_w[0])
    ctx.attr("in_features", heads, module="proj")
    ctx.attr("out_features", proj_w[0], module="proj")
    if seq is None:
        shape = ctx.in_shape(0)
        seq = (shape[0], shape[1])
    n_seq, length = seq
    size = ctx.size
    ctx.macs(n_seq * length * 3 * size(heads) * size(x[-1]), [heads, x[-1]])
    ctx.macs(n_seq * length * size(heads) * size(proj_w[0]), [heads, proj_w[0]])
    ctx.macs(2 * n_seq * length * length * size(heads), [heads])
    return heads, proj_w[0]


def _qkv_biases(ctx: SiteContext, heads: int) -> None:
    """timm's separate biases of a fused ``qkv`` (BEiT, EVA): ``q_bias``, ``k_bias`` (a
    non-persistent buffer of zeros, sliced all the same) and ``v_bias`` keep one entry per head channel."""
    for name in ("q_bias", "k_bias", "v_bias"):
        t = ctx.tensor(name)
        if t is not None:
            ctx.couple(heads, t[0])


def _timm_attention(ctx: SiteContext, x: tuple, *, stream: bool) -> int:
    """A timm ``Attention`` / ``EvaAttention``: :func:`_qkv_heads`, then the optional ``gate``
    (rows per head channel), the scale norm over the heads' width and the fused q/k/v biases
    (``q_bias``, ``k_bias``, ``v_bias``); ``num_heads`` follows. Returns the output's feature slot."""
    m = ctx.module
    heads, out = _qkv_heads(ctx, x, m.head_dim, stream=stream)
    _qkv_biases(ctx, heads)
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
        return type(module) is _loaded_class("timm.layers.attention", "Attention")

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
        return type(module) is _loaded_class("timm.models.swin_transformer", "WindowAttention")

    def analyze(self, ctx: SiteContext, x: Any, *rest: Any) -> Any:
        m = ctx.module
        if not isinstance(x, tuple):
            return None
        head_dim = m.qkv.out_features // 3 // m.num_heads
        heads, out = _qkv_heads(ctx, x, head_dim)
        ctx.per_unit("relative_position_bias_table", 1, heads, head_dim)
        ctx.attr("num_heads", heads, div=head_dim)
        return x[:-1] + (out,)


@register_rule("torchvision_window_attention")
class TorchvisionWindowAttentionRule(Rule):
    """torchvision Swin ``ShiftedWindowAttention`` and ``ShiftedWindowAttentionV2``: whole heads, tied to the stream.

    torchvision's ``shifted_window_attention`` takes the head size as ``C // num_heads`` of its
    input ``(batch, H, W, C)``, so, as in ``nn.MultiheadAttention``, the heads (``qkv`` rows in three
    chunks, ``proj`` columns) and the stream the block reads and writes (``qkv`` columns, ``proj``
    rows) are one group in whole heads: at ``C'`` active channels the module has ``C' / head_dim``
    heads and ``num_heads`` follows. Per head: V1's relative position bias table column; V2's
    ``logit_scale`` row and the continuous position bias MLP's output row (``cpb_mlp.2``).
    MACs: the projections and the attention matmuls over the padded windows, plus V2's position
    bias MLP (Swin, Liu et al., ICCV 2021, Eq. 4; Swin V2, Liu et al., CVPR 2022, Eq. 2;
    SortedNet, arXiv 2309.00255, Section 3: nested heads and hidden width).
    """

    def _classes(self) -> tuple[type, ...]:
        mod = "torchvision.models.swin_transformer"
        return tuple(c for c in (_loaded_class(mod, "ShiftedWindowAttention"),
                                 _loaded_class(mod, "ShiftedWindowAttentionV2")) if c is not None)

    def matches(self, module: nn.Module) -> bool:
        return type(module) in self._classes()

    def analyze(self, ctx: SiteContext, x: Any, *rest: Any) -> Any:
        m = ctx.module
        if not isinstance(x, tuple) or len(x) != 4:
            return None
        head_dim = m.qkv.in_features // m.num_heads
        batch, h, w, _ = ctx.in_shape(0)
        wh, ww = m.window_size
        windows = -(-h // wh) * -(-w // ww)  # the function pads H and W to multiples of the window
        _qkv_heads(ctx, x, head_dim, seq=(batch * windows, wh * ww), stream=True)
        positions = (2 * wh - 1) * (2 * ww - 1)
        if hasattr(m, "cpb_mlp"):  # V2
            ctx.per_unit("logit_scale", 0, x[-1], head_dim)
            ctx.per_unit("cpb_mlp.2.weight", 0, x[-1], head_dim)
            ctx.attr("out_features", x[-1], div=head_dim, module="cpb_mlp.2")
            hidden = m.cpb_mlp[0].out_features
            ctx.macs(positions * m.cpb_mlp[0].in_features * hidden, [])
            ctx.macs(positions * hidden * m.num_heads, [x[-1]])
        else:
            ctx.per_unit("relative_position_bias_table", 1, x[-1], head_dim)
        ctx.attr("num_heads", x[-1], div=head_dim)
        return x


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
        return type(module) is _loaded_class("timm.models.beit", "Attention")

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
        heads, _ = _qkv_heads(ctx, x, head_dim, stream=reason is None)  # MACs counted either way
        if reason is not None:
            return ctx.refuse(reason, x, (heads,))
        _qkv_biases(ctx, heads)
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
        return type(module) is _loaded_class("timm.models.eva", "EvaAttention")

    def analyze(self, ctx: SiteContext, x: Any, *rest: Any) -> Any:
        m = ctx.module
        if not isinstance(x, tuple):
            return None
        if m.head_dim * m.num_heads != ctx.size(x[-1]):
            heads, _ = _qkv_heads(ctx, x, m.head_dim)  # MACs counted
            return ctx.refuse("EVA attention whose heads' total width (attn_head_dim) is not its input width",
                              x, (heads,))
        return x[:-1] + (_timm_attention(ctx, x, stream=True),)
