"""Results files of the benchmarks: each script writes its figures to ``benchmarks/results/<script>.json``.

A results file holds the runs of one script, in the order they were recorded::

    {"script": "bench_core.py",
     "runs": [{"id": "...",                      # optional: lets a docs page place this run on its own
               "title": "...",                   # optional
               "command": "python benchmarks/bench_core.py --threads 2",   # or a list, one command per row
               "machine": "x86_64, 2 CPUs, torch 2.14.1, 2 threads",
               "source": "measured 2025-01-31" | "README tables as of <commit>",
               "tables": [{"title": "...", "columns": [...], "rows": [[cell, ...], ...], "notes": "..."}],
               "notes": "..."}]}

Cells are strings, formatted as the script prints them. A new run replaces the stored run with the
same command (re-running a benchmark updates its figures; it keeps the stored run's ``id`` and
``title``) and is appended otherwise. The documentation's benchmarks page renders these files when
it is built (``docs/hooks.py``), so the figures it shows are the files' figures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

RESULTS = Path(__file__).resolve().parent / "results"


def add_argument(ap: argparse.ArgumentParser) -> None:
    """``--results FILE``: where the run's figures go (default ``benchmarks/results/<script>.json``,
    except for ``--quick`` smoke runs, which write nothing unless given a file; ``-``: write nothing)."""
    ap.add_argument("--results", metavar="FILE", default=None,
                    help="write the figures to FILE (default: benchmarks/results/<script>.json; smoke runs "
                         "(--quick) write nothing unless FILE is given; '-': write nothing)")


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]], *, title: str | None = None,
          notes: str | None = None) -> dict[str, Any]:
    """One table of a run: column names and rows of cells (turned into strings)."""
    t: dict[str, Any] = {"title": title} if title else {}
    t.update(columns=[str(c) for c in columns], rows=[[str(c) for c in r] for r in rows])
    if notes:
        t["notes"] = notes
    return t


def markdown(t: dict[str, Any]) -> str:
    """The markdown of a :func:`table` (cells as stored, ``|`` escaped)."""
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(t["columns"]), "|" + "---|" * len(t["columns"]), *(line(r) for r in t["rows"])])


def machine(threads: int | None = None, device: str | None = None) -> str:
    """The machine in a few words: architecture, CPU count, torch version, threads, and the GPU when used."""
    import torch

    parts = [f"{platform.machine()} {platform.processor()}".strip(), f"{os.cpu_count()} CPUs",
             f"torch {torch.__version__}"]
    n = threads if threads is not None else torch.get_num_threads()
    parts.append(f"{n} thread" + ("" if n == 1 else "s"))
    if device and device.startswith("cuda") and torch.cuda.is_available():
        parts.append(torch.cuda.get_device_name(torch.device(device)))
    return ", ".join(parts)


def command(script: str, argv: Sequence[str] | None = None) -> str:
    """The command line that ran ``script``, as ``python benchmarks/<script> ARGS`` (without ``--results``)."""
    args, rest = [], list(sys.argv[1:] if argv is None else argv)
    while rest:
        a = rest.pop(0)
        if a == "--results":
            rest[:1] = []
        elif not a.startswith("--results="):
            args.append(a)
    return " ".join(["python", f"benchmarks/{Path(script).name}", *map(shlex.quote, args)])


def dumps(value: Any, indent: str = "") -> str:
    """JSON with one line per row: a list of plain values stays on one line, everything else is indented."""
    inner = indent + " "
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(k)}: {dumps(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(value, list) and value and any(isinstance(v, (dict, list)) for v in value):
        return "[\n" + ",\n".join(inner + dumps(v, inner) for v in value) + "\n" + indent + "]"
    return json.dumps(value, ensure_ascii=False)


def write(script: str, tables: list[dict[str, Any]], *, dest: str | None = None, quick: bool = False,
          machine_text: str | None = None, title: str | None = None, notes: str | None = None,
          argv: Sequence[str] | None = None) -> Path | None:
    """Record this run of ``script`` (its ``__file__``) in its results file; returns the path written.

    ``dest`` is the ``--results`` value (``None``: the default file; ``"-"``: nothing is written);
    a ``quick`` smoke run writes only to an explicit ``dest``.
    """
    if dest == "-" or (quick and dest is None):
        return None
    name = Path(script).name
    path = Path(dest) if dest else RESULTS / f"{Path(script).stem}.json"
    doc: dict[str, Any] = {"script": name, "runs": []}
    if path.exists():
        doc = json.loads(path.read_text())
    run: dict[str, Any] = {"command": command(script, argv), "machine": machine_text or machine(),
                           "source": f"measured {datetime.date.today().isoformat()}", "tables": tables}
    if title:
        run["title"] = title
    if notes:
        run["notes"] = notes
    runs = doc.setdefault("runs", [])
    for i, old in enumerate(runs):
        if old.get("command") == run["command"]:
            for key in ("id", "title"):
                if key in old and key not in run:
                    run[key] = old[key]
            runs[i] = run
            break
    else:
        runs.append(run)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(dumps(doc) + "\n")
    os.replace(tmp, path)
    print(f"results: {path}", flush=True)
    return path
