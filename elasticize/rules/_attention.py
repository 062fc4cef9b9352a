"""What the attention rules of timm and torchvision share: their classes, looked up only where the
library is imported already, and the heads of their q/k/v and output projections."""

from __future__ import annotations

import sys

from ..graph import SiteContext

__all__ = ["loaded_class", "qkv_heads", "qkv_biases"]


def loaded_class(module_name: str, class_name: str) -> type | None:
    """A class of an optional library (timm, torchvision) if that module is already imported, else None."""
    mod = sys.modules.get(module_name)
    return getattr(mod, class_name, None) if mod else None


def qkv_heads(ctx: SiteContext, x: tuple, head_dim: int, *, seq: tuple[int, int] | None = None,
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
            :class:`elasticize.rules.torch.MultiheadAttentionRule`); otherwise the heads are their own group.

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


def qkv_biases(ctx: SiteContext, heads: int) -> None:
    """timm's separate biases of a fused ``qkv`` (BEiT, EVA): ``q_bias``, ``k_bias`` (a
    non-persistent buffer of zeros, sliced all the same) and ``v_bias`` keep one entry per head channel."""
    for name in ("q_bias", "k_bias", "v_bias"):
        t = ctx.tensor(name)
        if t is not None:
            ctx.couple(heads, t[0])
