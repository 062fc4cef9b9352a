"""What the analysis returns: coupling groups, stages and the :class:`Analysis` that holds them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .macs import MacTerm

__all__ = ["Analysis", "GroupInfo", "StageInfo", "MacTerm", "model_tensors"]


@dataclass
class GroupInfo:
    """A coupling group: every tensor axis that shares one channel (or head) index space.

    Attributes:
        name: stable name, ``<module path of the first producer>:out`` or ``:heads``.
        kind: ``"width"``, ``"heads"`` or ``"modules"`` (parallel modules of a TAC block).
        size: full size in channels.
        unit: granularity in channels (``head_dim`` for heads, channels per group for GroupNorm).
        members: ``(tensor fqn, axis, chunks)`` for every tensor axis in the group.
        ordered: why the group keeps its channels' order (an op mixes neighbouring channels, such as
            ``local_response_norm`` or ``cumsum`` along it), or None when importance may sort it.
    """

    name: str
    kind: str
    size: int
    unit: int
    members: list[tuple[str, int, int]]
    ordered: str | None = None


@dataclass
class StageInfo:
    """Consecutive residual blocks whose depth is elastic, or the stacked layers inside one module.

    Attributes:
        name: the container's path, with ``[i:j]`` when it holds several stages; for layers
            inside one module (an ``nn.LSTM``'s ``num_layers``), that module's path.
        blocks: module paths of the blocks, in order; for layers inside a module,
            ``<module>:l<k>`` (names, not modules).
        n_mandatory: leading blocks that are not residual (``y = x + f(x)``) and always run.
        module: for layers inside one module (see :meth:`elasticize.graph.SiteContext.layers`), its path; else None.
        attr: the module's attribute that follows the active depth (``"num_layers"``), or None.
        tensors: per block, the fqns of the module's tensors that belong to that layer.
        drop: how an extracted sub-network drops a block: ``"identity"`` (``nn.Identity`` in its
            place) or ``"remove"`` (deleted from its ``nn.ModuleList``; for blocks called with more
            than one input, such as ``nn.TransformerEncoderLayer(src, src_mask=...)``).
    """

    name: str
    blocks: list[str]
    n_mandatory: int
    module: str | None = None
    attr: str | None = None
    tensors: list[list[str]] = field(default_factory=list)
    drop: str = "identity"


@dataclass
class Analysis:
    """What the analysis found. Built by :func:`elasticize.graph.analyze`; turned into a plan by ``elasticize.plan``."""

    tracer: str
    groups: list[GroupInfo]
    tensors: dict[str, dict[str, Any]]
    attrs: dict[str, dict[str, tuple[str, str, int, int]]]
    sites: dict[str, str]
    stages: list[StageInfo]
    mac_terms: list[MacTerm]
    not_elastic: list[tuple[str, str]]
    batch: int


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of ``model`` by name: its ``state_dict(keep_vars=True)`` plus its non-persistent
    buffers (timm BEiT's ``k_bias``: outside the state dict and the file, but sliced like the rest)."""
    state = dict(model.state_dict(keep_vars=True))
    for name, b in model.named_buffers():
        state.setdefault(name, b)
    return state
