"""Dense extraction: any sub-network as a plain module of ordinary layers.

The dense module has the original classes (``nn.Conv2d``, timm ``Attention``...), smaller
tensors, consistent attributes (``out_channels``, ``num_heads``...), ``nn.Identity``
in place of skipped blocks, and non-tensor state fixed by the model family's adapter
(timm ``num_features``, a Hugging Face ``config``). There is one extraction path,
:func:`extract`; only its *tensor source* differs: the live elastic model
(:class:`LiveTensors`, for :meth:`ElasticModel.extract`) or a safetensors file read slice by
slice (:func:`elasticize.load_subnet`), both through the per-tensor ranges of
:func:`dense_tensors`, which the manifest lists too.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

import torch
from torch import nn

from .adapters import adapter_for_model, get_adapter
from .graph import model_tensors
from .modules import SWITCH_PREFIX
from .plan import ElasticState, Plan, Stage, remove_elastic, slice_ranges, tensor_ranges
from .space import Config, SearchSpace

__all__ = ["extract", "TensorSource", "LiveTensors", "dense_tensors", "densify", "set_tensor"]

#: Per axis of a tensor, the ``[start, stop)`` ranges to read (:func:`elasticize.plan.tensor_ranges`).
Ranges = list[list[tuple[int, int]]]
#: The shape and dtype a dense tensor must have.
Want = tuple[list[int], torch.dtype]


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
        if sw is not None and name in sw.tensors and state.stages[sw.stage].skip:
            src = f"{module}.{SWITCH_PREFIX}{name}" if module else SWITCH_PREFIX + name
        out[_rename(fqn, removed)] = (src, tensor_ranges(plan, state, fqn))
    return out


def _removed_blocks(plan: Plan, cfg: Config) -> dict[str, list[int]]:
    """Parent ``nn.ModuleList`` path -> indices of the blocks that ``cfg`` deletes from it (``drop: "remove"``;
    an ``nn.ModuleDict``'s blocks keep their names, so none are listed)."""
    out: dict[str, list[int]] = {}
    for st in plan.stages:
        if st.drop != "remove" or st.module is not None:
            continue
        depth = cfg["depth"].get(st.name, len(st.blocks))
        for b, r in zip(st.blocks, st.ranks()):
            parent, _, idx = b.rpartition(".")
            if r >= depth and idx.isdigit():  # an nn.ModuleDict's blocks keep their names
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
        depth = cfg["depth"].get(st.name, len(st.blocks))
        if st.module is not None:
            _drop_layers(model, plan, st, depth)
            continue
        dropped = [b for b, r in zip(st.blocks, st.ranks()) if r >= depth]
        if st.drop == "remove":
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


def _drop_layers(model: nn.Module, plan: Plan, stage: Stage, depth: int) -> None:
    """Delete the tensors of the layers a layer stage drops from its module, then let its rule fix the rest."""
    from .rules import get_rule

    try:
        m = model.get_submodule(stage.module)
    except AttributeError:  # the module sits in a dropped block
        return
    prefix = f"{stage.module}." if stage.module else ""
    for names, r in zip(stage.tensors or (), stage.ranks()):
        if r >= depth:
            for fqn in names:
                name = fqn[len(prefix):]
                m._parameters.pop(name, None)
                m._buffers.pop(name, None)
    get_rule(plan.sites[stage.module]).densify(m)


def _remove_blocks(model: nn.Module, blocks: list[str]) -> None:
    """Delete ``blocks`` (items of ``nn.ModuleList``s or ``nn.ModuleDict``s, by path) from their containers,
    keeping the order of the rest."""
    by_parent: dict[str, set[str]] = {}
    for b in blocks:
        parent, _, idx = b.rpartition(".")
        by_parent.setdefault(parent, set()).add(idx)
    for parent, gone in by_parent.items():
        lst = model.get_submodule(parent)
        if isinstance(lst, nn.ModuleDict):  # torchvision's _DenseBlock iterates its items
            for name in gone:
                del lst[name]
            continue
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


class TensorSource:
    """Where :func:`extract` takes the dense sub-network's tensors from.

    Subclass and override :meth:`read`; :meth:`complete` may fill what the source does not hold.
    """

    def read(self, name: str, src: str, ranges: Ranges | None, want: Want | None) -> torch.Tensor:
        """The dense tensor ``name``: tensor ``src`` of the super-network cut to ``ranges`` (None: whole).

        Args:
            name: the tensor's name in the dense module.
            src: the super-network tensor it comes from (a switchable norm's ``elastic_skip_*``
                tensor while its stage is skipped).
            ranges: per axis, the ``[start, stop)`` ranges to keep, or None for the whole tensor.
            want: the ``(shape, dtype)`` the dense module needs, or None when it has no such tensor.

        Returns:
            A tensor that no other module shares.
        """
        raise NotImplementedError

    def complete(self, dense: nn.Module) -> None:
        """Called once every tensor is set, before the adapter's fix of non-tensor state."""


class LiveTensors(TensorSource):
    """The tensors of a live (elastic) model, cut and copied: training the dense module leaves it alone."""

    def __init__(self, model: nn.Module) -> None:
        self.tensors = model_tensors(model)

    def read(self, name: str, src: str, ranges: Ranges | None, want: Want | None) -> torch.Tensor:
        return slice_ranges(self.tensors[src], ranges)


def expected_tensors(dense: nn.Module, plan: Plan, spec: Mapping[str, tuple[str, Ranges | None]]) -> dict[str, Want]:
    """Dense tensor name -> (shape, dtype) the sub-network needs: the sliced shape, the model's dtype.

    ``dense`` is the module after :func:`densify`, still holding the super-network's tensors (or
    ``meta`` ones of their shape).
    """
    own = dict(dense.state_dict(keep_vars=True))
    out = {}
    for name, (src, ranges) in spec.items():
        t = own.get(name)
        if t is None:
            continue
        shape = list(plan.tensors[src].shape) if ranges is None and src in plan.tensors else (
            list(t.shape) if ranges is None else [sum(b - a for a, b in rs) for rs in ranges])
        out[name] = (shape, t.dtype)
    return out


def extract(model: nn.Module, plan: Plan, space: SearchSpace, state: ElasticState, cfg: Config,
            source: TensorSource, *, recipe: Mapping[str, Any] | None = None, in_place: bool = False) -> nn.Module:
    """The dense module of sub-network ``cfg``: the one extraction path of elasticize.

    Steps: the dense tensor table (:func:`dense_tensors`); a structural copy of ``model`` (or
    ``model`` itself); :func:`densify`; every tensor from ``source``; tensors the copy still
    shares with ``model`` cloned; :meth:`TensorSource.complete`; the family adapter's fix of
    non-tensor state (:meth:`elasticize.adapters.Adapter.after_extract`: timm ``num_features``,
    a Hugging Face ``config``), the adapter named by ``recipe`` or else the one that owns the model.

    Args:
        model: the elastic model (made so by :func:`elasticize.plan.apply_plan`), ``state`` set to ``cfg``.
        plan: its plan.
        space: its search space.
        state: its live switches.
        cfg: the resolved configuration.
        source: where the tensors come from.
        recipe: the model's recipe (``{"adapter", ...}``), or None / ``{}``.
        in_place: turn ``model`` itself into the dense module (a model built for this, e.g. by
            :func:`elasticize.load_subnet`) instead of a copy.

    Returns:
        The dense module (``model`` itself when ``in_place``).

    Raises:
        ValueError: what ``source.read`` raises for a tensor it cannot give (e.g. a file's tensor of
            the wrong shape or dtype).
    """
    spec = dense_tensors(plan, space, state, cfg)
    dense, shared = (model, set()) if in_place else structural_copy(model)
    densify(dense, plan, space, cfg)
    expected = expected_tensors(dense, plan, spec)
    for fqn, (src, ranges) in spec.items():
        set_tensor(dense, fqn, source.read(fqn, src, ranges, expected.get(fqn)))
    for name, t in [*dense.named_parameters(), *dense.named_buffers()]:
        if id(t) in shared:
            set_tensor(dense, name, t.detach().clone())
    source.complete(dense)
    adapter = get_adapter(recipe["adapter"]) if recipe and recipe.get("adapter") else adapter_for_model(dense)
    if adapter is not None:
        adapter.after_extract(dense)
    return dense
