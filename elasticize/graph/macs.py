"""MAC terms: how the analysis counts multiply-accumulates.

An op or a rule records one :class:`MacTerm` per contraction it runs, for the whole example
batch at the full size, with the slots whose active fraction scales it
(:meth:`elasticize.graph.propagator.Propagator.add_macs`); a module kept whole is measured
once with ``FlopCounterMode`` (:func:`measure_macs`); once the groups are known, the slots
become group names and the MACs are per sample (:func:`per_sample`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

__all__ = ["MacTerm", "measure_macs", "per_sample"]


@dataclass
class MacTerm:
    """Multiply-accumulates of one op per sample at the full size.

    The op's MACs at a sub-network are ``macs * prod(active/size)`` over ``factors``
    (slots, resolved to group names by the plan), or 0 when ``owner``'s block is skipped.
    """

    owner: str
    macs: int
    factors: list[Any]


def measure_macs(run: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``run()`` once under ``FlopCounterMode`` and return its output and its MACs (FLOPs / 2).

    Gradients are enabled and the math attention kernel is used, so that PyTorch's fused
    inference paths (``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``) decompose into
    the matmuls the counter sees. The MACs are for the whole batch ``run`` computes.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        out = run()
    return out, fc.get_total_flops() // 2


def per_sample(terms: Sequence[MacTerm], resolve: Callable[[int], tuple[int, int]], name_of: dict[int, str],
               batch: int, layout: Callable[[int], Any] = lambda s: None) -> None:
    """Turn each term's factor slots into the names of the elastic groups they belong to (slots of a
    group that is not elastic drop out) and its MACs into MACs per sample of the example batch, in place.

    A segmented slot (a concatenation of groups) becomes its ``layout``: the list of its segments'
    entries, whose active fraction is the sum of the segments' active channels over the full size.
    """
    for t in terms:
        out: list[Any] = []
        for s in t.factors:
            seg = layout(s)
            if seg is not None:
                out.append(seg)
            elif resolve(s)[0] in name_of:
                out.append(name_of[resolve(s)[0]])
        t.factors = out
        t.macs = t.macs // max(batch, 1)
