"""Tensors read from a :class:`~elasticize.fileformat.source.ByteSource` by byte range: whole, or cut to
per-axis ``[start, stop)`` ranges, in either byte layout, all wanted tensors in one batch of
coalesced requests.

A cut tensor is a list of contiguous byte blocks: with ``k`` the last axis that is cut, each
combination of indices of the axes before ``k`` and each range of axis ``k`` is one block of
whole trailing rows, and the blocks in file order, concatenated, are the cut tensor in row-major
order. A row-sliced tensor is one block; a column-sliced one a block per row, which
:func:`~elasticize.fileformat.source.coalesce` merges into few requests.
"""

from __future__ import annotations

import bisect
import math
from typing import Any, Mapping

import torch

from ..plan.parse import DTYPE_BYTES
from ..tensorfile import TORCH_DTYPES
from .header import Header
from .layout import Layout, reassemble
from .source import ByteSource, coalesce

__all__ = ["TensorReader", "byte_blocks"]

Ranges = list[list[tuple[int, int]]]


def byte_blocks(entry: Mapping[str, Any], data_start: int, ranges: Ranges | None) -> tuple[list[tuple[int, int]], list[int]]:
    """The file byte blocks of a stored tensor cut to ``ranges`` (None: whole), and the cut shape."""
    shape, item = list(entry["shape"]), DTYPE_BYTES[entry["dtype"]]
    a0 = data_start + entry["data_offsets"][0]
    if ranges is None or not ranges:
        return [(a0, data_start + entry["data_offsets"][1])], shape
    cut = [sum(b - a for a, b in rs) for rs in ranges]
    k = max((ax for ax, rs in enumerate(ranges) if [tuple(r) for r in rs] != [(0, shape[ax])]), default=-1)
    if k < 0 or math.prod(cut) == 0:
        return ([(a0, data_start + entry["data_offsets"][1])] if k < 0 else []), cut
    inner = math.prod(shape[k + 1:]) * item
    flat = torch.zeros(1, dtype=torch.int64)  # flat index over axes < k of each outer combination
    for ax in range(k):
        idx = torch.tensor([i for a, b in ranges[ax] for i in range(a, b)], dtype=torch.int64)
        flat = (flat[:, None] * shape[ax] + idx[None, :]).reshape(-1)
    starts = [(o * shape[k] + a) * inner for o in flat.tolist() for a, _ in ranges[k]]
    lens = [(b - a) * inner for _ in range(flat.numel()) for a, b in ranges[k]]
    return [(a0 + s, a0 + s + n) for s, n in zip(starts, lens)], cut


class TensorReader:
    """Reads a batch of tensors of one file: ``fetch({key: (stored name, ranges)})``.

    Args:
        source: the file's bytes.
        header: its checked safetensors header (the stored tensors: shells in a nested file).
        layout: the checked nested layout, or None for the default layout.
    """

    def __init__(self, source: ByteSource, header: Header, layout: Layout | None = None) -> None:
        self.source, self.header, self.layout = source, header, layout

    def _plan(self, name: str, ranges: Ranges | None) -> tuple[list[tuple[int, int]], Any]:
        """The byte blocks of one wanted tensor and how to build it from their bytes."""
        lay = self.layout
        if lay is None or len(lay.tensors[name]["shells"]) == 1:
            entry = self.header.tensors[name if lay is None else lay.stored(name)[0][1]]
            blocks, shape = byte_blocks(entry, self.header.data_start, ranges)
            return blocks, lambda parts: _tensor(b"".join(parts), entry["dtype"], shape)
        shape = lay.tensors[name]["shape"]
        box = [list(range(n)) for n in shape] if not ranges else \
            [[i for a, b in rs for i in range(a, b)] for rs in ranges]
        j = lay.needs(name, box)
        shells = [(k, self.header.tensors[s]) for k, s in lay.stored(name) if k <= j]
        blocks = [byte_blocks(e, self.header.data_start, None)[0][0] for _, e in shells]

        def build(parts: list[bytes]) -> torch.Tensor:
            got = {k: _tensor(p, e["dtype"], e["shape"]) for (k, e), p in zip(shells, parts)}
            t = reassemble(got, lay.boxes[name], j)
            for ax, (want, have) in enumerate(zip(box, lay.boxes[name][j])):
                if want != have:
                    pos = {x: i for i, x in enumerate(have)}
                    t = t.index_select(ax, torch.tensor([pos[x] for x in want], dtype=torch.int64))
            return t.contiguous()
        return blocks, build

    def fetch(self, wanted: Mapping[Any, tuple[str, Ranges | None]], cover: tuple[int, int] | None = None
              ) -> dict[Any, torch.Tensor]:
        """The wanted tensors, read in one batch of coalesced byte ranges.

        Args:
            wanted: key -> (stored tensor name, per-axis ranges or None for the whole tensor).
            cover: a data byte range ``[start, stop)`` to read as one request (a nested preset's
                prefix); blocks outside it are read as usual.

        Raises:
            ValueError, OSError: the source's errors (a truncated download, a lost connection).
        """
        plans = {key: self._plan(name, ranges) for key, (name, ranges) in wanted.items()}
        blocks = [b for bl, _ in plans.values() for b in bl]
        spans = [] if cover is None else [(self.header.data_start + cover[0], self.header.data_start + cover[1])]
        outside = [b for b in blocks if not (spans and spans[0][0] <= b[0] and b[1] <= spans[0][1])]
        spans = sorted(spans + coalesce(outside))
        datas = self.source.read(spans)
        starts = [a for a, _ in spans]

        def piece(a: int, b: int) -> bytes:
            i = bisect.bisect_right(starts, a) - 1
            s, d = spans[i][0], datas[i]
            return d[a - s:b - s]
        return {key: build([piece(a, b) for a, b in bl]) for key, (bl, build) in plans.items()}


def _tensor(data: bytes, dtype: str, shape: list[int]) -> torch.Tensor:
    """A tensor of ``shape`` and safetensors ``dtype`` from its little-endian bytes (a copy it owns)."""
    t = torch.frombuffer(bytearray(data), dtype=TORCH_DTYPES[dtype]) if data else torch.zeros(0, dtype=TORCH_DTYPES[dtype])
    return t.reshape(shape)
