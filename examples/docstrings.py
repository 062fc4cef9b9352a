"""Real English sentences, offline: the first sentence of docstrings in the Python standard library."""

from __future__ import annotations

import importlib
import inspect
import random
import re

MODULES = ("json", "os", "re", "string", "textwrap", "collections", "itertools", "functools", "pathlib", "shutil",
           "argparse", "logging", "datetime", "decimal", "fractions", "statistics", "random", "heapq", "bisect",
           "csv", "zipfile", "tarfile", "gzip", "socket", "threading", "subprocess", "unittest", "inspect", "ast",
           "typing", "dataclasses", "enum", "email", "http.client", "urllib.parse", "xml.dom.minidom", "sqlite3",
           "calendar", "difflib", "pprint", "tempfile", "glob", "fnmatch", "copy", "pickletools", "base64", "hashlib")


def stdlib_sentences(n: int | None = None, *, seed: int = 0, min_words: int = 5) -> list[str]:
    """Distinct first sentences of stdlib docstrings (modules, classes, functions), shuffled with ``seed``.

    Args:
        n: how many (None: all found, a few thousand).
        seed: shuffling seed, so that splits are reproducible.
        min_words: shortest sentence kept.
    """
    seen: dict[str, None] = {}
    for name in MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        objs = [mod] + [v for _, v in inspect.getmembers(mod) if inspect.isclass(v) or inspect.isroutine(v)]
        for cls in [o for o in objs if inspect.isclass(o)]:
            objs += [v for _, v in inspect.getmembers(cls) if inspect.isroutine(v)]
        for obj in objs:
            doc = inspect.getdoc(obj) or ""
            first = re.split(r"(?<=[.!?])\s", " ".join(doc.split("\n\n")[0].split()), maxsplit=1)[0].strip()
            if len(first.split()) >= min_words and first[0].isalpha():
                seen[first] = None
    out = sorted(seen)
    random.Random(seed).shuffle(out)
    return out if n is None else out[:n]
