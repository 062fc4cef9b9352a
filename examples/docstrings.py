"""Real English sentences, offline: sentences of docstrings in the Python standard library and
in installed packages."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import random
import re
import sys
from pathlib import Path

MODULES = ("json", "os", "re", "string", "textwrap", "collections", "itertools", "functools", "pathlib", "shutil",
           "argparse", "logging", "datetime", "decimal", "fractions", "statistics", "random", "heapq", "bisect",
           "csv", "zipfile", "tarfile", "gzip", "socket", "threading", "subprocess", "unittest", "inspect", "ast",
           "typing", "dataclasses", "enum", "email", "http.client", "urllib.parse", "xml.dom.minidom", "sqlite3",
           "calendar", "difflib", "pprint", "tempfile", "glob", "fnmatch", "copy", "pickletools", "base64", "hashlib")

#: Standard-library modules never imported here: importing them opens windows or a browser, or prints.
_SIDE_EFFECTS = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "ensurepip", "venv", "lib2to3",
                 "pydoc_data"}
#: Sentences that are code or tables rather than prose.
_CODE = re.compile(r">>>|::|\$|[{}]|==|\w\(.*\)\s*->")


def stdlib_sentences(n: int | None = None, *, seed: int = 0, min_words: int = 5, every_sentence: bool = False,
                     modules: tuple[str, ...] | str = MODULES) -> list[str]:
    """Distinct sentences of stdlib docstrings (modules, classes, functions), shuffled with ``seed``.

    Args:
        n: how many (None: all found; about 2,000 first sentences of ``MODULES``, about 7,800
            sentences with ``every_sentence=True, modules="all"`` on Python 3.12).
        seed: shuffling seed, so that splits are reproducible.
        min_words: shortest sentence kept.
        every_sentence: every prose sentence of each docstring (starting with a capital letter,
            ending with ``.``, ``!`` or ``?``, no code) instead of the first sentence only.
        modules: module names, or ``"all"`` for every importable module of
            ``sys.stdlib_module_names`` (public names, minus the few with import side effects).
    """
    if modules == "all":
        modules = tuple(sorted(m for m in sys.stdlib_module_names if not m.startswith("_") and m not in _SIDE_EFFECTS))
    seen: dict[str, None] = {}
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - platform modules (winreg, msvcrt...) and optional C extensions
            continue
        objs = [mod] + [v for _, v in inspect.getmembers(mod) if inspect.isclass(v) or inspect.isroutine(v)]
        for cls in [o for o in objs if inspect.isclass(o)]:
            objs += [v for _, v in inspect.getmembers(cls) if inspect.isroutine(v)]
        for obj in objs:
            doc = inspect.getdoc(obj) or ""
            if not every_sentence:
                first = re.split(r"(?<=[.!?])\s", " ".join(doc.split("\n\n")[0].split()), maxsplit=1)[0].strip()
                if len(first.split()) >= min_words and first[0].isalpha():
                    seen[first] = None
                continue
            _prose(doc, seen, min_words)
    out = sorted(seen)
    random.Random(seed).shuffle(out)
    return out if n is None else out[:n]


def _prose(doc: str, seen: dict[str, None], min_words: int) -> None:
    """Add every prose sentence of ``doc`` to ``seen``: capitalised, ending in ``.!?``, no code."""
    for para in doc.split("\n\n"):
        for s in re.split(r"(?<=[.!?])\s", " ".join(para.split())):
            s = s.strip()
            if len(s.split()) >= min_words and s[0].isupper() and s[-1] in ".!?" and not _CODE.search(s):
                seen[s] = None


#: Installed packages whose docstrings :func:`package_sentences` reads by default (those present).
PACKAGES = ("numpy", "scipy", "sklearn", "torch", "transformers", "networkx", "timm", "torchvision", "click", "rich",
            "jinja2", "huggingface_hub", "setuptools", "pip", "pydantic", "joblib")


def package_sentences(packages: tuple[str, ...] = PACKAGES, *, seed: int = 0, min_words: int = 5,
                      exclude: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """Distinct prose sentences of every docstring in the source files of installed packages.

    The ``.py`` files are parsed with :mod:`ast`, never imported, so no package code runs and
    nothing is printed; a package that is not installed is skipped. On the 2-core VM of the benchmarks, the
    default packages give about 110,000 sentences in about a minute.

    Args:
        packages: top-level package names.
        seed: shuffling seed, so that splits are reproducible.
        min_words: shortest sentence kept.
        exclude: sentences left out (e.g. a held-out set, so that it stays unseen in training).
    """
    seen: dict[str, None] = {}
    for pkg in packages:
        spec = importlib.util.find_spec(pkg)
        if spec is None or spec.origin is None:
            continue
        for f in sorted(Path(spec.origin).parent.rglob("*.py")):
            try:
                tree = ast.parse(f.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):  # templates and non-UTF-8 sources
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    _prose(ast.get_docstring(node) or "", seen, min_words)
    out = sorted(s for s in seen if s not in exclude)
    random.Random(seed).shuffle(out)
    return out
