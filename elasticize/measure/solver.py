"""A budget solver over non-uniform sub-networks: per-group sensitivities, then a mixed-integer program.

1. **Sensitivity** (:func:`sensitivities`): for every width/heads group and depth stage ``g`` and each of
   its choices ``k``, the metric drop ``d[g, k] = m(full) - m(full with g at k)`` on calibration data,
   everything else full (with bias compensation and, for BatchNorm models, BN recalibration on two
   batches). ModelOpt's Puzzletron scores blocks the same way, one at a time.
2. **Program** (:func:`solve`): one-hot variables ``x[g, k]`` per group, ``sum_k x[g, k] = 1``, minimise the
   predicted drop ``sum d[g, k] x[g, k]`` subject to ``sum c[g, k] x[g, k] <= B - C(full)``, solved by
   ``scipy.optimize.milp`` (HiGHS), where ``c[g, k] = C(full with g at k) - C(full)`` is the cost change of
   that one group alone (MACs per sample or parameters).

MACs are not additive across coupled groups: a layer between two groups costs ``C r1 r2``, a block in a
stage ``C r d``. With every ratio in ``[0, 1]``, ``r1 r2 >= r1 + r2 - 1``, so the separable cost is an
upper bound of the true one and every solution is within the budget; the solver then *checks* the
true cost with the plan's ``mac_terms`` and loosens the linear budget by the slack, a few times,
keeping the best pick within the true budget. Choices are nested, so a pick still cuts the same weights.

3. **Check and refine** (:func:`solve_checked`, :func:`refine`): the best picks are measured, and the
   best measured one (or the smallest uniform sub-network over the budget, if it measures better) is
   the point the drops are measured around again, every group moved up or down one choice from it,
   and the program solved once more with those local changes. On all-MiniLM-L6-v2
   (``benchmarks/bench_measured.py``) the program from the full network's drops picked 2 or 3 layers
   at 25% of the MACs with the default choices, which measured below the uniform sub-network; with
   finer choices it keeps all 6 layers, and the checked, refined pick scores 0.638 against 0.296
   for the best uniform sub-network within the budget (refining adds 0.006 of it).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

__all__ = ["sensitivities", "solve", "solve_checked", "solve_latency", "refine", "budget_name", "uniform_candidates"]


def _units(em: Any) -> list[tuple[str, str, list[int]]]:
    """(dimension, group or stage, choices) of every elastic group and stage."""
    return [(dim, name, list(ch)) for dim, table in em.space.dimensions.items() for name, ch in table.items()
            if len(ch) > 1]


def sensitivities(em: Any, score: Callable[[dict], float]) -> dict[str, Any]:
    """The metric drop of each group's and stage's choices, one at a time (everything else full).

    Args:
        em: the elastic model.
        score: ``config -> metric`` on calibration data, higher is better (see
            :func:`elasticize.measure.evaluate`, which passes BN recalibration and bias compensation in).

    Returns:
        ``{"base": m(full), "drops": {"dim/name": {choice: drop}}}`` (JSON-native keys).
    """
    full = em.space.full()
    base = score(full)
    drops: dict[str, dict[int, float]] = {}
    for dim, name, choices in _units(em):
        drops[f"{dim}/{name}"] = {}
        for k in choices[1:]:
            cfg = {d: dict(v) for d, v in full.items()}
            cfg[dim][name] = k
            drops[f"{dim}/{name}"][k] = base - score(cfg)
    return {"base": base, "drops": drops}


def solve(em: Any, sens: dict[str, Any], *, max_macs: float | None = None, max_params: float | None = None,
          rounds: int = 8, max_depths: int = 256, every_depth: bool = False) -> Any:
    """The per-group choices with the least predicted metric drop within the budget.

    Depth choices (few) are enumerated; for each, the width and heads choices are one
    ``scipy.optimize.milp`` program with their costs taken at that depth (see the module docstring).

    Args:
        em: the elastic model.
        sens: :func:`sensitivities`.
        max_macs: budget in MACs per sample.
        max_params: budget in parameters.
        rounds: check-and-adjust rounds per depth.
        max_depths: at most this many depth configurations (spread evenly) are tried.
        every_depth: return the best pick of every depth configuration, best predicted first
            (:func:`solve_checked` measures them), instead of the best one.

    Returns:
        ``(resolved configuration, predicted metric = base - sum of drops)``, or a list of them
        with ``every_depth``.

    Raises:
        ValueError: no bound, or no sub-network within it.
    """
    import itertools

    full = em.space.full()
    bounds = _bounds(em, max_macs, max_params)
    stages = [(name, ch) for dim, name, ch in _units(em) if dim == "depth"]
    combos = list(itertools.product(*[ch for _, ch in stages]))
    if len(combos) > max_depths:
        combos = [combos[round(i * (len(combos) - 1) / (max_depths - 1))] for i in range(max_depths)]
    picks: list[tuple[dict, float]] = []
    for combo in combos:
        base = {d: dict(v) for d, v in full.items()}
        drop = 0.0
        for (name, ch), k in zip(stages, combo):
            base["depth"][name] = k
            drop += sens["drops"].get(f"depth/{name}", {}).get(k, 0.0) if k != ch[0] else 0.0
        if any(fn(em.space.candidates()[-1] | {"depth": base["depth"]}) > b for b, fn in bounds):
            continue  # even the smallest widths at this depth are over
        pick = _solve_widths(em, sens, base, bounds, rounds)
        if pick is not None:
            picks.append((pick[0], pick[1] - drop))
    if not picks:
        smallest = em.space.candidates()[-1]
        raise ValueError(f"no sub-network within max_macs={max_macs}, max_params={max_params}; the smallest has "
                         f"{em.macs(smallest):,} MACs and {em.params(smallest):,} params")
    picks.sort(key=lambda p: -p[1])
    return picks if every_depth else picks[0]


def solve_checked(em: Any, sens: dict[str, Any], score: Callable[[dict], float], *, max_macs: float | None = None,
                  max_params: float | None = None, checks: int = 6, extra: Sequence[dict] = (),
                  refine_rounds: int = 3) -> tuple[dict, float]:
    """The solver's pick, checked by measuring: the best *measured* of the ``checks`` best predicted picks
    (one per depth configuration) and of ``extra`` candidates within the budget, then refined
    (:func:`refine`) from the better measured of that and the smallest uniform sub-network over the budget.

    The predicted metric adds one-at-a-time drops; it is poor where drops interact, above all a
    shallower network whose remaining layers are also narrowed (on MiniLM at 25% MACs it predicted
    a 2-layer pick whose measured cosine to the original was 0.24, below the uniform 0.54). So each depth's
    pick is measured with ``score`` (the calibration data) and the best measured one is returned.

    Args:
        em: the elastic model.
        sens: :func:`sensitivities`.
        score: ``config -> metric`` on calibration data, higher is better.
        max_macs: budget in MACs per sample.
        max_params: budget in parameters.
        checks: how many of the best predicted picks are measured.
        extra: more configurations to measure against them (e.g. the largest uniform ones within the
            budget); those over the budget are left out.
        refine_rounds: :func:`refine` rounds (0: the best measured pick as it is).

    Returns:
        ``(resolved configuration, its measured metric)``.

    Raises:
        ValueError: as :func:`solve`.
    """
    picks = [c for c, _ in solve(em, sens, max_macs=max_macs, max_params=max_params, every_depth=True)[:max(checks, 1)]]
    bounds = _bounds(em, max_macs, max_params)
    for c in extra:
        c = em.resolve(c)
        if _within(c, bounds) and c not in picks:
            picks.append(c)
    scored = [(c, score(c)) for c in picks]
    best = max(scored, key=lambda p: p[1])
    if refine_rounds <= 0:
        return best
    over = [c for c in em.space.candidates() if not _within(c, bounds)]
    start = best
    if over:  # candidates() runs from largest to smallest: the last over the budget is the nearest above it
        above = (over[-1], score(over[-1]))
        start = above if above[1] > best[1] else best
    try:
        refined = refine(em, score, start[0], max_macs=max_macs, max_params=max_params, rounds=refine_rounds)
    except ValueError:  # from a start over the budget, no round came within it: the checked pick stands
        return best
    return refined if refined[1] > best[1] else best


def _solve_widths(em: Any, sens: dict[str, Any], base: dict, bounds: list, rounds: int) -> tuple[dict, float] | None:
    """The width/heads choices at ``base``'s depths: ``(config, base metric - width drops)`` or None."""
    units = [(dim, name, ch) for dim, name, ch in _units(em) if dim != "depth" and f"{dim}/{name}" in sens["drops"]]
    drops = {(dim, name, k): 0.0 if k == ch[0] else sens["drops"][f"{dim}/{name}"][k]
             for dim, name, ch in units for k in ch}
    return _milp(em, units, drops, base, sens["base"], bounds, rounds)


