"""``Analysis -> Plan``: the elastic dimensions and their nested choices (SortedNet), skippable
depth with switchable norms (Adaptive Depth Networks)."""

from __future__ import annotations

import math

from ..graph import Analysis
from .core import DIMENSIONS, KIND_DIM, NORM_SITES, NORM_TENSORS, Plan

__all__ = ["build_plan"]


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
        if name in NORM_TENSORS and plan.sites.get(module) in NORM_SITES:
            norms.setdefault(module, []).append(name)
    for st in plan.stages:
        mandatory = st["blocks"][: st["first_skippable"]]
        for module, names in norms.items():
            if any(module.startswith(b + ".") for b in mandatory):
                plan.switchable[module] = {"stage": st["name"], "tensors": sorted(names)}
