"""A user-defined rule in one file: a custom layer made elastic without touching elasticize.

``ScaledLinear`` multiplies a linear layer's output by a learned per-feature scale. The
rule tells the analysis that ``scale`` is sliced with the layer's output features; the
elastic behaviour (sliced views of ``linear.weight``, ``linear.bias`` and ``scale``) is
generic; the rule uses only the public methods of the rule context
(:class:`elasticize.graph.SiteContext`). Import this module before ``elasticize.load`` of a
checkpoint that used it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from elasticize.graph import SiteContext
from elasticize.rules import Rule, register_rule


class ScaledLinear(nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)
        self.scale = nn.Parameter(torch.rand(d_out) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.scale


@register_rule("scaled_linear")
class ScaledLinearRule(Rule):
    module_types = (ScaledLinear,)

    def analyze(self, ctx: SiteContext, x: Any) -> Any:
        y = ctx.linear(x, weight="linear.weight", bias="linear.bias")  # couples x[-1] with the weight's columns
        ctx.couple(y[-1], ctx.tensor("scale")[0])  # the scale follows the output features
        ctx.attr("out_features", y[-1], module="linear")
        ctx.attr("in_features", x[-1], module="linear")
        return y


class TinyMLP(nn.Module):
    """An MLP built from the custom layer (import path ``examples.user_rule:TinyMLP``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = ScaledLinear(16, 64)
        self.fc2 = ScaledLinear(64, 64)
        self.head = nn.Linear(64, 3)

    def example_inputs(self):
        return (torch.randn(4, 16),)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))
