"""Bounded, strict reading of the JSON an elasticize file holds: the shared field checks.

A file is data, never code: JSON is parsed only after its nesting is bounded (Python's ``json``
recurses, so a deep file would raise RecursionError), without ``NaN``/``Infinity``, and every field
is checked for its type and range before it is used. Every problem is a :class:`ManifestError`
(a ``ValueError``) that names the key.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

__all__ = ["ManifestError", "MAX_HEADER_BYTES", "MAX_JSON_DEPTH", "DTYPE_BYTES", "FLOAT_DTYPES", "loads", "fail",
           "as_dict", "as_int", "as_num", "as_str", "as_list", "as_ints", "as_str_map"]

#: safetensors refuses headers larger than this (``safetensors::tensor::MAX_HEADER_SIZE``).
MAX_HEADER_BYTES = 100_000_000
#: The deepest JSON nesting an elasticize manifest uses is 7; anything past this is refused
#: before parsing (Python's ``json`` recurses, so a deep file would raise RecursionError).
MAX_JSON_DEPTH = 64
#: Bytes per element of the safetensors dtypes torch reads.
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8, "C64": 8}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
_MAX_INT = 2 ** 53  # the largest integer every JSON reader represents exactly
_MAX_NAME = 1024


class ManifestError(ValueError):
    """A malformed or inconsistent elasticize file; the message names the key and what to do."""


def fail(key: str, msg: str) -> None:
    """Raise the :class:`ManifestError` for manifest key ``key``."""
    raise ManifestError(f"manifest key {key}: {msg}")


# --------------------------------------------------------------------------- JSON
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_BRACKET = re.compile(r"[\[\]{}]")


def _depth(text: str) -> int:
    deepest = depth = 0
    for m in _BRACKET.finditer(_STRING.sub("", text)):
        depth += 1 if m.group() in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def loads(text: str | bytes, what: str) -> Any:
    """Parse JSON with bounded nesting, no ``NaN``/``Infinity`` and Python's integer-digit limit.

    Raises:
        ManifestError: the text is not valid JSON, nests deeper than :data:`MAX_JSON_DEPTH`,
            or holds a non-finite number or an integer of more than 4,300 digits.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ManifestError(f"{what} is not UTF-8 text ({e}); the file is corrupted") from None
    if _depth(text) > MAX_JSON_DEPTH:
        raise ManifestError(f"{what} nests deeper than {MAX_JSON_DEPTH} levels; the file is corrupted or hostile")
    try:
        return json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError, and so is a 5,000-digit int
        raise ManifestError(f"{what} is not valid JSON ({str(e)[:200]}); the file is corrupted") from None


# --------------------------------------------------------------------------- field checks
# Each returns the value, checked, or raises ManifestError naming ``key``.
def as_dict(v: Any, key: str, *, required: tuple[str, ...] = (), optional: tuple[str, ...] | None = ()) -> dict:
    """``v`` as a dict with string keys: the required ones present, no others (``optional=None``: any)."""
    if not isinstance(v, dict):
        fail(key, f"must be an object, not {type(v).__name__}")
    for k in required:
        if k not in v:
            fail(key, f"is missing {k!r}")
    if optional is not None:
        extra = sorted(set(v) - set(required) - set(optional))
        if extra:
            fail(key, f"has unknown key(s) {extra[:5]}; the file was written by another program or is corrupted")
    return v


def as_int(v: Any, key: str, lo: int = 0, hi: int = _MAX_INT) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        fail(key, f"must be an integer, not {v!r:.80}")
    if not lo <= v <= hi:
        fail(key, f"must be in [{lo}, {hi}], got {v}")
    return v


def as_num(v: Any, key: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        fail(key, f"must be a finite number, not {v!r:.80}")
    return v


def as_str(v: Any, key: str, *, pattern: str | None = None, max_len: int = _MAX_NAME) -> str:
    if not isinstance(v, str):
        fail(key, f"must be a string, not {type(v).__name__}")
    if len(v) > max_len:
        fail(key, f"is longer than {max_len} characters")
    if pattern is not None and not re.fullmatch(pattern, v):
        fail(key, f"{v!r:.80} is not a valid name")
    return v


def as_list(v: Any, key: str, *, max_len: int = 10_000_000) -> list:
    if not isinstance(v, list):
        fail(key, f"must be a list, not {type(v).__name__}")
    if len(v) > max_len:
        fail(key, f"has more than {max_len} entries")
    return v


def as_ints(v: Any, key: str, lo: int = 0) -> list[int]:
    return [as_int(x, f"{key}[{i}]", lo) for i, x in enumerate(as_list(v, key, max_len=64))]


def as_str_map(v: Any, key: str, max_len: int = _MAX_NAME) -> dict[str, str]:
    as_dict(v, key, optional=None)
    for k, x in v.items():
        as_str(x, f"{key}.{k}", max_len=max_len)
    return v
