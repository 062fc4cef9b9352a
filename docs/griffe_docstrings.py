"""Griffe extension for the API reference: read elasticize's docstrings as the docs show them.

The docstrings are Google style with a few reStructuredText habits, which this turns into Markdown
when the reference is built (the source is left as it is):

* ``:func:`name```, ``:class:`~pkg.Name```... become code spans (``name``, ``Name``);
* a paragraph ending in ``::`` followed by an indented block, and a run of ``>>>`` lines, become
  fenced Python code;
* a package's re-exports of its own public submodules' objects (``from .model import ElasticModel``
  with ``__all__``) are documented once, in the submodule that defines them; re-exports from a
  private submodule (``from ._impl import f``) are documented in the package.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|exc|obj|const):`(~?)([^`]+)`")


def _role(m: re.Match) -> str:
    target = m.group(2)
    return f"`{target.rsplit('.', 1)[-1] if m.group(1) else target}`"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def markdown(text: str) -> str:
    """``text`` (a docstring) with reST roles, literal blocks and doctest blocks in Markdown form."""
    text = _ROLE.sub(_role, text)
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith(">>>") and (not out or not out[-1].strip() or out[-1].strip().endswith(":")):
            # the fence goes at the indentation of the text before the block (an indented doctest
            # block would otherwise be read as an indented code block, fence included)
            before = next((o for o in reversed(out) if o.strip()), "")
            pad = " " * min(_indent(line), _indent(before))
            own = _indent(line)
            block = []
            while i < len(lines) and lines[i].strip() and lines[i].strip()[:3] in (">>>", "..."):
                block.append(lines[i][own:] if _indent(lines[i]) >= own else lines[i].strip())
                i += 1
            out += [f"{pad}```pycon", *(pad + b for b in block), f"{pad}```"]
            continue
        if stripped.endswith("::") and not stripped.endswith(":::"):
            base = _indent(line)
            j = i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            if j < len(lines) and _indent(lines[j]) > base:
                head = line.rstrip()[:-2].rstrip()
                if head.strip():
                    out.append(head + ":")
                block_indent = _indent(lines[j])
                block = []
                k = j
                while k < len(lines) and (not lines[k].strip() or _indent(lines[k]) >= block_indent):
                    block.append(lines[k][block_indent:])
                    k += 1
                while block and not block[-1].strip():
                    block.pop()
                pad = " " * base
                out += ["", f"{pad}```python", *(pad + b if b else "" for b in block), f"{pad}```", ""]
                i = k
                continue
        out.append(line)
        i += 1
    return "\n".join(out)


class ReferenceDocstrings(griffe.Extension):
    """Rewrites every docstring of the loaded package (see the module docstring)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        self._visit(pkg)

    def _visit(self, obj: griffe.Object) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)
        for member in list(obj.members.values()):
            if member.is_alias:
                # re-exported from a public submodule of this package: documented there (one from a
                # private submodule, e.g. ``pkg._impl``, stays here, since ``_impl`` gets no section)
                rel = member.target_path[len(obj.path) + 1:] if obj.is_module else ""
                if obj.is_module and member.target_path.startswith(obj.path + ".") and not any(
                        part.startswith("_") for part in rel.split(".")[:-1]):
                    member.public = False
                continue
            self._visit(member)
