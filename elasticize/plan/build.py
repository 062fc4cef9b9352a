"""``Analysis -> Plan``: the elastic dimensions and their nested choices (SortedNet), skippable
depth with switchable norms (Adaptive Depth Networks), written by :class:`~elasticize.plan.builder.PlanBuilder`."""

from __future__ import annotations

from ..graph import Analysis
from .builder import PlanBuilder
from .core import Plan

__all__ = ["build_plan"]


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
    b = PlanBuilder(tracer=analysis.tracer, dims=dims, depth_mode=depth_mode, width_ratios=width_ratios,
                    heads_ratios=heads_ratios, modules_ratios=modules_ratios, exclude=exclude,
                    depth_modes=("prefix", "skippable"), hidden=False)
    for where, why in analysis.not_elastic:
        b.note(where, why)
    for g in analysis.groups:
        if b.group(g.name, g.kind, g.size, g.unit) is not None and g.ordered:
            b.keep_order(g.name, g.ordered)
    for fqn, info in analysis.tensors.items():
        b.tensor(fqn, shape=info["shape"], param=info["param"], axes=info["axes"],
                 persistent=info.get("persistent") is not False)
    for module, attrs in analysis.attrs.items():
        for name, (group, kind, mul, div) in attrs.items():
            b.attr(module, name, group, kind, mul, div)
    for path, rule in analysis.sites.items():
        b.site(path, rule)
    for t in analysis.mac_terms:
        b.mac_term(t.owner, t.macs, t.factors)
    for st in analysis.stages:
        b.stage(st.name, st.blocks, n_mandatory=st.n_mandatory, drop=st.drop, module=st.module, attr=st.attr,
                tensors=st.tensors)
    b.switchable(b.site_norms())
    return b.finish()
