"""The search space: named dimensions, nested choices, presets, MACs and search-free selection.

A sub-network configuration is a JSON-native dict::

    {"width": {group: channels}, "heads": {group: heads}, "depth": {stage: blocks},
     "modules": {group: parallel modules}}

Missing entries mean full size. A float in place of a dict applies one ratio to every
group or stage of that dimension (``{"width": 0.5}``), rounded to the nearest choice.
Choices are nested: a smaller choice keeps a prefix of the channels, heads or blocks of
a larger one, so the sub-networks are sorted (SortedNet, arXiv 2309.00255, Section 3),
and the largest sub-network under a budget is found by walking them in order, without
a search (SortedNet's search-free extraction).

MACs are multiply-accumulates of convolutions, linear layers and attention matmuls for
one sample, the figure ``torch.utils.flop_counter.FlopCounterMode`` reports as FLOPs / 2
(norms, activations and adds are not counted).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

from .modules import SWITCH_PREFIX
from .plan import KIND_DIM, Axis, ElasticState, Plan, Segments, stage_outputs

__all__ = ["SearchSpace", "PRESET_RATIOS", "Config", "Budget", "parse_budget"]

Config = dict[str, dict[str, int]]

#: (width, heads, depth) ratios of the named presets, largest first.
PRESET_RATIOS: dict[str, tuple[float, float, float]] = {
    "full": (1.0, 1.0, 1.0),
    "large": (0.75, 0.75, 1.0),
    "medium": (0.5, 0.5, 0.75),
    "small": (0.5, 0.5, 0.5),
    "tiny": (0.25, 0.25, 0.0),
}


def _nearest(choices: list[int], target: float) -> int:
    return min(choices, key=lambda c: (abs(c - target), -c))


class SearchSpace:
    """Dimensions and nested choices of one elastic model.

    Args:
        plan: the model's plan.
    """

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        by_dim: dict[str, dict[str, list[int]]] = {"width": {}, "heads": {}, "modules": {}}
        for g in plan.groups:
            by_dim[KIND_DIM.get(g.kind, "width")][g.name] = list(g.choices)
        self.width, self.heads, self.modules = by_dim["width"], by_dim["heads"], by_dim["modules"]
        self.depth = {s.name: list(s.choices) for s in plan.stages}
        self._size = {g.name: g.size for g in plan.groups}
        self._unit = {g.name: g.unit for g in plan.groups}
        self._constraint = {g.name: (g.step, g.constraint or "") for g in plan.groups}
        blocks: dict[str, tuple[str, int]] = {}
        layer_of: dict[str, str] = {}  # tensor fqn -> its layer block, for layers inside one module
        for s in plan.stages:
            for b, r in zip(s.blocks, s.ranks()):
                blocks[b] = (s.name, r)
            for b, names in zip(s.blocks, s.tensors or ()):
                layer_of.update(dict.fromkeys(names, b))

        self._blocks = blocks
        self._layer_of = layer_of
        chain = self._chain
        self._segs: dict[str, list[tuple[str | None, int]]] = {}  # key of a segmented factor -> (group, channels)
        self._gate = stage_outputs(plan.stages)  # group -> (stage, rank) of the dense-stage block it is the output of
        self._terms = [(int(t.macs), [self._factor(x) for x in t.factors], chain(t.owner)) for t in plan.mac_terms]
        self._params = []
        for fqn, info in plan.tensors.items():
            if not info.param or fqn.rsplit(".", 1)[-1].startswith(SWITCH_PREFIX):
                continue
            n = 1
            for d in info.shape:
                n *= int(d)
            groups = [self._factor(a) for a in info.axes.values()]
            self._params.append((n, groups, chain(layer_of.get(fqn, fqn.rsplit(".", 1)[0]))))
        self.presets = self._make_presets()

    def _factor(self, f: "str | Axis | Segments") -> str:
        """A MAC or parameter factor (a group name, a tensor's :class:`~elasticize.plan.types.Axis`) as a key of
        :meth:`_ratios`: a group name, or for :class:`~elasticize.plan.types.Segments` (a concatenation of
        groups) a key whose ratio is their active channels over their full size."""
        if isinstance(f, str):
            return f
        if not isinstance(f, Segments):
            return f.group
        key = "\0segments:" + repr(f.to_json())
        if key not in self._segs:
            self._segs[key] = [(None, p) if isinstance(p, int) else (p.group, p.chunks * (self._size[p.group] // p.div))
                               for p in f.parts]
        return key

    def block_of(self, path: str) -> tuple[str, int] | None:
        """(stage, rank) of the innermost depth block that contains module ``path``, or None.

        The block runs at stage depth ``d`` iff ``rank < d`` (see :meth:`elasticize.plan.Stage.ranks`).
        """
        chain = self._chain(path)
        return chain[0] if chain else None

    def _chain(self, path: str) -> tuple[tuple[str, int], ...]:
        """(stage, rank) of every depth block that contains ``path`` (a module path or a layer name), innermost first."""
        out = []
        while True:
            if path in self._blocks:
                out.append(self._blocks[path])
            if "." not in path:
                return tuple(out)
            path = path.rsplit(".", 1)[0]

    def kept(self, path: str, cfg: Config) -> bool:
        """Whether module ``path`` runs in the (resolved) sub-network ``cfg``."""
        return self._kept(self._chain(path), cfg)

    def kept_tensor(self, fqn: str, cfg: Config) -> bool:
        """Whether tensor ``fqn`` is used by the (resolved) sub-network ``cfg`` (its module runs, and its layer)."""
        return self._kept(self._chain(self._layer_of.get(fqn, fqn.rpartition(".")[0])), cfg)

    # ------------------------------------------------------------------ configs
    @property
    def dimensions(self) -> dict[str, dict[str, list[int]]]:
        """``{"width": {group: choices}, "heads": {...}, "depth": {stage: choices}, "modules": {...}}``, largest first.

        ``"modules"`` (parallel modules of TAC blocks, Subnetwork-to-go's width) is present
        only when the model has such blocks, so files of models without them are unchanged.
        """
        dims = {"width": dict(self.width), "heads": dict(self.heads), "depth": dict(self.depth)}
        if self.modules:
            dims["modules"] = dict(self.modules)
        return dims

    def full(self) -> Config:
        """The largest sub-network (the original model)."""
        return {dim: {k: c[0] for k, c in table.items()} for dim, table in self.dimensions.items()}

    def uniform(self, width: float = 1.0, heads: float = 1.0, depth: float = 1.0, modules: float = 1.0) -> Config:
        """The configuration nearest to one ratio per dimension, for every group and stage."""
        cfg: Config = {d: {} for d in self.dimensions}
        for g, ch in self.width.items():
            cfg["width"][g] = _nearest(ch, width * ch[0])
        for g, ch in self.heads.items():
            cfg["heads"][g] = _nearest(ch, heads * ch[0])
        for g, ch in self.modules.items():
            cfg["modules"][g] = _nearest(ch, modules * ch[0])
        for s, ch in self.depth.items():
            cfg["depth"][s] = _nearest(ch, depth * ch[0]) if depth < 1.0 else ch[0]
        return cfg

    def resolve(self, cfg: str | Mapping[str, Any] | None) -> Config:
        """A full, validated configuration from a preset name, a (partial) config, or None (full).

        Raises:
            KeyError: for an unknown preset, dimension, group or stage; the message lists the known ones.
            ValueError: for a value outside the search space; the message lists the choices.
            TypeError: for a value of the wrong type.
        """
        if cfg is None:
            return self.full()
        if isinstance(cfg, str):
            if cfg not in self.presets:
                raise KeyError(f"no preset {cfg!r}; presets: {list(self.presets)}")
            return {d: dict(v) for d, v in self.presets[cfg].items()}
        if not isinstance(cfg, Mapping):
            raise TypeError(f"a sub-network is a preset name or a dict like {{'width': 0.5}}, not {type(cfg).__name__}")
        out = self.full()
        tables = self.dimensions
        for dim, value in cfg.items():
            if dim not in tables:
                raise KeyError(f"unknown dimension {dim!r}; dimensions: {list(tables)}")
            table = tables[dim]
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if not 0.0 <= float(value) <= 1.0:
                    raise ValueError(f"the ratio for {dim!r} must be in [0, 1], got {value}")
                out[dim].update(self.uniform(**{dim: float(value)})[dim])
                continue
            if not isinstance(value, Mapping):
                raise TypeError(f"{dim!r} takes a ratio or a dict of {{name: size}}, not {type(value).__name__}")
            for name, v in value.items():
                if name not in table:
                    raise KeyError(f"unknown {dim} entry {name!r}; known: {list(table)}")
                if isinstance(v, bool) or not isinstance(v, int):
                    raise TypeError(f"{dim} of {name!r} must be an int, one of {table[name]}; got {v!r}")
                step, why = self._constraint.get(name, (1, ""))
                if dim == "heads" and v % step:
                    raise ValueError(f"heads {v} for {name!r} breaks a constraint: {why or f'a multiple of {step}'}; "
                                     f"choose one of {table[name]}")
                if v not in table[name]:
                    raise ValueError(f"{dim} {v} for {name!r} is outside the search space; choose one of {table[name]}")
                out[dim][name] = v
        return out

    def apply(self, state: ElasticState, cfg: Config) -> None:
        """Set the live switches to a resolved configuration (integer stores only)."""
        groups, stages = state.groups, state.stages
        for g, v in cfg["width"].items():
            groups[g].active = v
        for g, v in [*cfg["heads"].items(), *cfg.get("modules", {}).items()]:
            gs = groups[g]
            gs.active = v * gs.unit
        for s, v in cfg["depth"].items():
            stages[s].set(v)

    # ------------------------------------------------------------------ costs
    def _ratios(self, cfg: Config) -> dict[str, float]:
        r = {g: v / self._size[g] for g, v in cfg["width"].items()}
        r.update({g: v * self._unit[g] / self._size[g] for g, v in [*cfg["heads"].items(),
                                                                     *cfg.get("modules", {}).items()]})
        depth, gate = cfg["depth"], self._gate
        for key, segs in self._segs.items():  # a skipped dense layer's segment has 0 channels
            r[key] = sum(n * (0.0 if g in gate and gate[g][1] >= depth.get(gate[g][0], 1 << 30) else r.get(g, 1.0))
                         if g else n for g, n in segs) / max(1, sum(n for _, n in segs))
        return r

    @staticmethod
    def _kept(chain: tuple[tuple[str, int], ...], cfg: Config) -> bool:
        return all(rank < cfg["depth"].get(stage, 1 << 30) for stage, rank in chain)

    def macs(self, cfg: str | Mapping[str, Any] | None = None) -> int:
        """Multiply-accumulates per sample of a sub-network (conv, linear, attention matmuls)."""
        return int(round(self._macs_raw(self.resolve(cfg))))

    def params(self, cfg: str | Mapping[str, Any] | None = None) -> int:
        """Number of parameters (elements) of the extracted sub-network."""
        return int(round(self._scaled_sum(self._params, self.resolve(cfg))))

    # ------------------------------------------------------------------ presets and selection
    def _make_presets(self) -> dict[str, Config]:
        out: dict[str, Config] = {}
        seen = []
        for name, (w, h, d) in PRESET_RATIOS.items():
            cfg = self.uniform(width=w, heads=h, depth=d, modules=w)
            if cfg in seen:
                continue
            seen.append(cfg)
            out[name] = cfg
        order = sorted(out, key=lambda n: -self._macs_raw(out[n]))
        return {n: out[n] for n in order}

    def add_preset(self, name: str, cfg: str | Mapping[str, Any] | None, *, replace: bool = False) -> Config:
        """Name a sub-network: it becomes a preset (kept sorted by MACs), saved in the manifest.

        Raises:
            ValueError: an empty name, or a name already used (pass ``replace=True``; ``full``
                can never be replaced).
            KeyError, TypeError: a configuration outside the search space (see :meth:`resolve`).
        """
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"a preset name is a non-empty string, not {name!r}")
        if name == "full" or (name in self.presets and not replace):
            raise ValueError(f"preset {name!r} exists; choose another name" +
                             ("" if name == "full" else " or pass replace=True"))
        resolved = self.resolve(cfg)
        presets = dict(self.presets)
        presets[name] = resolved
        self.presets = {n: presets[n] for n in sorted(presets, key=lambda n: -self._macs_raw(presets[n]))}
        return resolved

    def _macs_raw(self, c: Config) -> float:
        return self._scaled_sum(self._terms, c)

    def _scaled_sum(self, items: list[tuple[int, list[str], tuple[tuple[str, int], ...]]], c: Config) -> float:
        """Sum of ``count * prod(active / size)`` over the items whose block runs in ``c``."""
        r = self._ratios(c)
        total = 0.0
        for macs, factors, block in items:
            if self._kept(block, c):
                f = float(macs)
                for g in factors:
                    f *= r.get(g, 1.0)
                total += f
        return total

    def candidates(self) -> list[Config]:
        """Nested uniform sub-networks (one choice index per dimension), largest MACs first."""
        import itertools

        tables = self.dimensions
        lengths = [max([len(c) for c in t.values()] or [1]) for t in tables.values()]
        out: list[Config] = []
        seen: set[tuple] = set()
        for idx in itertools.product(*(range(n) for n in lengths)):
            cfg: Config = {dim: {g: c[min(i, len(c) - 1)] for g, c in t.items()}
                           for (dim, t), i in zip(tables.items(), idx)}
            key = tuple(tuple(v.values()) for v in cfg.values())
            if key not in seen:
                seen.add(key)
                out.append(cfg)
        out.sort(key=lambda c: -self._macs_raw(c))
        return out

    def select(self, *, max_macs: int | None = None, max_params: int | None = None) -> Config:
        """The largest nested sub-network within a budget, found without a search.

        Args:
            max_macs: upper bound on MACs per sample.
            max_params: upper bound on parameters.

        Returns:
            The configuration with the most MACs that meets every bound.

        Raises:
            ValueError: if no bound is given, or no sub-network meets them (the message
                gives the smallest sub-network's MACs and params).
        """
        if max_macs is None and max_params is None:
            raise ValueError("give max_macs and/or max_params")
        cands = self.candidates()
        for c in cands:
            if (max_macs is None or self.macs(c) <= max_macs) and (max_params is None or self.params(c) <= max_params):
                return c
        smallest = cands[-1]
        raise ValueError(f"no sub-network meets max_macs={max_macs}, max_params={max_params}; the smallest has "
                         f"{self.macs(smallest):,} MACs and {self.params(smallest):,} params")


# --------------------------------------------------------------------------- budgets
_SCALE = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_TIME = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6}
_BUDGET = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*(%|[A-Za-zµ]*)\s*")


@dataclass(frozen=True)
class Budget:
    """A budget as the user wrote it: an absolute amount, or a share of the full network's.

    Attributes:
        amount: MACs per sample, parameters, or seconds per batch; or, when ``share``, the fraction
            of the full network's (0.4 for ``40%``).
        share: whether ``amount`` is a fraction of the full network's.
        text: what the user wrote.
        kind: ``"macs"``, ``"params"`` or ``"latency"`` (what :func:`parse_budget` read it as).
    """

    amount: float
    share: bool
    text: str
    kind: str = "macs"

    def resolve(self, full: float) -> float:
        """The absolute budget, given the full network's amount (same unit)."""
        return self.amount * full if self.share else self.amount

    def describe(self, full: float, unit: str) -> str:
        """One line saying what the budget came to, e.g. ``40% of 1.82G MACs = 729.6M MACs``."""
        value = self.resolve(full)
        return f"{self.text} of {_short(full)} {unit} = {_short(value)} {unit}" if self.share else \
            f"{_short(value)} {unit}"


def _short(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.4g}{unit}"
    return f"{n:.4g}"


def parse_budget(text: str | float, *, kind: str) -> Budget:
    """Read a budget: ``50M``, ``1.2G``, ``2.5e9`` or ``40%`` (of the full network) for MACs and
    parameters; ``5ms``, ``0.005s``, ``800us`` or a share for latency (seconds per batch).

    Args:
        text: the budget, or a plain number.
        kind: ``"macs"``, ``"params"`` or ``"latency"``.

    Returns:
        The :class:`Budget`.

    Raises:
        ValueError: text that is not a budget of that kind, a share outside (0, 100]%, or an
            amount that is not positive and finite; the message gives examples.
    """
    units = _TIME if kind == "latency" else _SCALE
    example = "5ms, 0.005s or 50%" if kind == "latency" else "50M, 1.2G, 2.5e9 or 40%"
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        text = repr(float(text))
    m = _BUDGET.fullmatch(str(text))
    suffix = m.group(2).lower() if m else ""
    if m is None or (suffix != "%" and suffix not in units):
        raise ValueError(f"{str(text)[:40]!r} is not a {kind} budget; write e.g. {example}")
    value = float(m.group(1))
    if suffix == "%":
        if not 0 < value <= 100:
            raise ValueError(f"{text!r}: a share of the full network must be in (0, 100]%")
        return Budget(value / 100, True, str(text).strip(), kind)
    amount = value * units[suffix]
    if not (math.isfinite(amount) and amount > 0):
        raise ValueError(f"{str(text)[:40]!r} is not a positive, finite budget; write e.g. {example}")
    return Budget(amount, False, str(text).strip(), kind)
