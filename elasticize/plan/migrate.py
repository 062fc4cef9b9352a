"""Format versions and their migrations: one registered step per old version, applied on read.

A file says the version it was written in (the manifest's ``format_version``, the plan's
``version``). Each version adds to the one before it; :class:`Format` holds, per old version, the
step that brings data of that version to the next, and the top-level keys the next version
introduces. From those one place derives everything the version rule decides: the current
version, the oldest version a set of keys can be written in (the writer writes that one, so older
readers keep reading what they can), whether a file uses a key its version does not have, and the
migration of old data to the current version before the typed objects are built from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping

from .parse import fail

__all__ = ["Format", "Step", "MANIFEST_FORMAT", "PLAN_FORMAT"]


@dataclass(frozen=True)
class Step:
    """The migration from version ``source`` to ``source + 1``.

    Attributes:
        source: the version it reads.
        adds: for the keys version ``source + 1`` introduces, top-level key -> the start of the error that
            refuses it in an older file, up to "format version N" (e.g. ``"calibrated statistics need"``).
        apply: JSON of version ``source`` -> JSON of version ``source + 1`` (a new object).
    """

    source: int
    adds: Mapping[str, str]
    apply: Callable[[dict[str, Any]], dict[str, Any]]


class Format:
    """The versions of one format (the manifest's, the plan's) and the registered step out of each old one.

    Args:
        name: the format, for messages.
        key: the top-level key that holds the version.
    """

    def __init__(self, name: str, key: str) -> None:
        self.name, self.key = name, key
        self._steps: dict[int, Step] = {}

    def step(self, source: int, adds: Mapping[str, str] | None = None) -> Callable:
        """Register ``fn(data) -> data`` as the migration from version ``source`` to ``source + 1``.

        Raises:
            ValueError: a step from ``source`` is registered already, or the steps would not be
                consecutive from version 1.
        """
        def register(fn: Callable[[dict[str, Any]], dict[str, Any]]) -> Callable:
            if source in self._steps or source != len(self._steps) + 1:
                raise ValueError(f"{self.name}: the migration steps must run 1 -> 2 -> ..., once each; "
                                 f"got another from version {source}")
            self._steps[source] = Step(source, MappingProxyType(dict(adds or {})), fn)
            return fn
        return register

    @property
    def current(self) -> int:
        """The version this elasticize writes at most and migrates every older one to."""
        return len(self._steps) + 1

    @property
    def steps(self) -> tuple[Step, ...]:
        """The registered steps, oldest first."""
        return tuple(self._steps[v] for v in sorted(self._steps))

    def oldest_for(self, data: Mapping[str, Any]) -> int:
        """The oldest version that has every top-level key of ``data`` (the version a writer writes)."""
        return max([1] + [s.source + 1 for s in self.steps if any(k in data for k in s.adds)])

    def check_keys(self, data: Mapping[str, Any], version: int) -> None:
        """Refuse a key that version ``version`` does not have.

        Raises:
            ManifestError: naming the key and the version that introduced it.
        """
        for s in self.steps:
            if s.source >= version:
                for k, what in s.adds.items():
                    if k in data:
                        fail(k, f"{what} format version {s.source + 1}")

    def migrate(self, data: dict[str, Any], version: int) -> dict[str, Any]:
        """``data`` of version ``version`` (checked), brought to :attr:`current` by each step in turn."""
        for s in self.steps:
            if s.source >= version:
                data = s.apply(data)
        return data


#: The manifest (metadata key ``elasticize``): format 1; 2 adds per-preset calibrated BatchNorm
#: statistics; 3 adds small stored files (a tokenizer's); 4 adds measurements, bias compensation and the
#: nested byte layout.
MANIFEST_FORMAT = Format("the elasticize file format", "format_version")
#: The plan (manifest key ``plan``): one version so far.
PLAN_FORMAT = Format("the plan format", "version")


@MANIFEST_FORMAT.step(1, adds={"bn_stats": "calibrated statistics need"})
def _manifest_1_to_2(m: dict[str, Any]) -> dict[str, Any]:
    """Format 2 only adds the optional ``bn_stats``: a format-1 manifest is one without calibrated statistics."""
    return {**m, "format_version": 2}


@MANIFEST_FORMAT.step(2, adds={"files": "stored files need"})
def _manifest_2_to_3(m: dict[str, Any]) -> dict[str, Any]:
    """Format 3 only adds the optional ``files``: a format-2 manifest is one without stored files."""
    return {**m, "format_version": 3}


@MANIFEST_FORMAT.step(3, adds={"measurements": "need", "bias_compensation": "needs",
                               "layout": "a nested byte layout needs"})
def _manifest_3_to_4(m: dict[str, Any]) -> dict[str, Any]:
    """Format 4 only adds the optional ``measurements`` (``elasticize eval``), ``bias_compensation`` and
    ``layout`` (the nested byte layout): a format-3 manifest is one without them."""
    return {**m, "format_version": 4}
