"""The one writer of a :class:`~elasticize.plan.core.Plan`: :class:`PlanBuilder`.

Both planners use it: :func:`elasticize.plan.build.build_plan` (from the traced graph's
analysis) and :func:`elasticize.adapters.hf.plan_transformer` (from a transformers model's
structure). They find what can be elastic; the builder decides, in one place, what the plan
says about it: the nested choices of each group (SortedNet, arXiv 2309.00255), the user's
``exclude`` patterns, the reasons for everything kept fixed, the tensors' elastic axes, the
module attributes that follow a group, the depth stages (prefix, evenly spread, or Adaptive
Depth Networks' skippable second half, arXiv 2312.16392, Section 3), their switchable norms,
and the MAC terms.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Any, Mapping, Sequence

from .core import DIMENSIONS, KIND_DIM, NORM_SITES, NORM_TENSORS, Plan, axis_entry, is_segmented
from .types import Attr, Axis, Group, MacTerm, NotElastic, Segments, Stage, SwitchableNorm, Tensor, frozen_map

__all__ = ["PlanBuilder", "DEPTH_MODES", "nested_choices", "spread_order"]

#: ``"prefix"``: the first ``k`` blocks of a stage (SortedNet); ``"spaced"``: ``k`` blocks spread
#: evenly over the stage (:func:`spread_order`); ``"skippable"``: a mandatory first half, the second
#: half skipped or not as a whole, with switchable norms (Adaptive Depth Networks).
DEPTH_MODES = ("prefix", "spaced", "skippable")


def nested_choices(n: int, ratios: Sequence[float] | None) -> list[int]:
    """The nested choices out of ``n`` units, largest first: ``round(r * n)`` for each ratio, at
    least 1, and always ``n``; ``ratios=None`` offers every count from ``n`` down to 1."""
    if ratios is None:
        return list(range(n, 0, -1))
    return sorted({max(1, min(n, round(r * n))) for r in ratios} | {n}, reverse=True)


def spread_order(n: int) -> list[int]:
    """Keep order 0, n-1, then midpoints of the widest gaps: every prefix is spread evenly over the stack."""
    if n <= 2:
        return list(range(n))
    order = [0, n - 1]
    while len(order) < n:
        kept = sorted(order)
        gaps = [(kept[i + 1] - kept[i], -kept[i], kept[i]) for i in range(len(kept) - 1)]
        width, _, lo = max(gaps)
        order.append(lo + width // 2)
    return order


def _one_of(values: Sequence[str]) -> str:
    quoted = [repr(v) for v in values]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


class PlanBuilder:
    """Write one :class:`~elasticize.plan.core.Plan`, from what a planner found.

    A planner calls :meth:`group` for each coupling group it found (the builder leaves it out,
    with the reason, when its dimension is not selected or the user excluded it, and returns its
    name or None), then :meth:`tensor`, :meth:`axis`, :meth:`attr` and :meth:`site` (entries
    naming a group that is not elastic are dropped), :meth:`stage` for each depth stage,
    :meth:`switchable`, :meth:`mac_term`, and finally :meth:`finish`, which returns the frozen
    :class:`~elasticize.plan.core.Plan` (the builder keeps its working state mutable until then).

    Args:
        tracer: the plan's ``tracer`` (``"fx"``, ``"export"``, or ``"structure"`` for a plan made
            from a family's known structure).
        dims: the elastic dimensions asked for, a subset of :data:`~elasticize.plan.core.DIMENSIONS`.
        depth_mode: one of ``depth_modes``.
        width_ratios: fractions of each width (and hidden) group's units offered as choices.
        heads_ratios: fractions of each attention's heads offered (in whole ``step`` s of heads).
        modules_ratios: fractions of each TAC block's parallel modules offered; None offers every
            ``w`` from ``W`` down to 1 (Subnetwork-to-go: any ``w <= W``).
        exclude: ``fnmatch`` patterns of group or stage names kept at full size.
        depth_modes: the depth modes this planner offers, a subset of :data:`DEPTH_MODES`.
        hidden: whether this planner offers the ``"hidden"`` dimension (the residual-stream width).

    Raises:
        ValueError: for an unknown dimension, ``"hidden"`` where it is not offered, or a depth
            mode off ``depth_modes``.
    """

    def __init__(self, *, tracer: str, dims: Sequence[str], depth_mode: str, width_ratios: Sequence[float],
                 heads_ratios: Sequence[float], modules_ratios: Sequence[float] | None = None,
                 exclude: Sequence[str] = (), depth_modes: Sequence[str] = DEPTH_MODES, hidden: bool = True) -> None:
        bad = [d for d in dims if d not in DIMENSIONS]
        if bad:
            raise ValueError(f"unknown dimension(s) {bad}; choose from {list(DIMENSIONS)}")
        if "hidden" in dims and not hidden:
            raise ValueError("the 'hidden' dimension (residual-stream width) is offered for Hugging Face transformers "
                             "models only; for other models the width groups already include the residual stream")
        if depth_mode not in depth_modes:
            raise ValueError(f"depth_mode must be {_one_of(depth_modes)}, not {depth_mode!r}")
        self.dims = tuple(dims)
        self.ratios = {"width": tuple(width_ratios), "heads": tuple(heads_ratios),
                       "modules": None if modules_ratios is None else tuple(modules_ratios)}
        self.exclude = tuple(exclude)
        self.tracer, self.depth_mode = tracer, depth_mode
        self._groups: dict[str, dict[str, Any]] = {}  # name -> Group's fields, until finish()
        self._tensors: dict[str, dict[str, Any]] = {}  # fqn -> Tensor's fields (axes: a dict)
        self._attrs: dict[str, dict[str, Attr]] = {}
        self._sites: dict[str, str] = {}
        self._stages: list[Stage] = []
        self._switchable: dict[str, SwitchableNorm] = {}
        self._mac_terms: list[MacTerm] = []
        self._notes: list[NotElastic] = []
        self._sizes: dict[str, int] = {}  # every group offered, elastic or not (a fixed segment's channels)

    # ------------------------------------------------------------------ what stays fixed, and why
    def excluded(self, name: str) -> bool:
        """Whether the user's ``exclude`` patterns keep the group or stage ``name`` at full size."""
        return any(fnmatch.fnmatchcase(name, p) for p in self.exclude)

    def note(self, where: str, why: str) -> None:
        """Record that ``where`` (a module, group or stage) stays fixed, and why (``plan.not_elastic``)."""
        self._notes.append(NotElastic(where, why))

    # ------------------------------------------------------------------ groups and their choices
    def group(self, name: str, kind: str, size: int, unit: int, *, dim: str | None = None, step: int = 1,
              constraint: str = "", segment_of_stage: bool = False) -> str | None:
        """Add a coupling group with its nested choices, or note why it stays fixed.

        Args:
            name: the group's name.
            kind: ``"width"``, ``"heads"``, ``"modules"`` or ``"hidden"``.
            size: its full size in channels (heads: query rows; modules: parallel modules).
            unit: channels per unit (``head_dim`` for heads, channels per GroupNorm group).
            dim: the dimension that selects it; by default the one its kind belongs to
                (:data:`~elasticize.plan.core.KIND_DIM`).
            step: units kept together (grouped-query attention: query heads per key/value head).
            constraint: why ``step`` is more than 1, for error messages.
            segment_of_stage: the group is a dense-stage block's output (:mod:`elasticize.graph.dense`):
                when its dimension is not selected or it is excluded it is still offered, at its full size
                only (one choice), so a skip of its block can remove its segment.

        Returns:
            ``name``, or None when the group stays fixed (its dimension not selected, or excluded).

        The choices are counts of ``unit * step`` channels (:func:`nested_choices` of ``size //
        (unit * step)``), written in channels for width and hidden, in heads for heads and in
        modules for modules.
        """
        dim = dim or KIND_DIM.get(kind, "width")
        self._sizes[name] = size
        why = f"{dim} not selected" if dim not in self.dims else "excluded by the user" if self.excluded(name) else None
        if why is not None and not (segment_of_stage and "depth" in self.dims):
            self.note(name, why)
            return None
        counts = [size // (unit * step)] if why is not None else nested_choices(
            size // (unit * step), self.ratios.get(dim, self.ratios["width"]))
        per = step if dim in ("heads", "modules") else unit * step
        g: dict[str, Any] = {"name": name, "kind": kind, "size": size, "unit": unit,
                             "choices": tuple(c * per for c in counts)}
        if step > 1:
            g["step"], g["constraint"] = step, constraint
        self._groups[name] = g
        return name

    def keep_order(self, name: str, why: str) -> None:
        """Group ``name`` is not sorted by importance (``"sort": false``), with the reason noted."""
        self._groups[name]["sort"] = False
        self.note(name, why)

    # ------------------------------------------------------------------ tensors, attributes, sites
    def tensor(self, fqn: str, *, shape: Sequence[int], param: bool, axes: Mapping[str, list[Any]] | None = None,
               persistent: bool = True) -> None:
        """Add a tensor of the model (``plan.tensors``).

        Args:
            fqn: its name in the model's ``state_dict`` (or a non-persistent buffer's name).
            shape: its full shape.
            param: whether it is a parameter.
            axes: axis (a string) -> ``[group, chunks]`` or ``[group, chunks, div]``; entries whose
                group is not elastic are dropped. More come from :meth:`axis`.
            persistent: False for a non-persistent buffer the plan slices (not in the file).
        """
        kept: dict[int, Axis | Segments] = {}
        for ax, v in (axes or {}).items():
            if is_segmented(v):
                seg = self._segments(v)
                if seg is not None:
                    kept[int(ax)] = seg
            elif v[0] in self._groups:
                kept[int(ax)] = Axis(*axis_entry(v))
        self._tensors[fqn] = {"shape": tuple(shape), "param": param, "axes": kept, "persistent": persistent}

    def _segments(self, entry: list[Any]) -> Segments | None:
        """The :class:`Segments` of a raw segmented entry, with the segments of groups that are not elastic
        turned into their channels (kept whole); None when no segment is elastic.

        Raises:
            KeyError: a segment names a group that was never offered to :meth:`group`.
        """
        out: list[Axis | int] = []
        for seg in entry:
            if isinstance(seg, int):
                out.append(seg)
            else:
                g, chunks, div = axis_entry(seg)
                out.append(Axis(g, chunks, div) if g in self._groups else chunks * (self._sizes[g] // div))
        return Segments(tuple(out)) if any(isinstance(e, Axis) for e in out) else None

    def axis(self, fqn: str, axis: int, group: str | None, chunks: int = 1, div: int = 1) -> None:
        """Axis ``axis`` of tensor ``fqn`` follows ``group`` in ``chunks`` equal chunks, at ``1 / div`` of
        its channels (see :data:`elasticize.modules.TensorSpec`). Ignored when ``group`` is None or
        not elastic, or ``fqn`` is no tensor added by :meth:`tensor` (a layer without a bias)."""
        if group is None or group not in self._groups or fqn not in self._tensors:
            return
        self._tensors[fqn]["axes"][int(axis)] = Axis(group, chunks, div)

    def axis_groups(self, fqns: Sequence[str]) -> list[str]:
        """The sorted names of the groups that any axis of the tensors ``fqns`` follows."""
        return sorted({g for f in fqns if f in self._tensors for a in self._tensors[f]["axes"].values()
                       for g in a.groups})

    def attr(self, path: str, name: str, group: str | list[Any] | None, kind: str = "int", mul: int = 1,
             div: int = 1) -> None:
        """Attribute ``name`` of module ``path`` follows ``group``: its active size ``* mul // div``
        (``kind`` ``"int"``, or ``"shape"`` for a 1-tuple such as ``normalized_shape``). Ignored when
        ``group`` is None or not elastic. ``group`` may be a list of segments (a convolution's
        ``in_channels`` over a concatenation): the attribute follows their active sum."""
        if is_segmented(group):
            seg = self._segments(group)  # type: ignore[arg-type]
            if seg is not None:
                self._attrs.setdefault(path, {})[name] = Attr(seg, kind, mul, div)
        elif group is not None and group in self._groups:
            self._attrs.setdefault(path, {})[name] = Attr(group, kind, mul, div)

    def site(self, path: str, rule: str) -> None:
        """Module ``path`` is handled by the rule named ``rule``."""
        self._sites[path] = rule

    # ------------------------------------------------------------------ depth
    def stage(self, name: str, blocks: Sequence[str], *, n_mandatory: int = 1, drop: str = "identity",
              skip_tuple: int | None = None, module: str | None = None, attr: str | None = None,
              tensors: Sequence[Sequence[str]] = (), outputs: Sequence[Sequence[str]] = (),
              skip_empty: bool = False) -> Stage | None:
        """Add a depth stage over ``blocks`` (nothing when ``"depth"`` is not selected).

        ``"prefix"`` and ``"spaced"`` offer every depth from all blocks down to
        ``max(1, n_mandatory)`` (``"spaced"`` adds the keep ``order`` of :func:`spread_order`);
        ``"skippable"`` offers all blocks or the first ``max(n_mandatory, ceil(n / 2))``
        (``first_skippable``).

        Args:
            name: the stage's name.
            blocks: the blocks' module paths (``<module>:l<k>`` for layers inside one module).
            n_mandatory: leading blocks that always run.
            drop: ``"identity"`` or ``"remove"`` (see :class:`~elasticize.plan.core.Plan`).
            skip_tuple: the length of the ``(hidden_states, None, ...)`` tuple the blocks return.
            module: for layers inside one module, its path; ``attr`` and ``tensors`` go with it.
            attr: that module's attribute that reads the active depth.
            tensors: per block, the fqns of that layer's tensors.
            outputs: for a dense stage, per block the groups of the segments its skip removes from every
                concatenation that reads them (:mod:`elasticize.graph.dense`).
            skip_empty: a skipped block returns its first input cut to 0 channels (a dense layer).

        Returns:
            The :class:`~elasticize.plan.types.Stage`, or None when it stays fixed (excluded, no block can be
            skipped, or a dense stage whose blocks' output groups are not all elastic; noted).
        """
        if "depth" not in self.dims:
            return None
        if self.excluded(name):
            self.note(name, "excluded by the user")
            return None
        n = len(blocks)
        missing = sorted({g for gs in outputs for g in gs if g not in self._groups})
        if missing:
            self.note(name, f"group {missing[0]} is not elastic, so a skipped block could not remove its segment")
            return None
        if self.depth_mode == "skippable":
            first = max(n_mandatory, math.ceil(n / 2))
            choices = [n, first] if first < n else [n]
        else:
            first = n
            choices = list(range(n, max(1, n_mandatory) - 1, -1))
        if len(choices) < 2:
            self.note(name, "no block can be skipped")
            return None
        entry = Stage(name, tuple(blocks), n_mandatory, first, tuple(choices),
                      order=tuple(spread_order(n)) if self.depth_mode == "spaced" else None, drop=drop,
                      skip_tuple=skip_tuple, module=module, attr=None if module is None else attr,
                      tensors=None if module is None else tuple(tuple(t) for t in tensors),
                      outputs=tuple(tuple(gs) for gs in outputs) if outputs else None, skip_empty=skip_empty)
        self._stages.append(entry)
        return entry

    def site_norms(self) -> dict[str, list[str]]:
        """Norm module -> its tensors (sorted), for every module whose site is a norm rule."""
        norms: dict[str, list[str]] = {}
        for fqn in self._tensors:
            module, _, name = fqn.rpartition(".")
            if name in NORM_TENSORS and self._sites.get(module) in NORM_SITES:
                norms.setdefault(module, []).append(name)
        return {m: sorted(names) for m, names in norms.items()}

    def switchable(self, norms: Mapping[str, Sequence[str]]) -> None:
        """Skip-aware norms (Adaptive Depth Networks): with ``"skippable"`` depth, every norm of
        ``norms`` (module -> tensor names) inside a stage's mandatory blocks gets a second set of
        its tensors, used while the stage's skippable blocks are skipped."""
        if self.depth_mode != "skippable":
            return
        for st in self._stages:
            mandatory = st.blocks[: st.first_skippable]
            for module, names in norms.items():
                if any(module.startswith(b + ".") for b in mandatory):
                    self._switchable[module] = SwitchableNorm(st.name, tuple(names))

    # ------------------------------------------------------------------ MACs
    def mac_term(self, owner: str, macs: int, factors: Sequence[Any]) -> None:
        """``macs`` multiply-accumulates per sample of ``owner`` at full size, scaled at a sub-network
        by the active fraction of each elastic group in ``factors`` (others are dropped); a factor that
        is a list of segments scales by their active channels over their full size."""
        kept: list[str | Segments] = []
        for f in factors:
            seg = self._segments(f) if is_segmented(f) else None
            if seg is not None or (isinstance(f, str) and f in self._groups):
                kept.append(seg if seg is not None else f)
        self._mac_terms.append(MacTerm(owner, macs, tuple(kept)))

    def finish(self) -> Plan:
        """The frozen plan, with its groups in the order they were added."""
        tensors = {fqn: Tensor(t["shape"], t["param"], frozen_map(t["axes"]), t["persistent"])
                   for fqn, t in self._tensors.items()}
        return Plan(tracer=self.tracer, dims=self.dims, depth_mode=self.depth_mode,
                    groups=tuple(Group(**g) for g in self._groups.values()), tensors=frozen_map(tensors),
                    attrs=frozen_map((m, frozen_map(a)) for m, a in self._attrs.items()), sites=frozen_map(self._sites),
                    stages=tuple(self._stages), switchable=frozen_map(self._switchable),
                    mac_terms=tuple(self._mac_terms), not_elastic=tuple(self._notes))
