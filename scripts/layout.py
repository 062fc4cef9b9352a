"""Print the package's size and import figures: the largest modules, classes and functions, and
every import cycle among ``elasticize`` modules (lazy imports inside functions count too).

    python scripts/layout.py            # the figures, largest first
    python scripts/layout.py --check    # exit 1 if a module > 500 lines, a class > 300, a function > 80, or a cycle

Lines are physical lines of the source, docstrings and comments included.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "elasticize"
LIMITS = {"module": 500, "class": 300, "function": 80}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(tree: ast.AST, name: str, is_pkg: bool, known: set[str]) -> set[str]:
    """The ``elasticize`` modules ``name`` imports (``from .x import y`` counts ``.x.y`` when that is a module)."""
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                mod = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def report() -> dict:
    files = sorted(PKG.rglob("*.py"))
    known = {_module_name(f) for f in files}
    modules, classes, functions, graph = [], [], [], {}
    for f in files:
        text = f.read_text()
        tree = ast.parse(text)
        name = _module_name(f)
        modules.append((len(text.splitlines()), name))
        graph[name] = _imports(tree, name, f.name == "__init__.py", known)
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                classes.append((node.end_lineno - node.lineno + 1, f"{name}.{node.name}"))
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((node.end_lineno - node.lineno + 1, f"{name}:{node.name} (line {node.lineno})"))
    # a package's __init__ importing its own submodules is not a cycle of the layout
    for name in graph:
        graph[name] = {t for t in graph[name] if not (t.startswith(name + ".") or name.startswith(t + ".")
                                                      and (PKG.parent / t.replace(".", "/") / "__init__.py").is_file())}
    return {"module": sorted(modules, reverse=True), "class": sorted(classes, reverse=True),
            "function": sorted(functions, reverse=True), "cycles": _cycles(graph)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when a limit is passed or there is a cycle")
    ap.add_argument("--top", type=int, default=5)
    args = ap.parse_args()
    r = report()
    bad = False
    for kind, limit in LIMITS.items():
        rows = r[kind]
        over = [x for x in rows if x[0] > limit]
        bad |= bool(over)
        plural = "classes" if kind == "class" else kind + "s"
        print(f"{plural}: {len(rows)}, largest {rows[0][0]} lines ({rows[0][1]}); over {limit}: {len(over)}")
        for n, what in (over or rows)[: args.top]:
            print(f"  {n:5d}  {what}")
    print(f"import cycles: {len(r['cycles'])}")
    for c in r["cycles"]:
        print("  " + " <-> ".join(c))
    bad |= bool(r["cycles"])
    return 1 if bad and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
