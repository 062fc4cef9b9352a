"""The nested byte layout (``save(..., layout="nested")``): every nested preset one byte prefix of the data.

The file is a plain safetensors file whose tensors are *shells*. Let the chain be the presets
ordered by inclusion, smallest first, ending at ``full`` (:func:`chain`). For a stored tensor
``T`` of shape ``S``, its *region* at chain preset ``k`` is the box ``R_k`` = the product over axes
of the indices that preset reads (its tensor table's ``slices``; empty if it does not read ``T``),
and ``R_m`` (``m`` = chain length) is all of ``T``. Shell ``k`` holds the elements of ``R_k`` not in
``R_{k-1}``, in row-major order of ``T``, as a 1-D tensor ``<name>::shell<k>``; a tensor with one
shell is stored whole under its own name and shape. The data holds all shells 0, then all shells
1, ...; so chain preset ``k`` is the prefix ``[0, prefix_bytes[k])`` of the data. The manifest's
``layout`` key (:func:`check_layout` checks it) lists per tensor its shape and shell indices.
The file-format page says how to reassemble a tensor in any language.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from ..plan.migrate import MANIFEST_FORMAT
from ..plan.parse import ManifestError, as_dict, as_ints, as_list, as_str, fail
from .header import Header

__all__ = ["SHELL_SEP", "Layout", "chain", "regions", "shell_name", "cut_shells", "nested_entry", "logical_header",
           "check_layout", "reassemble", "nested_shells"]

SHELL_SEP = "::shell"
Box = list[list[int]] | None  # per axis the sorted indices, or None: empty


def shell_name(name: str, k: int, single: bool) -> str:
    """The stored name of tensor ``name``'s shell ``k`` (its own name when it has one shell)."""
    return name if single else f"{name}{SHELL_SEP}{k}"


def _box(shape: list[int], slices: Any) -> list[list[int]]:
    if slices is None:
        return [list(range(n)) for n in shape]
    return [sorted({i for a, b in rs for i in range(a, b)}) for rs in slices]


def _within(a: Box, b: Box) -> bool:
    if a is None:
        return True
    return b is not None and all(set(x) <= set(y) for x, y in zip(a, b))


def _size(b: Box) -> int:
    return 0 if b is None else math.prod(len(x) for x in b)


def regions(table: Mapping[str, Any], aliases: Mapping[str, str], shapes: Mapping[str, list[int]]) -> dict[str, Box]:
    """Stored tensor -> the box one preset's tensor table reads of it.

    Raises:
        ValueError: two table entries read different boxes of one stored tensor (no nested layout).
    """
    out: dict[str, Box] = {}
    for dense, e in table.items():
        src = aliases.get(e["source"], e["source"])
        b = _box(shapes[src], e["slices"])
        if out.setdefault(src, b) != b:
            raise ValueError(f"the stored tensor {src!r} is read in two ways by one preset ({dense!r}); "
                             "it cannot have a nested layout: save it with the default layout")
    return out


def chain(tables: Mapping[str, Mapping[str, Any]], sizes: Mapping[str, int],
          boxes: Mapping[str, dict[str, Box]]) -> list[str]:
    """The presets ordered by inclusion, smallest first, ending at ``full``: from the largest down, a
    preset joins when every region of it lies within the chain's current smallest preset's."""
    out = ["full"]
    for p in sorted((p for p in tables if p != "full"), key=lambda p: (-sizes[p], p)):
        if all(_within(b, boxes[out[0]].get(s)) for s, b in boxes[p].items()):
            out.insert(0, p)
    return out


def _all_boxes(names: list[str], shapes: Mapping[str, list[int]], order: list[str],
               boxes: Mapping[str, dict[str, Box]]) -> dict[str, list[Box]]:
    """Stored tensor -> its regions ``R_0 .. R_m`` (the last: the whole tensor)."""
    return {s: [boxes[p].get(s) for p in order] + [_box(shapes[s], None)] for s in names}


def _levels(inner: list[list[int]], rs: list[Box], j: int) -> torch.Tensor:
    """Over box ``inner`` (``R_j``): the shell of each element, as an int16 tensor of the box's shape.

    The regions are nested products of per-axis index sets, so an element lies in ``R_k`` iff each of
    its coordinates lies in ``R_k``'s set on that axis; its shell is the largest, over the axes, of
    the first ``k`` whose set holds that coordinate.
    """
    level = torch.zeros((), dtype=torch.int16)  # a chain has far fewer than 2**15 presets
    for ax, xs in enumerate(inner):
        idx = torch.tensor(xs, dtype=torch.int64)
        lv = torch.full((len(xs),), j, dtype=torch.int16)
        for k in range(j - 1, -1, -1):
            if rs[k] is not None:
                lv[torch.isin(idx, torch.tensor(rs[k][ax], dtype=torch.int64))] = k
        level = level.unsqueeze(-1).maximum(lv.reshape([1] * ax + [len(xs)]))
    return level


