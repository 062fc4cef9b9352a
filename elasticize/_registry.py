"""Named, loud registries shared by rules and adapters: a duplicate name raises, an unknown one lists the known."""

from __future__ import annotations

from typing import Any


def add(table: dict[str, Any], kind: str, name: str, cls: type, base: type, hint: str) -> None:
    """Instantiate ``cls`` and store it as ``table[name]`` (the instance's ``name`` is set).

    Raises:
        TypeError: if ``cls`` is not a subclass of ``base``.
        ValueError: if ``name`` is taken; ``hint`` says what to do.
    """
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise TypeError(f"registering {kind} {name!r} needs a subclass of {base.__module__}.{base.__qualname__}, "
                        f"got {cls!r}")
    if name in table:
        raise ValueError(f"{kind} {name!r} is already registered ({type(table[name]).__qualname__}); {hint}")
    inst = cls()
    inst.name = name
    table[name] = inst


def get(table: dict[str, Any], kind: str, name: str, hint: str = "") -> Any:
    """``table[name]``.

    Raises:
        KeyError: if absent; the message lists the known names and adds ``hint``.
    """
    if name not in table:
        raise KeyError(f"no {kind} named {name!r} is registered; known {kind}s: {sorted(table)}{'. ' + hint if hint else ''}")
    return table[name]
