"""Surgery: make a model elastic in place as its plan says, and undo it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..graph import model_tensors
from ..modules import SWITCH_PREFIX, GroupState, SegmentState, StageState, make_elastic, restore
from ..rules import get_rule
from .core import Plan, stage_outputs
from .types import Axis, AxisEntry, Segments

__all__ = ["ElasticState", "apply_plan", "remove_elastic", "axis_state"]


@dataclass
class ElasticState:
    """The live switches of an elastic model: one state per group and per stage."""

    groups: dict[str, GroupState]
    stages: dict[str, StageState]
    modules: list[str]


def axis_state(entry: AxisEntry, groups: dict[str, GroupState]) -> tuple[GroupState | SegmentState, int, int]:
    """The live state of a plan tensor-axis entry: ``(group state, chunks, div)`` of an :class:`Axis`, or
    ``(SegmentState, 1, 1)`` of :class:`Segments` (see :data:`elasticize.modules.TensorSpec`)."""
    if isinstance(entry, Segments):
        return SegmentState([p if isinstance(p, int) else (groups[p.group], p.chunks, p.div) for p in entry.parts]), 1, 1
    return groups[entry.group], entry.chunks, entry.div


def apply_plan(model: nn.Module, plan: Plan) -> ElasticState:
    """Make ``model`` elastic in place, as the plan says.

    Original parameters keep their objects and names. Switchable norms get new tensors
    named ``elastic_skip_<name>``, initialised as copies of the originals.

    Args:
        model: a model with the plan's structure (the converted model, or a freshly built base model).
        plan: the plan.

    Returns:
        The live state (groups, stages) that selects the active sub-network.

    Raises:
        ValueError: if the model does not match the plan (a tensor is missing or has another shape).
        KeyError: if the plan names a rule that is not registered.
    """
    state = model_tensors(model)
    for fqn, info in plan.tensors.items():
        if not info.axes:
            continue
        t = state.get(fqn)
        if t is None:
            raise ValueError(f"the model has no tensor {fqn!r} that the plan makes elastic; the checkpoint was made "
                             "from another architecture")
        if list(t.shape) != list(info.shape):
            raise ValueError(f"tensor {fqn!r} has shape {list(t.shape)} but the plan expects {list(info.shape)}; the "
                             "checkpoint was made from another configuration of this model")
    groups = {g.name: GroupState(g.name, g.size, g.unit) for g in plan.groups}
    stages = {s.name: StageState(s.name, len(s.blocks), s.first_skippable) for s in plan.stages}
    for g, (st_name, rank) in stage_outputs(plan.stages).items():
        groups[g].gate = (stages[st_name], rank)
    per_module: dict[str, dict[str, Any]] = {}

    def entry(path: str) -> dict[str, Any]:
        return per_module.setdefault(path, {"tensors": {}, "attrs": {}, "gate": None, "switch": None, "mixins": ()})

    for fqn, info in plan.tensors.items():
        if info.axes:
            module, _, name = fqn.rpartition(".")
            spec = sorted(((ax, *axis_state(a, groups)) for ax, a in info.axes.items()), key=lambda x: x[0])
            entry(module)["tensors"][name] = tuple(spec)
    for module, attrs in plan.attrs.items():
        entry(module)["attrs"] = {k: (axis_state(a.group if isinstance(a.group, Segments) else Axis(a.group), groups)[0],
                                      a.kind, a.mul, a.div) for k, a in attrs.items()}
    for st in plan.stages:
        if st.module is not None:  # layers inside one module: an attribute follows the depth
            entry(st.module)["attrs"][st.attr] = (stages[st.name], "depth", 1, 1)
            continue
        for b, r in zip(st.blocks, st.ranks()):
            entry(b)["gate"] = (stages[st.name], r, -1 if st.skip_empty else st.skip_tuple or 0)
    for module, sw in plan.switchable.items():
        m = _module(model, module)
        for name in sw.tensors:
            t = getattr(m, name)
            if t is None or hasattr(m, SWITCH_PREFIX + name):
                continue
            copy = t.detach().clone()
            if isinstance(t, nn.Parameter):
                m.register_parameter(SWITCH_PREFIX + name, nn.Parameter(copy, requires_grad=t.requires_grad))
            else:
                m.register_buffer(SWITCH_PREFIX + name, copy)
            entry(module)["tensors"].setdefault(name, ())
        entry(module)["switch"] = (stages[sw.stage], sw.tensors)
    for module, rule_name in plan.sites.items():
        rule = get_rule(rule_name)
        if rule.mixin is not None:
            entry(module)["mixins"] = (rule.mixin,)
    modules = {path: _module(model, path) for path in per_module}
    for path, e in per_module.items():
        for a in e["attrs"]:
            _check_attr(modules[path], path, a)
    for path, e in per_module.items():
        make_elastic(modules[path], tensors=e["tensors"], attrs=e["attrs"], gate=e["gate"],
                     switch=e["switch"], mixins=e["mixins"])
    return ElasticState(groups, stages, sorted(per_module))


def _module(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"the plan names module {path!r}, which the model does not have; the file was made from "
                         "another architecture") from None


def _check_attr(m: nn.Module, path: str, name: str) -> None:
    """An attribute the plan makes elastic must be a plain size the module holds (an int, or a shape
    tuple), never a method, property or anything its class defines: the elastic class would shadow it."""
    v = m.__dict__.get(name)
    ok = (isinstance(v, int) and not isinstance(v, bool)) or (
        isinstance(v, (tuple, list)) and all(isinstance(x, int) and not isinstance(x, bool) for x in v))
    if not ok or callable(getattr(type(m), name, None)) or isinstance(getattr(type(m), name, None), property):
        raise ValueError(f"the plan makes {path}.{name} elastic, but it is not a size that {type(m).__name__} holds "
                         "(an int or a shape); the file was made from another architecture or is corrupted")


def remove_elastic(model: nn.Module, *, freeze: bool) -> None:
    """Give every elastic module its original class back (``freeze``: keep the active attribute values)."""
    for m in model.modules():
        restore(m, freeze_attrs=freeze)
