"""The TAC dynamic-width block (:class:`elasticize.tac.TACLinear`): its parallel modules are a dimension.

Axis 0 of ``weight`` ``(W, O, I)`` and ``bias`` ``(W, O)`` is a coupling group of kind
``"modules"`` (the ``"modules"`` dimension of the search space; Subnetwork-to-go's width,
arXiv 2312.03464); ``num_modules`` follows it, so an extracted sub-network is a
``TACLinear`` of ``w`` modules. The output features are a width dimension as for a
``Linear`` (the TAC transform reads them), the input features couple to the input.

MACs per position: ``w * I * O`` (modules) + ``w * O * T`` (TAC transform) +
``w * 2T`` (TAC scalars) + ``w * O`` (weighted sum), with ``T`` the TAC hidden size.
"""

from __future__ import annotations

import math
from typing import Any

from ..graph import SiteContext
from ..tac import TACLinear
from . import Rule, register_rule

__all__ = ["TACRule"]


@register_rule("tac")
class TACRule(Rule):
    """:class:`elasticize.tac.TACLinear`: number of parallel modules and output features are elastic."""

    module_types = (TACLinear,)

    def analyze(self, ctx: SiteContext, x: Any, *rest: Any) -> Any:
        m = ctx.module
        if not isinstance(x, tuple):
            return None
        w = ctx.tensor("weight")
        mods, out = w[0], w[1]
        ctx.couple(x[-1], w[2])
        if m.bias is not None:
            b = ctx.tensor("bias")
            ctx.couple(mods, b[0])
            ctx.couple(out, b[1])
        ctx.producer(out)
        ctx.producer(mods, kind="modules")
        t = ctx.tensor("transform.weight")
        ctx.couple(out, t[1])
        ctx.attr("num_modules", mods)
        ctx.attr("out_features", out)
        ctx.attr("in_features", x[-1])
        ctx.attr("in_features", out, module="transform")
        shape = ctx.in_shape(0)
        positions = math.prod(shape[:-1]) if shape else 1
        size = ctx.size
        tac = m.transform.out_features
        ctx.macs(positions * size(mods) * size(x[-1]) * size(out), [mods, x[-1], out])
        if m.reweight == "tac":
            ctx.macs(positions * size(mods) * size(out) * tac, [mods, out])
            ctx.macs(positions * size(mods) * 2 * tac, [mods])
            ctx.macs(positions * size(mods) * size(out), [mods, out])
        return x[:-1] + (out,)
