"""Picking a sub-network within a budget from what was measured.

:attr:`ElasticModel.measurements <elasticize.ElasticModel.measurements>` holds what ``elasticize eval``
(:func:`elasticize.measure.evaluate`) measured, one record per device and batch size::

    {"cpu/bs1": {"device": "cpu", "batch_size": 1, "threads": 2, "metric": "cosine",
                 "results": [{"name": "medium" | None, "config": {...}, "macs": 1234, "params": 99,
                              "cosine": 0.91, "latency_s": 0.0021, "peak_bytes": 123456}, ...]}}

``macs`` are multiply-accumulates per sample, ``latency_s`` seconds per batch of ``batch_size``,
``peak_bytes`` the peak memory of one forward (bytes). :func:`best_measured` is the pick of
:meth:`ElasticModel.select <elasticize.ElasticModel.select>` when they exist, so a budget never picks
blind.
"""

from __future__ import annotations

from typing import Any

__all__ = ["measurement_key", "best_measured", "best_preset", "full_latency"]


def measurement_key(device: str, batch_size: int) -> str:
    """The key of one device's and batch size's measurements, e.g. ``"cpu/bs1"``."""
    return f"{device}/bs{int(batch_size)}"


def full_latency(em: Any, key: str | None = None) -> tuple[float | None, str]:
    """The full network's measured latency (seconds per batch) that a share budget (``--max-latency 50%``) is of.

    It is taken from the measurement record that :meth:`ElasticModel.select <elasticize.ElasticModel.select>`
    picks from (``key``, default the first): its ``full`` row, measured by ``elasticize eval``; a file
    without measurements falls back to the training metrics (``elasticize train --latency``).

    Args:
        em: the :class:`~elasticize.ElasticModel`.
        key: the measurement (:func:`measurement_key`; default the first).

    Returns:
        ``(seconds or None when nothing measured it, where it came from)``.
    """
    if em.measurements:
        key = key if key is not None else next(iter(em.measurements))
        rows = em.measurements.get(key, {}).get("results", [])
        full = em.space.full()
        lat = next((r.get("latency_s") for r in rows if r.get("name") == "full" or em.resolve(r["config"]) == full), None)
        return (None if lat is None else float(lat)), f"measurement {key}"
    lat = (em.metrics.get("full") or {}).get("latency_s")
    return (None if lat is None else float(lat)), "training metrics"


def best_measured(em: Any, *, max_macs: int | None, max_params: int | None, max_latency_s: float | None,
                  metric: str | None, key: str | None) -> dict:
    """The measured sub-network with the best metric within every bound (ties: more MACs).

    Args:
        em: the :class:`~elasticize.ElasticModel` with :attr:`measurements`.
        max_macs: bound on MACs per sample.
        max_params: bound on parameters.
        max_latency_s: bound on the measured seconds per batch.
        metric: the metric to maximise (default: the one the measurement was taken with).
        key: which measurement (:func:`measurement_key`; default the first).

    Returns:
        The resolved configuration.

    Raises:
        ValueError: no bound, an unknown ``key`` or ``metric``, or nothing measured within the bounds
            (the message gives the smallest measured sub-network).
    """
    if max_macs is None and max_params is None and max_latency_s is None:
        raise ValueError("give max_macs, max_params and/or max_latency_s")
    keys = list(em.measurements)
    if key is None:
        key = keys[0]
    if key not in em.measurements:
        raise ValueError(f"no measurement {key!r}; measured: {keys}")
    record = em.measurements[key]
    metric = metric or record["metric"]
    rows = [r for r in record["results"] if metric in r]
    if not rows:
        raise ValueError(f"measurement {key!r} has no metric {metric!r}; it measured {record['metric']!r}")
    ok = [r for r in rows
          if (max_macs is None or em.macs(r["config"]) <= max_macs)
          and (max_params is None or em.params(r["config"]) <= max_params)
          and (max_latency_s is None or r.get("latency_s", float("inf")) <= max_latency_s)]
    if not ok:
        small = min(rows, key=lambda r: em.macs(r["config"]))
        raise ValueError(f"no measured sub-network meets max_macs={max_macs}, max_params={max_params}, "
                         f"max_latency_s={max_latency_s} ({key}); the smallest measured has {em.macs(small['config']):,} "
                         f"MACs, {em.params(small['config']):,} params, {small.get('latency_s', float('nan')):.3g} s")
    best = max(ok, key=lambda r: (r[metric], em.macs(r["config"])))
    return em.resolve(best["config"])


def best_preset(em: Any, max_macs: int | None, max_params: int | None, max_latency_s: float | None,
                metric: str | None) -> str:
    """The measured preset (:attr:`~elasticize.ElasticModel.metrics`, filled by training) with the best
    ``metric`` within every bound (ties: more MACs); without ``metric`` the one with the most MACs.

    Raises:
        ValueError: no bound given, or no measured preset meets them; the message says which presets
            were measured.
    """
    if max_macs is None and max_params is None and max_latency_s is None:
        raise ValueError("give max_macs, max_params and/or max_latency_s")
    need = [k for k in (metric, "latency_s" if max_latency_s is not None else None) if k]
    measured = [n for n in em.presets if all(k in em.metrics.get(n, {}) for k in need)]
    ok = [n for n in measured
          if (max_macs is None or em.macs(n) <= max_macs) and (max_params is None or em.params(n) <= max_params)
          and (max_latency_s is None or em.metrics[n]["latency_s"] <= max_latency_s)]
    if not ok:
        raise ValueError(f"no measured preset meets max_macs={max_macs}, max_params={max_params}, "
                         f"max_latency_s={max_latency_s}; presets measured for {need}: {measured or 'none'} "
                         "(measure them with elasticize.train.Trainer.evaluate)")
    key = (lambda n: (em.metrics[n][metric], em.macs(n))) if metric else (lambda n: em.macs(n))
    return max(ok, key=key)


