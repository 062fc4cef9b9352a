"""The analysis entry point: trace, propagate, find the stages, and collect the :class:`Analysis`.

Passes, in order: :func:`elasticize.graph.tracing.trace` (``torch.fx``, else
``torch.export``), :func:`elasticize.graph.visit.propagate` (every node's slots, the
coupling), :func:`elasticize.graph.stages.find_stages` (residual blocks and stages), and
:func:`_collect` (the coupling groups, the tensors' elastic axes, the attributes that
follow them and the MAC terms, by group name).
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from .macs import per_sample
from .coupling import Coupling
from .propagator import Propagator
from .results import Analysis, GroupInfo, StageInfo
from .stages import find_stages
from .tracing import stand_in_attrs, trace
from .visit import propagate

__all__ = ["analyze"]

#: group name suffix per group kind: ``<module>:out`` (width), ``:heads``, ``:modules`` (parallel modules)
_GROUP_SUFFIX = {"width": "out", "heads": "heads", "modules": "modules"}


def analyze(model: nn.Module, example_inputs: tuple, find_rule: Callable[[nn.Module], Any]) -> Analysis:
    """Trace ``model`` on ``example_inputs`` and find everything that can be elastic.

    Args:
        model: the model, in eval mode; it is not changed.
        example_inputs: positional inputs, e.g. ``(x,)`` with ``x`` of shape ``(batch, 3, H, W)``.
        find_rule: maps a module to the rule that handles it as a leaf, or None.

    Returns:
        The :class:`Analysis`.

    Raises:
        ValueError: if neither ``torch.fx`` nor ``torch.export`` can trace the model; the
            message holds both errors.
    """
    t = trace(model, example_inputs, find_rule)
    graph, param_of, how, tracer = t.graph, t.param_of, t.how, t.tracer
    prop = Propagator(model, graph, param_of)
    for n in graph.nodes:
        if n.op == "placeholder" and n.name not in param_of and prop.is_tensor(n):
            shp = prop.shape(n)
            if shp:
                prop.batch = shp[0]
                break
    propagate(prop, find_rule if how == "fx" else (lambda m: None), dict(tracer.forced_leaves) if tracer else {})
    stand_in_attrs(model, prop.c)
    stages = (find_stages(model, tracer, prop) if tracer is not None else []) + prop.layer_stages
    not_elastic = list(prop.not_elastic)
    if how == "export":
        not_elastic.append(("<model>", f"torch.fx failed ({t.fx_error}); traced with torch.export, which finds no "
                                       "residual blocks or attention heads"))
    return _collect(prop, how, stages, not_elastic)


def _axes_of(c: Coupling, resolve: Callable[[int], tuple[int, int]]) -> tuple[
        dict[int, list[tuple[str, int, int]]], dict[tuple[str, int], tuple[int, int]], dict[tuple[str, int], int],
        dict[tuple[str, int], list[int]]]:
    """Where each tensor axis goes: group root -> its ``(fqn, axis, chunks)`` members; ``(fqn, axis)`` -> ``(group
    root, chunks)``, -> its per-unit divisor, and -> the segments laid along it (an axis that reads a
    concatenation; a concatenation read in chunks or per unit fixes its segments)."""
    members: dict[int, list[tuple[str, int, int]]] = {}
    axis_of: dict[tuple[str, int], tuple[int, int]] = {}  # (fqn, axis) -> (group root, chunks)
    seg_of: dict[tuple[str, int], list[int]] = {}  # (fqn, axis) -> the segments laid along it
    for (fqn, ax), s in c.tensor_slot.items():
        segs = c.flat_segments(s)
        if segs is not None:
            if (fqn, ax) in c.per_unit or c.chunks.get((fqn, ax), 1) > 1:
                for x in segs:
                    c.fix(resolve(x)[0], f"a concatenation is read in chunks by {fqn}")
            seg_of[(fqn, ax)] = segs
            for x in segs:
                r, k = resolve(x)
                members.setdefault(r, []).append((fqn, ax, k))
            continue
        if (fqn, ax) in c.per_unit:
            continue
        if c.div_roots and (div := c.divisor(s)) > 1:  # one entry per unit of a group (pixel_shuffle's output)
            c.per_unit[(fqn, ax)] = (s, div)
            continue
        r, k = resolve(s)
        axis_of[(fqn, ax)] = (r, k * c.chunks.get((fqn, ax), 1))
        members.setdefault(r, []).append((fqn, ax, axis_of[(fqn, ax)][1]))
    div_of: dict[tuple[str, int], int] = {}
    for (fqn, ax), (s, unit) in c.per_unit.items():
        r, k = resolve(s)
        axis_of[(fqn, ax)], div_of[(fqn, ax)] = (r, k), unit
        members.setdefault(r, []).append((fqn, ax, k))
    return members, axis_of, div_of, seg_of


def _collect(prop: Propagator, how: str, stages: list[StageInfo], not_elastic: list[tuple[str, str]]) -> Analysis:
    """The :class:`Analysis` of a finished propagation: a group per producer root, named after its first
    producer and kept when it is not fixed, has a tensor to slice and at least 2 units; each tensor's axes
    in those groups; the attributes that follow them; the MAC terms by group name, per sample."""
    c = prop.c
    resolve = c.resolver()
    members, axis_of, div_of, seg_of = _axes_of(c, resolve)
    order = {fqn: i for i, fqn in enumerate(prop.state)}
    groups: list[GroupInfo] = []
    name_of: dict[int, str] = {}
    roots = sorted({resolve(s)[0] for s in c.producer if c.flat_segments(s) is None}, key=lambda r: min(
        (order.get(f, 1 << 30), ax) for f, ax, _ in members.get(r, [("", 0, 1)])))
    used_names: set[str] = set()
    for r in roots:
        mem = sorted(members.get(r, []), key=lambda m: (order.get(m[0], 1 << 30), m[1]))
        kind = c.kind.get(r, "width")
        owner = next((f.rsplit(".", 1)[0] for f, ax, _ in mem if ax == 0 and f.rsplit(".", 1)[-1].startswith("weight")),
                     mem[0][0] if mem else "?")
        name = f"{owner}:{_GROUP_SUFFIX.get(kind, 'out')}"
        while name in used_names:
            name += "'"
        used_names.add(name)
        reason = c.fixed.get(r)
        if reason is None and not mem:
            reason = "no tensor to slice"
        if reason is not None:
            not_elastic.append((name, reason))
            continue
        unit = c.unit.get(r, 1)
        size = c.size[r]
        if size % unit or size // unit < 2:
            not_elastic.append((name, f"size {size} has fewer than 2 units of {unit}"))
            continue
        ordered = next((why for s, why in c.ordered.items() if resolve(s)[0] == r), None)
        groups.append(GroupInfo(name, kind, size, unit, mem, ordered))
        name_of[r] = name

    def layout(s: int) -> list[Any] | None:
        """A segmented slot's plan entry: per segment ``[group, chunks]``, or its channels when not elastic;
        None when no segment is elastic."""
        out: list[Any] = []
        for x in c.flat_segments(s) or []:
            r, k = resolve(x)
            out.append([name_of[r], k] if r in name_of else c.size[x])
        return out if any(isinstance(e, list) for e in out) else None

    tensors: dict[str, dict[str, Any]] = {}
    params = {n for n, _ in prop.root.named_parameters()}
    for fqn, t in prop.state.items():
        axes = {}
        for ax in range(t.dim()):
            if (fqn, ax) in seg_of:
                e = layout(c.tensor_slot[(fqn, ax)])
                if e is not None:
                    axes[str(ax)] = e
                continue
            r, k = axis_of.get((fqn, ax), (-1, 1))
            g = name_of.get(r)
            if g is not None:
                axes[str(ax)] = [g, k, div_of[(fqn, ax)]] if (fqn, ax) in div_of else [g, k]
        if fqn in prop.persistent:
            tensors[fqn] = {"shape": list(t.shape), "param": fqn in params, "axes": axes}
        elif axes:  # a non-persistent buffer the plan slices; not in the file
            tensors[fqn] = {"shape": list(t.shape), "param": False, "axes": axes, "persistent": False}
    attrs: dict[str, dict[str, tuple[str, str, int, int]]] = {}
    for module, attr, slot, kind, mul, div in c.attrs:
        if c.flat_segments(slot) is not None:
            e = layout(slot)
            if e is not None:
                attrs.setdefault(module, {})[attr] = (e, kind, mul, div)
            continue
        r, k = resolve(slot)
        g = name_of.get(r)
        if g is not None:
            per = c.divisor(slot) if c.div_roots else 1
            attrs.setdefault(module, {})[attr] = (g, kind, mul * k, div * per)
    per_sample(prop.mac_terms, resolve, name_of, prop.batch,
               lambda s: layout(s) if c.flat_segments(s) is not None else None)
    return Analysis(how, groups, tensors, attrs, dict(prop.sites), stages, prop.mac_terms, not_elastic, prop.batch)
