"""What ``elasticize eval`` shows and writes of a measurement record: a rich table, CSV, JSON, a Pareto plot."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

__all__ = ["table", "write_csv", "write_json", "plot_pareto", "COLUMNS"]

#: The CSV columns besides the metric.
COLUMNS = ("name", "macs", "params", "latency_s", "peak_bytes", "config")


def _rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    metric = record["metric"]
    return [{"name": r["name"] or "(candidate)", "macs": r["macs"], "params": r["params"], metric: r[metric],
             "latency_s": r.get("latency_s"), "peak_bytes": r.get("peak_bytes"),
             "config": json.dumps(r["config"], separators=(",", ":"))} for r in record["results"]]


def table(record: dict[str, Any], full_macs: int) -> Any:
    """A :class:`rich.table.Table` of the record, one row per sub-network, largest MACs first."""
    from rich.table import Table

    metric = record["metric"]
    t = Table(title=f"measured on {record['device']}, batch {record['batch_size']}, {record['threads']} threads "
                    f"(calibration: {record.get('calibration', 'none')})")
    for col in ("sub-network", "MACs", "% of full", "params", metric, "latency", "peak memory"):
        t.add_column(col, justify="left" if col == "sub-network" else "right")
    for r in sorted(record["results"], key=lambda r: -r["macs"]):
        lat = r.get("latency_s")
        t.add_row(r["name"] or "(candidate)", f"{r['macs']:,}", f"{100 * r['macs'] / max(full_macs, 1):.1f}",
                  f"{r['params']:,}", f"{r[metric]:.4f}", "" if lat is None else f"{1e3 * lat:.3f} ms",
                  "" if r.get("peak_bytes") is None else f"{r['peak_bytes'] / 2**20:.1f} MiB")
    return t


def _text_csv(record: dict[str, Any]) -> str:
    buf = io.StringIO()
    rows = _rows(record)
    w = csv.DictWriter(buf, fieldnames=["name", "macs", "params", record["metric"], "latency_s", "peak_bytes", "config"])
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def write_csv(record: dict[str, Any], path: str, *, overwrite: bool = False) -> Path:
    """Write the record as CSV (one row per sub-network; ``config`` as JSON), atomically.

    Raises:
        FileExistsError, FileNotFoundError, PermissionError, OSError: see :func:`elasticize._files.atomic_write`.
    """
    from .._files import atomic_write

    text = _text_csv(record)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), overwrite=overwrite)


def write_json(record: dict[str, Any], path: str, *, overwrite: bool = False) -> Path:
    """Write the record as JSON, atomically. Errors as :func:`write_csv`."""
    from .._files import atomic_write

    text = json.dumps(record, indent=1)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), overwrite=overwrite)


def plot_pareto(record: dict[str, Any], path: str, *, x: str = "macs", overwrite: bool = False) -> Path:
    """Draw the metric against MACs (or ``x="latency_s"``) with the Pareto front and the presets named (matplotlib).

    Raises:
        ImportError: matplotlib is not installed (``pip install elasticize[plot]``).
        KeyError: ``x`` is not a measured column.
        FileExistsError, FileNotFoundError, PermissionError, OSError: as :func:`write_csv`.
    """
    from .._files import atomic_write

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("--plot needs matplotlib: pip install 'elasticize[plot]'") from e
    metric, rows = record["metric"], record["results"]
    if any(x not in r for r in rows):
        raise KeyError(f"--plot-x {x}: not measured (measure latency, or plot against macs)")
    pts = sorted(rows, key=lambda r: r[x])
    front, best = [], float("-inf")
    for r in pts:
        if r[metric] > best:
            front.append(r)
            best = r[metric]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([r[x] for r in pts], [r[metric] for r in pts], s=12, c="0.6", label="measured")
    ax.plot([r[x] for r in front], [r[metric] for r in front], "-", c="C0", label="Pareto front")
    named = [r for r in pts if r["name"]]
    ax.scatter([r[x] for r in named], [r[metric] for r in named], s=30, c="C1", label="presets", zorder=3)
    for r in named:
        ax.annotate(r["name"], (r[x], r[metric]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("MACs per sample" if x == "macs" else "latency (s per batch)")
    ax.set_ylabel(metric)
    ax.set_title(f"{record['device']}, batch {record['batch_size']}")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120), overwrite=overwrite)
    finally:
        plt.close(fig)
