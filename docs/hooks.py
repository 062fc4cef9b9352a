"""MkDocs hooks of elasticize's documentation (``hooks:`` in mkdocs.yml). Two jobs:

* **API reference pages.** Every nav entry ``reference/<module>.md`` that has no file in ``docs/``
  is written at build time as ``# <module>`` and ``::: <module>`` (mkdocstrings renders the
  module, and its submodules for a package, from the docstrings). The nav is the one list of
  documented modules.
* **Benchmark figures.** A line ``<!-- results: NAME -->`` in a page is replaced by the tables of
  ``benchmarks/results/NAME.json`` (written by ``benchmarks/NAME.py``, see
  ``benchmarks/_results.py``); ``<!-- results: NAME#ID -->`` renders only the run whose ``id`` is
  ID, and the plain form renders the runs a page has not placed by id. A missing file or id stops
  the build, and a results file that no page shows is a warning (an error with ``--strict``).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.hooks.elasticize")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PLACEHOLDER = re.compile(r"^<!-- results: ([\w-]+)(?:#([\w-]+))? -->$", re.M)
_shown: set[str] = set()


def _nav_paths(nav: Any) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [p for item in nav for p in _nav_paths(item)]
    if isinstance(nav, dict):
        return [p for v in nav.values() for p in _nav_paths(v)]
    return []


def on_files(files: Any, config: Any) -> Any:
    for path in _nav_paths(config["nav"]):
        if path.startswith("reference/") and path.endswith(".md") and files.get_file_from_path(path) is None:
            module = path[len("reference/"):-len(".md")]
            files.append(File.generated(config, path, content=f"# `{module}`\n\n::: {module}\n"))
    return files


def on_pre_build(config: Any) -> None:
    _shown.clear()


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(t: dict[str, Any]) -> str:
    lines = []
    if t.get("title"):
        lines += [f"**{t['title']}**", ""]
    lines.append("| " + " | ".join(_cell(c) for c in t["columns"]) + " |")
    lines.append("|" + "---|" * len(t["columns"]))
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in t["rows"]]
    if t.get("notes"):
        lines += ["", t["notes"]]
    return "\n".join(lines)


def _run(run: dict[str, Any], with_title: bool) -> str:
    parts = [f"#### {run['title']}"] if with_title and run.get("title") else []
    parts += [_table(t) for t in run["tables"]]
    if run.get("notes"):
        parts.append(run["notes"])
    commands = run["command"] if isinstance(run["command"], list) else [run["command"]]
    meta = "; ".join(x for x in (run.get("machine"), run.get("source")) if x)
    if len(commands) == 1:
        parts.append(f"<small>`{commands[0]}` &middot; {meta}</small>")
    else:
        parts.append(f"<small>{meta}; one command per row:</small>\n\n" + "\n".join(f"- `{c}`" for c in commands))
    return "\n\n".join(parts)


def _load(name: str, page: Any) -> dict[str, Any]:
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        raise PluginError(f"{page.file.src_uri}: <!-- results: {name} --> but there is no {path.relative_to(ROOT)}")
    return json.loads(path.read_text())


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    placed = {(m.group(1), m.group(2)) for m in PLACEHOLDER.finditer(markdown) if m.group(2)}

    def render(m: re.Match) -> str:
        name, run_id = m.group(1), m.group(2)
        runs = _load(name, page)["runs"]
        if run_id:
            chosen = [r for r in runs if r.get("id") == run_id]
            if not chosen:
                raise PluginError(f"{page.file.src_uri}: no run with id {run_id!r} in benchmarks/results/{name}.json")
        else:
            chosen = [r for r in runs if (name, r.get("id")) not in placed]
        _shown.add(name)
        return "\n\n".join(_run(r, with_title=not run_id and len(chosen) > 1) for r in chosen)

    return OP_TABLE.sub(lambda m: _op_table(), PLACEHOLDER.sub(render, markdown))


OP_TABLE = re.compile(r"^<!-- op-table -->$", re.M)


def _op_table() -> str:
    """The audited op table (``elasticize.graph.ops.audit.rows``): handled ops grouped by handler, with how
    they couple axes; then the ops passed by, fixed and unsupported, grouped by reason. Generated from the
    handler registry and the sweep's data, so the page cannot drift from the code."""
    from elasticize.graph.ops.audit import rows

    groups: dict[tuple[str, str], list[str]] = {}
    for name, r in rows().items():
        key = (r.status, r.handler.removeprefix("elasticize.graph.ops.") if r.handler else r.how)
        groups.setdefault(key, []).append(name)
    how = {(r.status, r.handler.removeprefix("elasticize.graph.ops.") if r.handler else r.how): r.how
           for r in rows().values()}
    order = {"handled": 0, "passed by": 1, "fixed": 2, "unsupported": 3}
    out = ["| status | ops | how it couples axes, or why not |", "|---|---|---|"]
    for (status, key), names in sorted(groups.items(), key=lambda kv: (order[kv[0][0]], kv[0][1])):
        label = f"{status} (`{key}`)" if status == "handled" else status
        out.append(f"| {label} | {', '.join(f'`{n}`' for n in names)} | {_cell(how[(status, key)])} |")
    return "\n".join(out)


def on_post_build(config: Any) -> None:
    for path in sorted(RESULTS.glob("*.json")):
        if path.stem not in _shown:
            log.warning("benchmarks/results/%s is shown on no page: add <!-- results: %s --> to docs/benchmarks.md",
                        path.name, path.stem)