def cut_shells(t: torch.Tensor, rs: list[Box]) -> list[torch.Tensor | None]:
    """Tensor ``t`` cut into its shells (None where a shell is empty), for :func:`elasticize.save`.

    Shell ``k`` holds the elements of ``R_k`` not in ``R_{k-1}``, in row-major order.
    """
    full = [list(range(n)) for n in t.shape]
    level = _levels(full, rs, len(rs) - 1).expand(t.shape)
    out: list[torch.Tensor | None] = []
    for k, r in enumerate(rs):
        n = _size(r) - (_size(rs[k - 1]) if k else 0)
        out.append(t[level == k].contiguous() if n else None)
    return out


def nested_entry(names: list[str], shapes: Mapping[str, list[int]], tables: Mapping[str, Mapping[str, Any]],
                 aliases: Mapping[str, str], itemsize: Mapping[str, int]) -> dict[str, Any]:
    """The manifest's ``layout`` entry for stored tensors ``names`` (in this order), computed from the
    tables: the one place it is computed (save writes it, every reader compares the file's copy).

    Raises:
        ValueError: a preset reads one stored tensor in two ways (see :func:`regions`).
    """
    boxes = {p: regions(t, aliases, shapes) for p, t in tables.items()}
    sizes = {p: sum(math.prod(e["shape"]) * itemsize[aliases.get(e["source"], e["source"])] for e in t.values())
             for p, t in tables.items()}
    order = chain(tables, sizes, boxes)
    allb = _all_boxes(names, shapes, order, boxes)
    ends = [0] * (len(order) + 1)
    entry: dict[str, Any] = {}
    for s in names:
        rs = allb[s]
        shells = [k for k in range(len(rs)) if _size(rs[k]) - (_size(rs[k - 1]) if k else 0)]
        for k in shells:
            ends[k] += (_size(rs[k]) - (_size(rs[k - 1]) if k else 0)) * itemsize[s]
        entry[s] = {"shape": list(shapes[s]), "shells": shells}
    prefix = [sum(ends[:k + 1]) for k in range(len(order))]
    return {"kind": "nested", "chain": order, "prefix_bytes": prefix, "tensors": entry}


class Layout:
    """A checked nested layout: the chain, each tensor's regions and shells' stored names."""

    def __init__(self, entry: dict[str, Any], boxes: dict[str, list[Box]]) -> None:
        self.chain: list[str] = entry["chain"]
        self.prefix_bytes: list[int] = entry["prefix_bytes"]
        self.tensors: dict[str, dict[str, Any]] = entry["tensors"]
        self.boxes = boxes

    def stored(self, name: str) -> list[tuple[int, str]]:
        """``(shell index, stored name)`` of each shell of tensor ``name``."""
        shells = self.tensors[name]["shells"]
        return [(k, shell_name(name, k, len(shells) == 1)) for k in shells]

    def needs(self, name: str, box: list[list[int]]) -> int:
        """The first shell index whose region holds ``box`` of tensor ``name``."""
        return next(k for k, r in enumerate(self.boxes[name]) if _within(box, r))


def logical_header(header: Header, entry: Any) -> Header:
    """The header as a default-layout file would have it (each tensor whole), for the manifest's checks.

    Raises:
        ManifestError: a malformed ``layout`` key, shells missing, unlisted, of mixed dtypes, of a
            wrong shape or element count, or a tensor name holding ``::shell``.
    """
    e = as_dict(entry, "layout", required=("kind", "chain", "prefix_bytes", "tensors"))
    if e["kind"] != "nested":
        fail("layout.kind", f"is {e['kind']!r:.40}; this elasticize reads 'nested'")
    order = [as_str(p, "layout.chain", pattern=r"[\w.\-]{1,128}") for p in as_list(e["chain"], "layout.chain", max_len=1 << 12)]
    if not order or order[-1] != "full" or len(set(order)) != len(order):
        fail("layout.chain", "must list distinct presets, ending at 'full'")
    prefix = as_ints(e["prefix_bytes"], "layout.prefix_bytes", 0)
    if len(prefix) != len(order) or prefix != sorted(prefix):
        fail("layout.prefix_bytes", "must give one non-decreasing byte count per chain preset")
    tensors: dict[str, dict[str, Any]] = {}
    seen: set[str] = set()
    for name, t in as_dict(e["tensors"], "layout.tensors", optional=None).items():
        key = f"layout.tensors[{name!r:.120}]"
        if SHELL_SEP in as_str(name, key):
            fail(key, f"a tensor name must not hold {SHELL_SEP!r}")
        as_dict(t, key, required=("shape", "shells"))
        shape = as_ints(t["shape"], f"{key}.shape", 0)
        shells = as_ints(t["shells"], f"{key}.shells", 0)
        if not shells or shells != sorted(set(shells)) or shells[-1] > len(order):
            fail(f"{key}.shells", f"must be increasing shell indices from 0 to {len(order)}")
        stored = [header.tensors.get(shell_name(name, k, len(shells) == 1)) for k in shells]
        if any(s is None for s in stored):
            fail(f"{key}.shells", "names a shell the file does not store; the file is corrupted")
        if len({s["dtype"] for s in stored}) != 1:
            fail(f"{key}.shells", "are stored in more than one dtype")
        if len(shells) == 1 and stored[0]["shape"] != shape:
            fail(f"{key}.shape", f"is {shape} but the tensor is stored as {stored[0]['shape']}")
        if len(shells) > 1 and (any(len(s["shape"]) != 1 for s in stored)
                                or sum(s["shape"][0] for s in stored) != math.prod(shape)):
            fail(f"{key}.shells", f"must be 1-D and hold the {math.prod(shape)} elements of shape {shape} together")
        for k in shells:
            a, b = header.tensors[shell_name(name, k, len(shells) == 1)]["data_offsets"]
            lo, hi = (prefix[k - 1] if k else 0), (prefix[k] if k < len(order) else None)
            if b > a and (a < lo or (hi is not None and b > hi)):
                fail(f"{key}.shells", f"shell {k} lies at bytes [{a}, {b}), outside its section; the file is corrupted")
        seen.update(shell_name(name, k, len(shells) == 1) for k in shells)
        tensors[name] = {"dtype": stored[0]["dtype"], "shape": shape, "data_offsets": None}
    unlisted = sorted(set(header.tensors) - seen)
    if unlisted:
        fail("layout.tensors", f"does not list the stored tensor(s) {[u[:80] for u in unlisted[:3]]}")
    return Header(header.path, header.size, header.data_start, tensors, header.metadata)


