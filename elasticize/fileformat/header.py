"""The safetensors header of a file, read as strictly as safetensors' own reader."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .source import ByteSource, open_source
from ..plan.parse import (DTYPE_BYTES, MAX_HEADER_BYTES, ManifestError, as_dict, as_int, as_ints, as_list, as_str,
                          as_str_map, fail, loads)

__all__ = ["Header", "read_header"]


class Header:
    """The safetensors header of a file, checked.

    Attributes:
        path: the file.
        size: its size in bytes.
        data_start: offset of the data section (8 + header length).
        tensors: name -> ``{"dtype", "shape", "data_offsets"}``, every entry checked.
        metadata: the ``__metadata__`` strings.
    """

    def __init__(self, path: Any, size: int, data_start: int, tensors: dict[str, dict[str, Any]],
                 metadata: dict[str, str]) -> None:
        self.path, self.size, self.data_start = path, size, data_start
        self.tensors, self.metadata = tensors, metadata

    def shape(self, name: str) -> list[int] | None:
        """The stored shape of tensor ``name``, or None if the file has no such tensor."""
        t = self.tensors.get(name)
        return None if t is None else list(t["shape"])


def read_header(path: str | Path, source: ByteSource | None = None) -> Header:
    """Read and check a safetensors header, as strictly as safetensors' own reader.

    The 8-byte length is checked against the limit and the file's size before the header's
    bytes are read, so a hostile length costs nothing (a remote file: no large download).

    Args:
        path: the file (a local path, or a URL when ``source`` reads it).
        source: where the bytes come from (:func:`elasticize.fileformat.source.open_source`);
            None opens ``path`` as a local file.

    Raises:
        FileNotFoundError: no such file.
        ManifestError: a header over :data:`MAX_HEADER_BYTES`, longer than the file, not JSON,
            or with a tensor entry whose dtype, shape or ``data_offsets`` are invalid, overlap,
            leave gaps, or run past the end of the file (a truncated download).
        ValueError, OSError: a remote source's errors (see :class:`~elasticize.fileformat.source.ByteSource`).
    """
    if source is None:
        path = Path(path)
        with open_source(path) as src:
            return read_header(path, src)
    size = source.size
    (head,) = source.read([(0, min(8, size))])
    if len(head) < 8:
        raise ManifestError(f"{path} is not a safetensors file: it has {size} bytes, fewer than its 8-byte "
                            "header length")
    n = int.from_bytes(head, "little")
    if n > MAX_HEADER_BYTES:
        raise ManifestError(f"{path}: its header claims {n} bytes, over safetensors' limit of "
                            f"{MAX_HEADER_BYTES}; the file is corrupted or hostile")
    if n > size - 8:
        raise ManifestError(f"{path} is not a readable safetensors file (truncated?): its header claims {n} bytes but "
                            f"the file has {size}; copy or download it again")
    (raw,) = source.read([(8, 8 + n)])
    header = loads(raw, f"{path} is not a readable safetensors file: its header")
    if not isinstance(header, dict):
        raise ManifestError(f"{path}: the safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    try:
        as_str_map(meta, "__metadata__", max_len=MAX_HEADER_BYTES)
        spans = []
        for name, t in header.items():
            key = f"tensors[{name!r:.120}]"
            as_str(name, key)
            as_dict(t, key, required=("dtype", "shape", "data_offsets"))
            if t["dtype"] not in DTYPE_BYTES:
                fail(f"{key}.dtype", f"{t['dtype']!r:.40} is not a safetensors dtype")
            shape = as_ints(t["shape"], f"{key}.shape")
            offs = as_list(t["data_offsets"], f"{key}.data_offsets", max_len=2)
            if len(offs) != 2:
                fail(f"{key}.data_offsets", "must be [begin, end]")
            a, b = as_int(offs[0], f"{key}.data_offsets[0]"), as_int(offs[1], f"{key}.data_offsets[1]")
            numel = math.prod(shape)
            if b - a != numel * DTYPE_BYTES[t["dtype"]]:
                fail(f"{key}.data_offsets", f"[{a}, {b}] holds {b - a} bytes, but shape {shape} of {t['dtype']} "
                      f"needs {numel * DTYPE_BYTES[t['dtype']]}")
            spans.append((a, b, name))
    except ManifestError as e:
        raise ManifestError(f"{path}: {e}") from None
    spans.sort()
    end = 0
    for a, b, name in spans:
        if a != end:
            raise ManifestError(f"{path}: tensor {name!r:.120} starts at byte {a} of the data, not at {end}: the "
                                "offsets overlap or leave a gap; the file is corrupted")
        end = b
    if 8 + n + end > size:
        raise ManifestError(f"{path} is truncated: its header describes {8 + n + end} bytes but the file has "
                            f"{size}; copy or download it again")
    return Header(path, size, 8 + n, header, meta)