def _milp(em: Any, units: list, drops: dict, base: dict, base_metric: float, bounds: list,
          rounds: int) -> tuple[dict, float] | None:
    """One-hot choices of ``units`` with the least summed ``drops`` (``(dim, name, choice) -> drop``,
    0 at ``base``'s own choice) within ``bounds``, costs taken one unit at a time from ``base``;
    the true cost is checked and the linear budget adjusted by the gap, ``rounds`` times.

    Returns:
        ``(config, base_metric - drops of the pick)``, or None when no round's pick is within the bounds.
    """
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    var = [(dim, name, k) for dim, name, ch in units for k in ch]
    if not var:
        cfg = em.resolve(base)
        return (cfg, base_metric) if _within(cfg, bounds) else None
    obj = np.array([drops[v] for v in var], dtype=float)
    eq = np.zeros((len(units), len(var)))
    col = 0
    for i, (_, _, ch) in enumerate(units):
        eq[i, col:col + len(ch)] = 1
        col += len(ch)
    deltas = [np.array([fn(_one(base, dim, name, k)) - fn(base) for dim, name, k in var], dtype=float)
              for _, fn in bounds]
    slack = [b - fn(base) for b, fn in bounds]
    best: tuple[dict, float] | None = None
    for _ in range(rounds):
        rows = [LinearConstraint(eq, 1, 1)] + [LinearConstraint(d[None, :], -np.inf, s) for d, s in zip(deltas, slack)]
        res = milp(obj, constraints=rows, integrality=np.ones(len(var)), bounds=Bounds(0, 1))
        if res.x is None:
            break
        cfg = {d: dict(v) for d, v in base.items()}
        for (dim, name, k), x in zip(var, res.x):
            if x > 0.5:
                cfg[dim][name] = k
        cfg = em.resolve(cfg)
        gaps = [b - fn(cfg) for b, fn in bounds]
        if min(gaps) >= 0:
            pred = base_metric - float(obj @ np.round(res.x))
            if best is None or pred > best[1]:
                best = (cfg, pred)
            if max(gaps) <= 0:
                break
        slack = [s + g for s, g in zip(slack, gaps)]  # loosen by the true slack, or tighten by the excess
    return best


