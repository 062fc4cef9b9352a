"""The plan: a JSON-native record of what is elastic, replayed to rebuild an elastic model.

``Analysis -> Plan`` chooses the dimensions and their nested choices; ``apply_plan``
performs the surgery on a model (the converted one, or a freshly built base model when
a checkpoint is loaded), so conversion and loading share one code path.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from .graph import Analysis, model_tensors
from .modules import SWITCH_PREFIX, GroupState, StageState, make_elastic, restore
from .rules import get_rule

__all__ = ["Plan", "PLAN_VERSION", "build_plan", "apply_plan", "remove_elastic", "ElasticState", "DIMENSIONS",
           "KIND_DIM", "axis_entry", "stage_ranks"]

PLAN_VERSION = 1
#: The elastic dimensions elasticize knows. ``"hidden"`` (a transformer's residual-stream
#: width) is opt-in and offered by the transformers adapter; its group sits in the width table.
DIMENSIONS = ("width", "heads", "depth", "modules", "hidden")
#: group kind -> the dimension (search-space table) it belongs to
KIND_DIM = {"width": "width", "heads": "heads", "modules": "modules", "hidden": "width"}
_NORM_TENSORS = ("weight", "bias", "running_mean", "running_var")
_NORM_SITES = ("batchnorm", "layernorm", "groupnorm", "rmsnorm")


def axis_entry(entry: list[Any]) -> tuple[str, int, int]:
    """``(group, chunks, div)`` of a plan tensor-axis entry ``[group, chunks]`` or ``[group, chunks, div]``."""
    return entry[0], int(entry[1]), int(entry[2]) if len(entry) > 2 else 1


def stage_ranks(stage: dict[str, Any]) -> list[int]:
    """Rank of each block of a plan stage in its keep order: block ``i`` runs at depth ``d`` iff ``rank[i] < d``.

    Without an ``order`` the stage keeps a prefix (SortedNet); with one (e.g. evenly spread
    layer dropping) ``order`` lists the block indices from the most to the least kept.
    """
    order = stage.get("order") or list(range(len(stage["blocks"])))
    rank = [0] * len(order)
    for r, i in enumerate(order):
        rank[i] = r
    return rank


@dataclass
class Plan:
    """Everything needed to make a base model elastic again, as JSON-native values.

    Attributes:
        version: plan format version.
        tracer: ``"fx"`` or ``"export"``.
        dims: the elastic dimensions in use (subset of ``("width", "heads", "depth", "modules")``).
        depth_mode: ``"prefix"`` (SortedNet) or ``"skippable"`` (Adaptive Depth Networks).
        groups: one dict per coupling group: ``name, kind, size, unit, choices`` (choices in
            channels for width, in heads for heads, in parallel modules for modules, largest first).
        tensors: tensor fqn -> ``{"shape", "param", "axes": {axis: [group, chunks] or [group, chunks, div]}}``
            (``div``: see :data:`elasticize.modules.TensorSpec`), plus ``"persistent": false`` for a
            non-persistent buffer that is sliced (timm BEiT's ``k_bias``): not in the file, the model
            builds it, a sub-network takes its slice of the built one.
        attrs: module path -> attribute -> ``[group, kind, mul, div]``.
        sites: module path -> rule name, for every module a rule handled.
        stages: one dict per stage: ``name, blocks, n_mandatory, first_skippable, choices``, and
            optionally ``order`` (keep order of the blocks, see :func:`stage_ranks`) and
            ``drop`` (``"identity"``, the default: an extracted sub-network has ``nn.Identity`` for a
            dropped block; ``"remove"``: the block is deleted from its ``nn.ModuleList``), and
            ``skip_tuple`` (blocks that return ``(hidden_states, None, ...)`` of that many items: a
            skipped one returns its input in that shape, see :class:`elasticize.modules.GateMixin`). A stage of
            the stacked layers inside one module (an ``nn.LSTM``'s ``num_layers``, prefix depth) has
            ``module`` (its path), ``attr`` (its attribute that reads the active depth) and
            ``tensors`` (per block, the fqns of that layer's tensors); its blocks are the names
            ``<module>:l<k>``, and an extracted sub-network keeps the module with the dropped
            layers' tensors deleted (see :meth:`elasticize.rules.Rule.densify`).
        switchable: module path -> ``{"stage", "tensors"}`` for skip-aware norms.
        mac_terms: ``[owner, macs per sample, [group, ...]]``.
        not_elastic: ``[where, reason]`` for everything that stayed fixed.
    """

    version: int = PLAN_VERSION
    tracer: str = "fx"
    dims: list[str] = field(default_factory=lambda: list(DIMENSIONS))
    depth_mode: str = "prefix"
    groups: list[dict[str, Any]] = field(default_factory=list)
    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)
    attrs: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    sites: dict[str, str] = field(default_factory=dict)
    stages: list[dict[str, Any]] = field(default_factory=list)
    switchable: dict[str, dict[str, Any]] = field(default_factory=dict)
    mac_terms: list[list[Any]] = field(default_factory=list)
    not_elastic: list[list[str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The plan as a JSON-native dict."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Plan":
        """Rebuild a plan from its JSON, checked strictly first (:func:`elasticize.manifest.check_plan`).

        Raises:
            ValueError: (:class:`elasticize.manifest.ManifestError`) a plan written by a newer format
                version, or one with a missing, unknown, mistyped or inconsistent key (named).
        """
        from .manifest import check_plan

        check_plan(data, version=PLAN_VERSION, kind_dim=KIND_DIM, dimensions=DIMENSIONS, norm_tensors=_NORM_TENSORS,
                   switch_prefix=SWITCH_PREFIX)
        return cls(**{k: v for k, v in data.items() if k in {f.name for f in fields(cls)}})

    def group(self, name: str) -> dict[str, Any]:
        """The group dict called ``name``.

        Raises:
            KeyError: if there is none; the message lists the group names.
        """
        for g in self.groups:
            if g["name"] == name:
                return g
        raise KeyError(f"no group {name!r}; groups: {[g['name'] for g in self.groups]}")


def _choices(size: int, unit: int, ratios: tuple[float, ...]) -> list[int]:
    n = size // unit
    out = sorted({max(1, min(n, round(r * n))) for r in ratios} | {n}, reverse=True)
    return out


def build_plan(
    analysis: Analysis,
    *,
    dims: tuple[str, ...],
    depth_mode: str,
    width_ratios: tuple[float, ...],
    heads_ratios: tuple[float, ...],
    exclude: tuple[str, ...] = (),
    modules_ratios: tuple[float, ...] | None = None,
) -> Plan:
    """Choose the elastic dimensions and their nested choices from an analysis.

    Args:
        analysis: output of :func:`elasticize.graph.analyze`.
        dims: any of ``"width"``, ``"heads"``, ``"depth"``, ``"modules"``.
        depth_mode: ``"prefix"`` keeps the first ``k`` blocks of each stage (SortedNet,
            arXiv 2309.00255); ``"skippable"`` splits each stage into a mandatory first half
            and a skippable second half with switchable norms (arXiv 2312.16392, Section 3).
        width_ratios: fractions of each width group's size offered as choices.
        heads_ratios: fractions of each attention's heads offered as choices.
        modules_ratios: fractions of each TAC block's parallel modules offered; None offers
            every ``w`` from ``W`` down to 1 (Subnetwork-to-go: any ``w <= W``).
        exclude: group or stage names (``fnmatch`` patterns) kept at full size.

    Returns:
        The plan.

    Raises:
        ValueError: for an unknown dimension or depth mode.
    """
    import fnmatch

    bad = [d for d in dims if d not in DIMENSIONS]
    if bad:
        raise ValueError(f"unknown dimension(s) {bad}; choose from {list(DIMENSIONS)}")
    if "hidden" in dims:
        raise ValueError("the 'hidden' dimension (residual-stream width) is offered for Hugging Face transformers "
                         "models only; for other models the width groups already include the residual stream")
    if depth_mode not in ("prefix", "skippable"):
        raise ValueError(f"depth_mode must be 'prefix' or 'skippable', not {depth_mode!r}")

    def excluded(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pat) for pat in exclude)

    plan = Plan(tracer=analysis.tracer, dims=list(dims), depth_mode=depth_mode)
    plan.not_elastic = [list(x) for x in analysis.not_elastic]
    kept: set[str] = set()
    for g in analysis.groups:
        dim = KIND_DIM.get(g.kind, "width")
        if dim not in dims or excluded(g.name):
            plan.not_elastic.append([g.name, f"{dim} not selected" if dim not in dims else "excluded by the user"])
            continue
        if dim == "modules" and modules_ratios is None:
            choices = list(range(g.size // g.unit, 0, -1))
        else:
            ratios = {"heads": heads_ratios, "modules": modules_ratios}.get(dim, width_ratios)
            choices = _choices(g.size, g.unit, ratios)
        if dim == "width":
            choices = [c * g.unit for c in choices]
        plan.groups.append({"name": g.name, "kind": g.kind, "size": g.size, "unit": g.unit, "choices": choices})
        kept.add(g.name)
    for fqn, info in analysis.tensors.items():
        axes = {ax: v for ax, v in info["axes"].items() if v[0] in kept}
        plan.tensors[fqn] = {"shape": info["shape"], "param": info["param"], "axes": axes}
        if info.get("persistent") is False:
            plan.tensors[fqn]["persistent"] = False
    for module, attrs in analysis.attrs.items():
        a = {k: list(v) for k, v in attrs.items() if v[0] in kept}
        if a:
            plan.attrs[module] = a
    plan.sites = dict(analysis.sites)
    plan.mac_terms = [[t.owner, t.macs, [f for f in t.factors if f in kept]] for t in analysis.mac_terms]
    if "depth" in dims:
        for st in analysis.stages:
            if excluded(st.name):
                plan.not_elastic.append([st.name, "excluded by the user"])
                continue
            n = len(st.blocks)
            if depth_mode == "prefix":
                first, lo = n, max(1, st.n_mandatory)
                choices = list(range(n, lo - 1, -1))
            else:
                first = max(st.n_mandatory, math.ceil(n / 2))
                choices = [n, first] if first < n else [n]
            if len(choices) < 2:
                plan.not_elastic.append([st.name, "no block can be skipped"])
                continue
            entry = {"name": st.name, "blocks": list(st.blocks), "n_mandatory": st.n_mandatory,
                     "first_skippable": first, "choices": choices}
            if st.module is not None:
                entry.update(module=st.module, attr=st.attr, tensors=[list(t) for t in st.tensors])
            if st.drop != "identity":
                entry["drop"] = st.drop
            plan.stages.append(entry)
        if depth_mode == "skippable":
            _plan_switchable(plan)
    return plan


def _plan_switchable(plan: Plan) -> None:
    """Skip-aware norms: every norm in a stage's mandatory sub-path gets a second set of tensors."""
    norms: dict[str, list[str]] = {}
    for fqn in plan.tensors:
        module, _, name = fqn.rpartition(".")
        if name in _NORM_TENSORS and plan.sites.get(module) in _NORM_SITES:
            norms.setdefault(module, []).append(name)
    for st in plan.stages:
        mandatory = st["blocks"][: st["first_skippable"]]
        for module, names in norms.items():
            if any(module.startswith(b + ".") for b in mandatory):
                plan.switchable[module] = {"stage": st["name"], "tensors": sorted(names)}


@dataclass
class ElasticState:
    """The live switches of an elastic model: one state per group and per stage."""

    groups: dict[str, GroupState]
    stages: dict[str, StageState]
    modules: list[str]


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
        if not info["axes"]:
            continue
        t = state.get(fqn)
        if t is None:
            raise ValueError(f"the model has no tensor {fqn!r} that the plan makes elastic; the checkpoint was made "
                             "from another architecture")
        if list(t.shape) != list(info["shape"]):
            raise ValueError(f"tensor {fqn!r} has shape {list(t.shape)} but the plan expects {info['shape']}; the "
                             "checkpoint was made from another configuration of this model")
    groups = {g["name"]: GroupState(g["name"], g["size"], g["unit"]) for g in plan.groups}
    stages = {s["name"]: StageState(s["name"], len(s["blocks"]), s["first_skippable"]) for s in plan.stages}
    per_module: dict[str, dict[str, Any]] = {}

    def entry(path: str) -> dict[str, Any]:
        return per_module.setdefault(path, {"tensors": {}, "attrs": {}, "gate": None, "switch": None, "mixins": ()})

    for fqn, info in plan.tensors.items():
        if info["axes"]:
            module, _, name = fqn.rpartition(".")
            spec = []
            for ax, a in info["axes"].items():
                g, ch, div = axis_entry(a)
                spec.append((int(ax), groups[g], ch, div))
            spec.sort(key=lambda x: x[0])
            entry(module)["tensors"][name] = tuple(spec)
    for module, attrs in plan.attrs.items():
        entry(module)["attrs"] = {k: (groups[g], kind, int(mul), int(div)) for k, (g, kind, mul, div) in attrs.items()}
    for st in plan.stages:
        if st.get("module") is not None:  # layers inside one module: an attribute follows the depth
            entry(st["module"])["attrs"][st["attr"]] = (stages[st["name"]], "depth", 1, 1)
            continue
        for b, r in zip(st["blocks"], stage_ranks(st)):
            entry(b)["gate"] = (stages[st["name"]], r, int(st.get("skip_tuple", 0)))
    for module, sw in plan.switchable.items():
        m = _module(model, module)
        for name in sw["tensors"]:
            t = getattr(m, name)
            if t is None or hasattr(m, SWITCH_PREFIX + name):
                continue
            copy = t.detach().clone()
            if isinstance(t, nn.Parameter):
                m.register_parameter(SWITCH_PREFIX + name, nn.Parameter(copy, requires_grad=t.requires_grad))
            else:
                m.register_buffer(SWITCH_PREFIX + name, copy)
            entry(module)["tensors"].setdefault(name, ())
        entry(module)["switch"] = (stages[sw["stage"]], tuple(sw["tensors"]))
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


def tensor_ranges(plan: Plan, state: ElasticState, fqn: str) -> list[list[tuple[int, int]]] | None:
    """Per axis, the ``[start, stop)`` ranges of ``fqn`` that the active sub-network uses.

    Returns None when the tensor is not elastic (the whole tensor is used).
    """
    info = plan.tensors.get(fqn)
    if info is None or not info["axes"]:
        return None
    out: list[list[tuple[int, int]]] = []
    for ax, n in enumerate(info["shape"]):
        a = info["axes"].get(str(ax))
        if a is None:
            out.append([(0, n)])
            continue
        name, chunks, div = axis_entry(a)
        g = state.groups[name]
        size, active = g.size // div, g.active // div
        out.append([(k * size, k * size + active) for k in range(chunks)])
    return out


def slice_ranges(t: torch.Tensor, ranges: list[list[tuple[int, int]]] | None) -> torch.Tensor:
    """``t`` cut to ``ranges`` (as from :func:`tensor_ranges`); a new contiguous tensor."""
    if ranges is None:
        return t.detach().clone()
    for ax, rs in enumerate(ranges):
        if len(rs) == 1:
            a, b = rs[0]
            if a == 0 and b == t.shape[ax]:
                continue
            t = t.narrow(ax, a, b - a)
        else:
            t = torch.cat([t.narrow(ax, a, b - a) for a, b in rs], dim=ax)
    return t.detach().clone().contiguous()
