"""An elasticize file opened for reading: its header and manifest checked, its byte source open.

One path for every reader (:func:`elasticize.read_manifest`, :func:`elasticize.load`,
:func:`elasticize.load_subnet`), local or remote: the same checks run on the bytes wherever they
came from (:mod:`elasticize.fileformat.source`).
"""

from __future__ import annotations

import os
from typing import Any

from ..plan import MANIFEST_FORMAT
from ..plan.parse import ManifestError, loads
from .header import read_header
from .layout import check_layout, logical_header
from .manifest import check_manifest
from .reader import TensorReader
from .source import open_source

__all__ = ["OpenedFile", "FORMAT_VERSION", "METADATA_KEY", "PRESETS_KEY"]

#: The newest file format version this elasticize reads and writes (older ones migrate on read): the one
#: source is the registry of migration steps, :data:`elasticize.plan.migrate.MANIFEST_FORMAT`.
FORMAT_VERSION = MANIFEST_FORMAT.current
METADATA_KEY = "elasticize"
#: Second metadata key: per preset, the dense tensors and their slices (kept apart so loading skips them).
PRESETS_KEY = "elasticize.presets"


class OpenedFile:
    """A checked file: its manifest's JSON (``raw``), the typed :class:`~elasticize.plan.manifest.Manifest`
    (``manifest``, migrated to the current format), tables, plan, search space, header as read (shells in a
    nested file), logical header (each tensor whole), nested layout or None, and open byte source."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = path
        self.source = open_source(path)
        try:
            self._check()
        except BaseException:
            self.source.close()
            raise

    def _check(self) -> None:
        path = self.path
        self.header = header = read_header(path, self.source)
        meta = header.metadata
        raw = meta.get(METADATA_KEY)
        if raw is None:
            raise ManifestError(f"{path} is a safetensors file without an elasticize manifest; make one with "
                                "`elasticize convert` or elasticize.save()")
        try:
            self.raw = raw_m = loads(raw, "the elasticize manifest")
            self.tables = loads(meta[PRESETS_KEY], "the per-preset tables") if PRESETS_KEY in meta else None
            nested = isinstance(raw_m, dict) and "layout" in raw_m
            self.logical = logical_header(header, raw_m["layout"]) if nested else header
            self.manifest, self.space = check_manifest(raw_m, header=self.logical, tables=self.tables,
                                                       format_version=FORMAT_VERSION)
            self.plan = self.manifest.plan
            self.layout = check_layout(raw_m["layout"], self.logical, self.tables,
                                       dict(self.manifest.aliases)) if nested else None
        except ManifestError as e:
            raise ManifestError(f"{path}: {e}") from None

    def reader(self) -> TensorReader:
        return TensorReader(self.source, self.header, self.layout)

    def __enter__(self) -> "OpenedFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.source.close()