def check_layout(entry: dict[str, Any], logical: Header, tables: Any, aliases: Mapping[str, str]) -> Layout:
    """Compare the file's ``layout`` with the one its (checked) tables compute; return it.

    Raises:
        ManifestError: a file without per-preset tables, or a ``layout`` that differs (the key named).
    """
    from ..plan.parse import DTYPE_BYTES

    if tables is None:
        raise ManifestError("manifest key layout: a nested file needs its per-preset tables (elasticize.presets)")
    names = list(entry["tensors"])
    shapes = {n: t["shape"] for n, t in logical.tensors.items()}
    shapes.update({a: shapes[t] for a, t in aliases.items() if t in shapes})
    item = {n: DTYPE_BYTES[t["dtype"]] for n, t in logical.tensors.items()}
    try:
        want = nested_entry(names, shapes, tables, aliases, item)
    except (KeyError, ValueError) as e:
        raise ManifestError(f"manifest key layout: {str(e)[:300]}") from None
    for k in ("chain", "prefix_bytes", "tensors"):
        if want[k] != entry[k]:
            bad = next((n for n in names if want["tensors"].get(n) != entry["tensors"].get(n)), "") if k == "tensors" else ""
            fail(f"layout.{k}{f'[{bad!r:.120}]' if bad else ''}", "differs from what the presets' tables compute; "
                 "the file is corrupted")
    boxes = {p: regions(t, aliases, shapes) for p, t in tables.items()}
    return Layout(entry, _all_boxes(names, shapes, want["chain"], boxes))


def reassemble(shells: Mapping[int, torch.Tensor], rs: list[Box], j: int) -> torch.Tensor:
    """Region ``R_j`` of a tensor (a dense tensor of its box's shape) from its shells ``0..j``."""
    inner = rs[j]
    if inner is None:
        raise ValueError("reassemble: the region is empty")
    first = next(iter(shells.values()))
    shape = [len(x) for x in inner]
    out = torch.empty(shape, dtype=first.dtype)
    level = _levels(inner, rs, j).expand(shape)
    for k, shell in shells.items():
        if k <= j:
            out.masked_scatter_(level == k, shell)
    return out


def nested_shells(manifest: dict[str, Any], tensors: dict[str, torch.Tensor], tables: dict[str, Any],
            aliases: dict[str, str]) -> list[tuple[str, torch.Tensor]]:
    """The stored tensors of a nested file, in data order (shells 0 of every tensor, then shells 1, ...);
    adds the ``layout`` key to ``manifest`` (format version 4). For :func:`elasticize.save`.

    Raises:
        ValueError: a preset reads one stored tensor in two ways (see :func:`regions`).
    """
    shapes = {n: list(t.shape) for n, t in tensors.items()}
    shapes.update({a: shapes[t] for a, t in aliases.items()})
    entry = nested_entry(list(tensors), shapes, tables, aliases, {n: t.element_size() for n, t in tensors.items()})
    boxes = {p: regions(t, aliases, shapes) for p, t in tables.items()}
    sections: list[list[tuple[str, torch.Tensor]]] = [[] for _ in range(len(entry["chain"]) + 1)]
    for name, t in tensors.items():
        ks = entry["tensors"][name]["shells"]
        if len(ks) == 1:
            sections[ks[0]].append((name, t))
            continue
        rs = [boxes[p].get(name) for p in entry["chain"]] + [[list(range(n)) for n in t.shape]]
        for k, shell in enumerate(cut_shells(t, rs)):
            if shell is not None:
                sections[k].append((shell_name(name, k, False), shell))
    manifest["layout"] = entry
    manifest["format_version"] = MANIFEST_FORMAT.oldest_for(manifest)  # 4: the version that adds the layout
    return [x for sec in sections for x in sec]