def refine(em: Any, score: Callable[[dict], float], start: dict, *, max_macs: float | None = None,
           max_params: float | None = None, rounds: int = 3, steps: int = 1) -> tuple[dict, float]:
    """Re-linearise around a sub-network and solve again: the budget solver's local step.

    One-at-a-time drops measured at the full network predict poorly far from it (at 25% of
    MiniLM's MACs every group is small, and the drops interact). Each round measures, around the
    current sub-network ``c``, the metric of ``c`` with one group or stage moved up or down by up to
    ``steps`` choices, and solves the same mixed-integer program with those changes
    (gains are negative drops) and the costs of each move from ``c`` (``scipy.optimize.milp``).
    ``start`` may be over the budget (e.g. the smallest uniform sub-network above it): the program
    moves it within. The measured best within the budget is kept; rounds stop when the pick repeats.

    Args:
        em: the elastic model.
        score: ``config -> metric`` on calibration data, higher is better.
        start: the configuration to start from.
        max_macs: budget in MACs per sample.
        max_params: budget in parameters.
        rounds: re-linearisations (each measures up to ``2 * steps`` moves of every group and stage).
        steps: how many choices up or down a group may move in one round.

    Returns:
        ``(resolved configuration, its measured metric)``: the best measured within the budget.

    Raises:
        ValueError: no bound, or no round found a sub-network within it.
    """
    bounds = _bounds(em, max_macs, max_params)
    units = _units(em)
    current = em.resolve(start)
    here = score(current)
    best = (current, here) if _within(current, bounds) else None
    for _ in range(max(rounds, 0)):
        near = [(dim, name, ch[max(i - steps, 0):i + steps + 1])
                for dim, name, ch in units for i in [ch.index(current[dim][name])]]
        drops = {(dim, name, k): 0.0 if k == current[dim][name] else here - score(_one(current, dim, name, k))
                 for dim, name, ch in near for k in ch}
        pick = _milp(em, near, drops, current, here, bounds, rounds=8)
        if pick is None or pick[0] == current:
            break
        current = pick[0]
        here = score(current)
        if best is None or here > best[1]:
            best = (current, here)
    if best is None:
        raise ValueError(f"no sub-network within max_macs={max_macs}, max_params={max_params} near {start}")
    return best


