"""Rules of torchvision's attention modules: Swin's ``ShiftedWindowAttention`` and ``ShiftedWindowAttentionV2``
(matched by their exact classes, looked up only where torchvision is imported already)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..graph import SiteContext
from . import Rule, register_rule
from ._attention import loaded_class, qkv_heads


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
        return tuple(c for c in (loaded_class(mod, "ShiftedWindowAttention"),
                                 loaded_class(mod, "ShiftedWindowAttentionV2")) if c is not None)

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
        qkv_heads(ctx, x, head_dim, seq=(batch * windows, wh * ww), stream=True)
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
