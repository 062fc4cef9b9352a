"""Rules of torch.nn layers: convolutions, linear layers, norms, embeddings and ``nn.MultiheadAttention``."""

from __future__ import annotations

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