def solve_latency(em: Any, sens: dict[str, Any], score: Callable[[dict], float], seconds: Callable[[dict], float],
                  max_latency: float, *, steps: int = 7, refine_rounds: int = 3) -> tuple[dict, float, float]:
    """The solver's pick within a *measured* latency budget.

    Latency is not additive over groups the way MACs are, and measuring it per group and choice
    would cost hundreds of timings. So the MACs budget is the proxy that is searched: bisection
    (``steps`` rounds) over MACs budgets finds the largest one whose :func:`solve` pick measures
    within ``max_latency``; at that MACs budget :func:`solve_checked` picks (checked, refined), and
    its latency is measured again; a pick that times over the budget is replaced by the
    bisection's last pick that timed within it.

    Args:
        em: the elastic model.
        sens: :func:`sensitivities`.
        score: ``config -> metric`` on calibration data, higher is better.
        seconds: ``config -> measured latency`` in seconds (of the extracted sub-network, as
            ``elasticize eval`` times it).
        max_latency: the budget in seconds.
        steps: bisection rounds.
        refine_rounds: :func:`refine` rounds of the final pick.

    Returns:
        ``(resolved configuration, its measured metric, its measured seconds)``.

    Raises:
        ValueError: even the smallest sub-network measures over ``max_latency``.
    """
    smallest = em.space.candidates()[-1]
    lo_macs, hi_macs = float(em.macs(smallest)), float(em.macs(None))
    t_small = seconds(smallest)
    if t_small > max_latency:
        raise ValueError(f"the smallest sub-network takes {t_small * 1e3:.3g} ms, over the {max_latency * 1e3:.3g} ms "
                         "budget; give a larger latency budget (or time with more --threads)")
    within: tuple[dict, float] = (smallest, t_small)
    for _ in range(steps):
        mid = (lo_macs + hi_macs) / 2
        cfg = solve(em, sens, max_macs=mid)[0]
        t = seconds(cfg)
        if t <= max_latency:
            lo_macs, within = mid, (cfg, t)
        else:
            hi_macs = mid
    cfg, metric = solve_checked(em, sens, score, max_macs=lo_macs, refine_rounds=refine_rounds,
                                extra=[within[0]])
    t = seconds(cfg)
    if t > max_latency:
        cfg, t = within
        metric = score(cfg)
    return cfg, metric, t


def _bounds(em: Any, max_macs: float | None, max_params: float | None) -> list[tuple[float, Callable[[Any], float]]]:
    """``(budget, cost function)`` of each bound given.

    Raises:
        ValueError: neither is given.
    """
    if max_macs is None and max_params is None:
        raise ValueError("give max_macs and/or max_params")
    return [(float(b), fn) for b, fn in ((max_macs, em.macs), (max_params, em.params)) if b is not None]


def _within(cfg: Any, bounds: list[tuple[float, Callable[[Any], float]]]) -> bool:
    return all(fn(cfg) <= b for b, fn in bounds)


def _one(full: dict, dim: str, name: str, k: int) -> dict:
    cfg = {d: dict(v) for d, v in full.items()}
    cfg[dim][name] = k
    return cfg


def budget_name(text: str) -> str:
    """The preset name of a solver pick for budget ``text``: ``"25%"`` -> ``"budget-25"``, ``"50M"`` -> ``"budget-50M"``."""
    return "budget-" + "".join(ch for ch in text if ch.isalnum() or ch in ".-")


def uniform_candidates(em: Any, n: int, exclude: Sequence[dict] = ()) -> list[dict]:
    """Up to ``n`` nested uniform sub-networks spread evenly over :meth:`SearchSpace.candidates`, not in ``exclude``."""
    cands = [c for c in em.space.candidates() if c not in exclude]
    if n <= 0 or not cands:
        return []
    idx = sorted({round(i * (len(cands) - 1) / max(n - 1, 1)) for i in range(min(n, len(cands)))})
    return [cands[i] for i in idx]
