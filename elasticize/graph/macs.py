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
               batch: int) -> None:
    """Turn each term's factor slots into the names of the elastic groups they belong to (slots of a
    group that is not elastic drop out) and its MACs into MACs per sample of the example batch, in place."""
    for t in terms:
        t.factors = [name_of[r] for r in (resolve(s)[0] for s in t.factors) if r in name_of]
        t.macs = t.macs // max(batch, 1)
