"""Dense extraction: any sub-network as a plain module of ordinary layers.

The dense module has the original classes (``nn.Conv2d``, timm ``Attention``...), smaller
tensors, consistent attributes (``out_channels``, ``num_heads``...), and ``nn.Identity``
in place of skipped blocks. Its tensors come from a *tensor source*: the live elastic
model (:meth:`ElasticModel.extract`) or a safetensors file read slice by slice
(:func:`elasticize.load_subnet`), through the same per-tensor ranges the manifest lists.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from .modules import SWITCH_PREFIX
from .plan import ElasticState, Plan, remove_elastic, stage_ranks, tensor_ranges
from .space import Config, SearchSpace

__all__ = ["dense_tensors", "densify", "set_tensor"]

Ranges = list[list[tuple[int, int]]]


def dense_tensors(plan: Plan, space: SearchSpace, state: ElasticState, cfg: Config) -> dict[str, tuple[str, Ranges | None]]:
    """For every tensor of the dense sub-network: the source tensor and its ranges.

    ``state`` must already be set to ``cfg``.

    Returns:
        dense tensor name -> (source tensor name in the super-network, per-axis ``[start, stop)``
        ranges, or None for the whole tensor).
    """
    out: dict[str, tuple[str, Ranges | None]] = {}
    removed = _removed_blocks(plan, cfg)
    for fqn in plan.tensors:
        module, _, name = fqn.rpartition(".")
        if name.startswith(SWITCH_PREFIX) or not space.kept_tensor(fqn, cfg):
            continue
        src = fqn
        sw = plan.switchable.get(module)
        if sw is not None and name in sw["tensors"] and state.stages[sw["stage"]].skip:
            src = f"{module}.{SWITCH_PREFIX}{name}" if module else SWITCH_PREFIX + name
        out[_rename(fqn, removed)] = (src, tensor_ranges(plan, state, fqn))
    return out


def _removed_blocks(plan: Plan, cfg: Config) -> dict[str, list[int]]:
    """Parent ``nn.ModuleList`` path -> indices of the blocks that ``cfg`` deletes from it (``drop: "remove"``)."""
    out: dict[str, list[int]] = {}
    for st in plan.stages:
        if st.get("drop") != "remove" or st.get("module") is not None:
            continue
        depth = cfg["depth"].get(st["name"], len(st["blocks"]))
        for b, r in zip(st["blocks"], stage_ranks(st)):
            if r >= depth:
                parent, _, idx = b.rpartition(".")
                out.setdefault(parent, []).append(int(idx))
    return out


def _rename(fqn: str, removed: dict[str, list[int]]) -> str:
    """``fqn`` in the dense model, where each list lost its ``removed`` blocks and the rest moved up.

    A stage may be a segment of its list (timm Twins: ``blocks.2[1:9]``, its block 0 followed by
    a position encoding) or be followed by other blocks, so every later index moves, not only
    the stage's own blocks.
    """
    if not removed:
        return fqn
    parts = fqn.split(".")
    out = list(parts)
    for k in range(1, len(parts)):
        gone = removed.get(".".join(parts[:k]))
        if gone and parts[k].isdigit():
            i = int(parts[k])
            out[k] = str(i - sum(g < i for g in gone))
    return ".".join(out)


def set_tensor(root: nn.Module, fqn: str, value: torch.Tensor) -> None:
    """Replace parameter or buffer ``fqn`` of ``root`` with ``value`` (a parameter stays a parameter)."""
    module, _, name = fqn.rpartition(".")
    m = root.get_submodule(module)
    old = m._parameters.get(name)
    if name in m._parameters:
        m._parameters[name] = nn.Parameter(value, requires_grad=old.requires_grad if old is not None else True)
    elif name in m._buffers:
        m._buffers[name] = value
    else:
        raise KeyError(f"{type(m).__name__} at {module!r} has no tensor {name!r}")


def densify(model: nn.Module, plan: Plan, space: SearchSpace, cfg: Config) -> None:
    """Turn an elastic model, set to ``cfg``, into the dense structure in place.

    Attributes keep their active values, classes return to the originals, skipped blocks
    become ``nn.Identity``, switchable-norm tensors are dropped, a module with a layer stage
    (an ``nn.LSTM``) loses its dropped layers' tensors. Tensors are not sliced
    here: :func:`set_tensor` each one afterwards.
    """
    remove_elastic(model, freeze=True)
    for st in plan.stages:
        depth = cfg["depth"].get(st["name"], len(st["blocks"]))
        if st.get("module") is not None:
            _drop_layers(model, plan, st, depth)
            continue
        dropped = [b for b, r in zip(st["blocks"], stage_ranks(st)) if r >= depth]
        if st.get("drop") == "remove":
            _remove_blocks(model, dropped)
            continue
        for b in dropped:
            parent, _, name = b.rpartition(".")
            setattr(model.get_submodule(parent), name, nn.Identity())
    for module in plan.switchable:
        try:
            m = model.get_submodule(module)
        except AttributeError:
            continue
        for d in (m._parameters, m._buffers):
            for k in [k for k in d if k.startswith(SWITCH_PREFIX)]:
                del d[k]


def _drop_layers(model: nn.Module, plan: Plan, stage: dict, depth: int) -> None:
    """Delete the tensors of the layers a layer stage drops from its module, then let its rule fix the rest."""
    from .rules import get_rule

    try:
        m = model.get_submodule(stage["module"])
    except AttributeError:  # the module sits in a dropped block
        return
    prefix = f"{stage['module']}." if stage["module"] else ""
    for names, r in zip(stage["tensors"], stage_ranks(stage)):
        if r >= depth:
            for fqn in names:
                name = fqn[len(prefix):]
                m._parameters.pop(name, None)
                m._buffers.pop(name, None)
    get_rule(plan.sites[stage["module"]]).densify(m)


def _remove_blocks(model: nn.Module, blocks: list[str]) -> None:
    """Delete ``blocks`` (items of ``nn.ModuleList``s, by path) from their lists, keeping the order of the rest."""
    by_parent: dict[str, set[str]] = {}
    for b in blocks:
        parent, _, idx = b.rpartition(".")
        by_parent.setdefault(parent, set()).add(idx)
    for parent, gone in by_parent.items():
        lst = model.get_submodule(parent)
        if not isinstance(lst, nn.ModuleList):
            raise TypeError(f"{parent!r} is a {type(lst).__name__}, not an nn.ModuleList; its blocks cannot be removed")
        kept = [m for i, m in enumerate(lst) if str(i) not in gone]
        grand, _, name = parent.rpartition(".")
        owner = model.get_submodule(grand)
        setattr(owner, name, nn.ModuleList(kept))
        if name == "layers" and getattr(owner, "num_layers", None) == len(lst):  # nn.TransformerEncoder/Decoder
            owner.num_layers = len(kept)


def structural_copy(model: nn.Module) -> tuple[nn.Module, set[int]]:
    """A deep copy of ``model`` that shares its tensors (to be replaced), and the shared tensors' ids."""
    tensors = [*model.parameters(), *model.buffers()]
    memo = {id(t): t for t in tensors}
    return copy.deepcopy(model, memo), {id(t) for t in tensors}


def extract_from(model: nn.Module, plan: Plan, space: SearchSpace, state: ElasticState, cfg: Config,
                 source: Callable[[str, Ranges | None], torch.Tensor]) -> nn.Module:
    """The dense module of ``cfg`` (``state`` set to it), with tensors from ``source(name, ranges)``."""
    spec = dense_tensors(plan, space, state, cfg)
    dense, shared = structural_copy(model)
    densify(dense, plan, space, cfg)
    for fqn, (src, ranges) in spec.items():
        set_tensor(dense, fqn, source(src, ranges))
    for name, t in [*dense.named_parameters(), *dense.named_buffers()]:
        if id(t) in shared:
            set_tensor(dense, name, t.detach().clone())
    return dense
