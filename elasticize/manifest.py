"""Strict, bounded reading of an elasticize file's header and manifest: every field is checked
before anything uses it.

A file is data, never code. This module reads the safetensors header with safetensors' own
limits (a header of at most 100,000,000 bytes, tensor entries whose ``data_offsets`` tile the
data section exactly), parses JSON without recursion (nesting is bounded first), and checks the
manifest against its format version: unknown keys in a known version are refused, every size
must agree with the stored tensors, choices run from the full size down to at least 1, preset
configurations lie inside the search space and the per-preset tables (the contract for readers
in other languages, see docs/guides/file-format.md) equal what the plan computes. Every problem
is a :class:`ManifestError` (a ``ValueError``) that names the key.

Nothing here builds a model or imports a library a file names; recipes are checked against
their adapter's allow-list by :func:`elasticize.adapters.check_recipe`.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Mapping

__all__ = ["ManifestError", "MAX_HEADER_BYTES", "MAX_JSON_DEPTH", "DTYPE_BYTES", "BN_PREFIX", "FILE_PREFIX",
           "Header", "read_header", "loads", "check_plan", "check_manifest", "check_files", "preset_table",
           "bn_name", "live_state"]

#: safetensors refuses headers larger than this (``safetensors::tensor::MAX_HEADER_SIZE``).
MAX_HEADER_BYTES = 100_000_000
#: The deepest JSON nesting an elasticize manifest uses is 7; anything past this is refused
#: before parsing (Python's ``json`` recurses, so a deep file would raise RecursionError).
MAX_JSON_DEPTH = 64
#: Bytes per element of the safetensors dtypes torch reads.
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8, "C64": 8}
_FLOAT = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
_MAX_INT = 2 ** 53  # the largest integer every JSON reader represents exactly
_MAX_NAME = 1024


class ManifestError(ValueError):
    """A malformed or inconsistent elasticize file; the message names the key and what to do."""


def _fail(key: str, msg: str) -> None:
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


# --------------------------------------------------------------------------- small checks
def _dict(v: Any, key: str, *, required: tuple[str, ...] = (), optional: tuple[str, ...] | None = ()) -> dict:
    """``v`` as a dict with string keys: the required ones present, no others (``optional=None``: any)."""
    if not isinstance(v, dict):
        _fail(key, f"must be an object, not {type(v).__name__}")
    for k in required:
        if k not in v:
            _fail(key, f"is missing {k!r}")
    if optional is not None:
        extra = sorted(set(v) - set(required) - set(optional))
        if extra:
            _fail(key, f"has unknown key(s) {extra[:5]}; the file was written by another program or is corrupted")
    return v


def _int(v: Any, key: str, lo: int = 0, hi: int = _MAX_INT) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        _fail(key, f"must be an integer, not {v!r:.80}")
    if not lo <= v <= hi:
        _fail(key, f"must be in [{lo}, {hi}], got {v}")
    return v


def _num(v: Any, key: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        _fail(key, f"must be a finite number, not {v!r:.80}")
    return v


def _str(v: Any, key: str, *, pattern: str | None = None, max_len: int = _MAX_NAME) -> str:
    if not isinstance(v, str):
        _fail(key, f"must be a string, not {type(v).__name__}")
    if len(v) > max_len:
        _fail(key, f"is longer than {max_len} characters")
    if pattern is not None and not re.fullmatch(pattern, v):
        _fail(key, f"{v!r:.80} is not a valid name")
    return v


def _list(v: Any, key: str, *, max_len: int = 10_000_000) -> list:
    if not isinstance(v, list):
        _fail(key, f"must be a list, not {type(v).__name__}")
    if len(v) > max_len:
        _fail(key, f"has more than {max_len} entries")
    return v


def _ints(v: Any, key: str, lo: int = 0) -> list[int]:
    return [_int(x, f"{key}[{i}]", lo) for i, x in enumerate(_list(v, key, max_len=64))]


def _str_map(v: Any, key: str, max_len: int = _MAX_NAME) -> dict[str, str]:
    _dict(v, key, optional=None)
    for k, x in v.items():
        _str(x, f"{key}.{k}", max_len=max_len)
    return v


# --------------------------------------------------------------------------- header
class Header:
    """The safetensors header of a file, checked.

    Attributes:
        path: the file.
        size: its size in bytes.
        data_start: offset of the data section (8 + header length).
        tensors: name -> ``{"dtype", "shape", "data_offsets"}``, every entry checked.
        metadata: the ``__metadata__`` strings.
    """

    def __init__(self, path: Path, size: int, data_start: int, tensors: dict[str, dict[str, Any]],
                 metadata: dict[str, str]) -> None:
        self.path, self.size, self.data_start = path, size, data_start
        self.tensors, self.metadata = tensors, metadata

    def shape(self, name: str) -> list[int] | None:
        """The stored shape of tensor ``name``, or None if the file has no such tensor."""
        t = self.tensors.get(name)
        return None if t is None else list(t["shape"])


def read_header(path: str | Path) -> Header:
    """Read and check a safetensors header, as strictly as safetensors' own reader.

    Raises:
        FileNotFoundError: no such file.
        ManifestError: a header over :data:`MAX_HEADER_BYTES`, longer than the file, not JSON,
            or with a tensor entry whose dtype, shape or ``data_offsets`` are invalid, overlap,
            leave gaps, or run past the end of the file (a truncated download).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
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
        raw = fh.read(n)
    header = loads(raw, f"{path} is not a readable safetensors file: its header")
    if not isinstance(header, dict):
        raise ManifestError(f"{path}: the safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    try:
        _str_map(meta, "__metadata__", max_len=MAX_HEADER_BYTES)
        spans = []
        for name, t in header.items():
            key = f"tensors[{name!r:.120}]"
            _str(name, key)
            _dict(t, key, required=("dtype", "shape", "data_offsets"))
            if t["dtype"] not in DTYPE_BYTES:
                _fail(f"{key}.dtype", f"{t['dtype']!r:.40} is not a safetensors dtype")
            shape = _ints(t["shape"], f"{key}.shape")
            offs = _list(t["data_offsets"], f"{key}.data_offsets", max_len=2)
            if len(offs) != 2:
                _fail(f"{key}.data_offsets", "must be [begin, end]")
            a, b = _int(offs[0], f"{key}.data_offsets[0]"), _int(offs[1], f"{key}.data_offsets[1]")
            numel = math.prod(shape)
            if b - a != numel * DTYPE_BYTES[t["dtype"]]:
                _fail(f"{key}.data_offsets", f"[{a}, {b}] holds {b - a} bytes, but shape {shape} of {t['dtype']} "
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


# --------------------------------------------------------------------------- the plan
_PLAN_KEYS = ("version", "tracer", "dims", "depth_mode", "groups", "tensors", "attrs", "sites", "stages",
              "switchable", "mac_terms", "not_elastic")
_GROUP_KEYS = ("step", "constraint", "sort")
_STAGE_KEYS = ("order", "drop", "skip_tuple", "module", "attr", "tensors")
_ATTR_KINDS = ("int", "shape")
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_FQN = r"[\w.\-:]*"


def check_plan(data: Any, *, version: int, kind_dim: Mapping[str, str], dimensions: tuple[str, ...],
               norm_tensors: tuple[str, ...], switch_prefix: str) -> None:
    """Check a plan's JSON before :class:`elasticize.plan.Plan` is built from it.

    Args:
        data: the plan as read from the file.
        version: the newest plan version this elasticize reads.
        kind_dim: group kind -> dimension (:data:`elasticize.plan.KIND_DIM`).
        dimensions: the known dimensions.
        norm_tensors: tensor names a switchable norm may duplicate.
        switch_prefix: prefix of a switchable norm's second tensors.

    Raises:
        ManifestError: naming the first key that is missing, unknown, of the wrong type, or
            inconsistent (a group size that its tensors' shapes disagree with, choices that do
            not run from the full size down to >= 1, a stage whose blocks and choices disagree,
            a reference to a group or stage that does not exist).
    """
    p = _dict(data, "plan", required=("version", "groups", "tensors"), optional=_PLAN_KEYS)
    v = _int(p["version"], "plan.version")
    if v > version:
        raise ManifestError(f"plan format version {v} is newer than this elasticize reads ({version}); upgrade "
                            "elasticize (pip install -U elasticize)")
    _str(p.get("tracer", "fx"), "plan.tracer", pattern=r"fx|export|structure")
    dims = _list(p.get("dims", []), "plan.dims", max_len=len(dimensions))
    for i, d in enumerate(dims):
        if d not in dimensions:
            _fail(f"plan.dims[{i}]", f"{d!r:.40} is not a dimension; known: {list(dimensions)}")
    _str(p.get("depth_mode", "prefix"), "plan.depth_mode", pattern=r"prefix|spaced|skippable")
    groups: dict[str, dict[str, Any]] = {}
    for i, g in enumerate(_list(p["groups"], "plan.groups")):
        key = f"plan.groups[{i}]"
        _dict(g, key, required=("name", "kind", "size", "unit", "choices"), optional=_GROUP_KEYS)
        name = _str(g["name"], f"{key}.name")
        if name in groups:
            _fail(f"{key}.name", f"{name!r:.80} names two groups")
        if g["kind"] not in kind_dim:
            _fail(f"{key}.kind", f"{g['kind']!r:.40} is not a group kind; known: {list(kind_dim)}")
        size, unit = _int(g["size"], f"{key}.size", 1), _int(g["unit"], f"{key}.unit", 1)
        if size % unit:
            _fail(f"{key}.unit", f"{unit} does not divide the size {size}")
        step = _int(g.get("step", 1), f"{key}.step", 1)
        if "constraint" in g:
            _str(g["constraint"], f"{key}.constraint")
        if "sort" in g and not isinstance(g["sort"], bool):
            _fail(f"{key}.sort", "must be true or false")
        ch = _list(g["choices"], f"{key}.choices")
        full = size if kind_dim[g["kind"]] == "width" else size // unit
        per = unit * step if kind_dim[g["kind"]] == "width" else step
        if not ch or any(isinstance(c, bool) or not isinstance(c, int) for c in ch) or ch[0] != full \
                or any(a <= b for a, b in zip(ch, ch[1:])) or ch[-1] < 1 or any(c % per for c in ch):
            _fail(f"{key}.choices", f"must run from the full size {full} down to >= 1 in steps of {per}, largest "
                  f"first; got {ch!r:.120}")
        groups[name] = g
    for fqn, info in _dict(p["tensors"], "plan.tensors", optional=None).items():
        key = f"plan.tensors[{fqn!r:.120}]"
        _str(fqn, key, pattern=_FQN)
        _dict(info, key, required=("shape", "param", "axes"), optional=("persistent",))
        shape = _ints(info["shape"], f"{key}.shape")
        if not isinstance(info["param"], bool):
            _fail(f"{key}.param", "must be true or false")
        if info.get("persistent", False) is not False:
            _fail(f"{key}.persistent", "may only be false")
        for ax, entry in _dict(info["axes"], f"{key}.axes", optional=None).items():
            akey = f"{key}.axes[{ax!r:.20}]"
            if not re.fullmatch(r"\d{1,2}", ax) or int(ax) >= len(shape):
                _fail(akey, f"the tensor has {len(shape)} axes")
            e = _list(entry, akey, max_len=3)
            if len(e) < 2 or e[0] not in groups:
                _fail(akey, f"must be [group, chunks] or [group, chunks, div] with a group of the plan, got {e!r:.120}")
            chunks, div = _int(e[1], f"{akey}[1]", 1), _int(e[2], f"{akey}[2]", 1) if len(e) > 2 else 1
            gsize = groups[e[0]]["size"]
            if gsize % div or shape[int(ax)] != chunks * (gsize // div):
                _fail(akey, f"the axis has {shape[int(ax)]} entries but group {e[0]!r:.80} of size {gsize} in {chunks} "
                      f"chunk(s), divided by {div}, needs {chunks * (gsize // max(div, 1))}")
    for module, attrs in _dict(p.get("attrs", {}), "plan.attrs", optional=None).items():
        _str(module, f"plan.attrs[{module!r:.120}]", pattern=_FQN)
        for name, e in _dict(attrs, f"plan.attrs[{module!r:.120}]", optional=None).items():
            key = f"plan.attrs[{module!r:.120}].{name:.80}"
            _str(name, key, pattern=_IDENT)
            if name.startswith("_"):
                _fail(key, "a private attribute cannot be elastic")
            e = _list(e, key, max_len=4)
            if len(e) != 4 or e[0] not in groups or e[1] not in _ATTR_KINDS:
                _fail(key, f"must be [group, kind ({'/'.join(_ATTR_KINDS)}), mul, div], got {e!r:.120}")
            _int(e[2], f"{key}[2]", 1, 1 << 20), _int(e[3], f"{key}[3]", 1, 1 << 20)
    for module, rule in _dict(p.get("sites", {}), "plan.sites", optional=None).items():
        _str(module, f"plan.sites[{module!r:.120}]", pattern=_FQN)
        _str(rule, f"plan.sites[{module!r:.120}]", pattern=r"[\w.\-]+")
    stages: dict[str, dict[str, Any]] = {}
    for i, s in enumerate(_list(p.get("stages", []), "plan.stages")):
        key = f"plan.stages[{i}]"
        _dict(s, key, required=("name", "blocks", "n_mandatory", "first_skippable", "choices"), optional=_STAGE_KEYS)
        name = _str(s["name"], f"{key}.name")
        if name in stages:
            _fail(f"{key}.name", f"{name!r:.80} names two stages")
        blocks = [_str(b, f"{key}.blocks[{j}]", pattern=_FQN) for j, b in enumerate(_list(s["blocks"], f"{key}.blocks"))]
        n = len(blocks)
        if n < 1 or len(set(blocks)) != n:
            _fail(f"{key}.blocks", "must list one or more distinct blocks")
        _int(s["n_mandatory"], f"{key}.n_mandatory", 0, n)
        _int(s["first_skippable"], f"{key}.first_skippable", 0, n)
        ch = _list(s["choices"], f"{key}.choices")
        if not ch or any(isinstance(c, bool) or not isinstance(c, int) for c in ch) or ch[0] != n \
                or any(a <= b for a, b in zip(ch, ch[1:])) or ch[-1] < 0:
            _fail(f"{key}.choices", f"must run from the stage's {n} blocks down to >= 0, largest first; got {ch!r:.120}")
        if "order" in s:
            order = _ints(s["order"], f"{key}.order") if n <= 64 else [
                _int(x, f"{key}.order", 0) for x in _list(s["order"], f"{key}.order")]
            if sorted(order) != list(range(n)):
                _fail(f"{key}.order", f"must be a permutation of the {n} block indices")
        if "drop" in s:
            _str(s["drop"], f"{key}.drop", pattern=r"identity|remove")
        if "skip_tuple" in s:
            _int(s["skip_tuple"], f"{key}.skip_tuple", 0, 64)
        if "module" in s or "attr" in s or "tensors" in s:
            _str(s.get("module"), f"{key}.module", pattern=_FQN)
            _str(s.get("attr"), f"{key}.attr", pattern=_IDENT)
            if s["attr"].startswith("_"):
                _fail(f"{key}.attr", "a private attribute cannot follow the depth")
            ts = _list(s.get("tensors"), f"{key}.tensors")
            if len(ts) != n:
                _fail(f"{key}.tensors", f"must list the tensors of each of the {n} layers")
            for j, names in enumerate(ts):
                for name in _list(names, f"{key}.tensors[{j}]"):
                    if _str(name, f"{key}.tensors[{j}]") not in p["tensors"]:
                        _fail(f"{key}.tensors[{j}]", f"{name!r:.80} is not a tensor of the plan")
        stages[name] = s
    for module, sw in _dict(p.get("switchable", {}), "plan.switchable", optional=None).items():
        key = f"plan.switchable[{module!r:.120}]"
        _str(module, key, pattern=_FQN)
        _dict(sw, key, required=("stage", "tensors"))
        if sw["stage"] not in stages:
            _fail(f"{key}.stage", f"{sw['stage']!r:.80} is not a stage of the plan")
        for j, t in enumerate(_list(sw["tensors"], f"{key}.tensors", max_len=len(norm_tensors))):
            if t not in norm_tensors:
                _fail(f"{key}.tensors[{j}]", f"{t!r:.40} is not a norm tensor ({', '.join(norm_tensors)})")
    for i, term in enumerate(_list(p.get("mac_terms", []), "plan.mac_terms")):
        key = f"plan.mac_terms[{i}]"
        e = _list(term, key, max_len=3)
        if len(e) != 3:
            _fail(key, "must be [owner, MACs per sample, [group, ...]]")
        _str(e[0], f"{key}[0]", pattern=_FQN)
        _num(e[1], f"{key}[1]")
        if e[1] < 0:
            _fail(f"{key}[1]", "MACs cannot be negative")
        for f in _list(e[2], f"{key}[2]"):
            if f not in groups:
                _fail(f"{key}[2]", f"{f!r:.80} is not a group of the plan")
    for i, ne in enumerate(_list(p.get("not_elastic", []), "plan.not_elastic")):
        e = _list(ne, f"plan.not_elastic[{i}]", max_len=2)
        if len(e) != 2:
            _fail(f"plan.not_elastic[{i}]", "must be [where, why]")
        _str(e[0], f"plan.not_elastic[{i}][0]", max_len=100_000), _str(e[1], f"plan.not_elastic[{i}][1]", max_len=100_000)
    for path, sw in p.get("switchable", {}).items():
        for t in sw["tensors"]:
            if (f"{path}.{t}" if path else t) not in p["tensors"]:
                _fail(f"plan.switchable[{path!r:.120}]", f"{t!r} is not a tensor of {path!r:.80} in the plan")


# --------------------------------------------------------------------------- the manifest
_SUPER_KEYS = ("input_shapes", "importance", "aliases", "bn_stats", "files")
_SUB_KEYS = ("input_shapes", "importance", "aliases", "files")
_COMMON = ("format", "format_version", "library_version", "kind", "recipe", "plan", "search_space")
#: Prefix of the stored per-preset calibrated BatchNorm statistics (format version 2).
BN_PREFIX = "elastic_bn."
#: Prefix of the small files (a tokenizer's) a file carries as uint8 tensors.
FILE_PREFIX = "elastic_file."


def bn_name(preset: str, fqn: str) -> str:
    """The stored name of preset ``preset``'s calibrated BatchNorm buffer ``fqn``."""
    return f"{BN_PREFIX}{preset}.{fqn}"


def live_state(plan: Any, space: Any, cfg: dict) -> Any:
    """The switches of ``plan`` set to ``cfg``, without a model (for tables and shapes)."""
    from .modules import GroupState, StageState
    from .plan import ElasticState

    state = ElasticState({g["name"]: GroupState(g["name"], g["size"], g["unit"]) for g in plan.groups},
                         {s["name"]: StageState(s["name"], len(s["blocks"]), s["first_skippable"]) for s in plan.stages},
                         [])
    space.apply(state, cfg)
    return state


def preset_table(plan: Any, space: Any, preset: str, cfg: dict, stored: Mapping[str, tuple[list[int], int]],
                 calibrated: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
    """A preset's tensor table, as the manifest stores it, and the bytes it reads.

    The one place the table is computed: :func:`elasticize.save` writes it and every reader checks
    the file's copy against it.

    Args:
        plan: the plan.
        space: its search space.
        preset: the preset's name.
        cfg: its resolved configuration.
        stored: tensor name -> (shape, bytes per element) of the super-network's stored tensors.
        calibrated: the preset's calibrated BatchNorm buffers (fqn -> anything), stored under
            :func:`bn_name`.

    Returns:
        ``({dense name: {"source", "shape", "slices"}}, total bytes)``.
    """
    from .export import dense_tensors

    spec = dense_tensors(plan, space, live_state(plan, space, cfg), cfg)
    tensors: dict[str, Any] = {}
    total = 0
    for dense, (src, ranges) in spec.items():
        if plan.tensors.get(src, {}).get("persistent") is False:
            continue  # not in the file: the model builds it (see Plan.tensors)
        shape0, item = stored[src]
        shape = list(shape0) if ranges is None else [sum(b - a for a, b in rs) for rs in ranges]
        total += math.prod(shape) * item
        if src in calibrated:
            tensors[dense] = {"source": bn_name(preset, src), "shape": shape, "slices": None}
        else:
            tensors[dense] = {"source": src, "shape": shape,
                              "slices": None if ranges is None else [[list(r) for r in rs] for rs in ranges]}
    return tensors, total


def check_files(files: Any, header: Header) -> dict[str, dict[str, Any]]:
    """Check the manifest's ``files`` (small files carried as uint8 tensors, e.g. a tokenizer's).

    Raises:
        ManifestError: a name outside :data:`elasticize.adapters.hf.TOKENIZER_FILES`, an entry that
            does not point at a uint8 tensor of its size under :data:`FILE_PREFIX`, or such a tensor
            that the manifest does not list.
    """
    from .adapters.hf import check_file_name

    _dict(files, "files", optional=None)
    for name, e in files.items():
        key = f"files[{name!r:.80}]"
        try:
            check_file_name(name)
        except ValueError as e:
            _fail(key, str(e)[:300])
        _dict(e, key, required=("tensor", "bytes", "sha256"))
        t = header.tensors.get(e["tensor"])
        if e["tensor"] != FILE_PREFIX + name or t is None or t["dtype"] != "U8" or t["shape"] != [
                _int(e["bytes"], f"{key}.bytes")]:
            _fail(key, "must point at a uint8 tensor of its size under " + FILE_PREFIX)
        _str(e["sha256"], f"{key}.sha256", pattern=r"[0-9a-f]{64}")
    unlisted = sorted(n for n in header.tensors if n.startswith(FILE_PREFIX)) 
    unlisted = [n for n in unlisted if n.removeprefix(FILE_PREFIX) not in files]
    if unlisted:
        _fail("files", f"does not list the stored file(s) {unlisted[:3]}; the file is corrupted")
    return files


def check_manifest(m: Any, *, header: Header, tables: Any, format_version: int) -> tuple[Any, Any]:
    """Check a whole manifest against the file's header; return ``(plan, search space)``.

    Raises:
        ManifestError: naming the key: missing ``kind`` or ``plan``, unknown keys, a version this
            elasticize does not read, sizes that disagree with the stored tensors, preset
            configurations outside the search space, MACs/params/bytes or per-preset tables that
            differ from what the plan computes, calibrated statistics or aliases that point at
            tensors the file does not hold, a recipe off its adapter's allow-list.
    """
    from .adapters import check_recipe
    from .export import dense_tensors
    from .modules import SWITCH_PREFIX
    from .plan import Plan
    from .space import SearchSpace

    _dict(m, "(top level)", required=("format", "format_version", "kind", "plan"), optional=None)
    if m["format"] != "elasticize":
        _fail("format", f"is {m['format']!r:.40}, not 'elasticize'")
    version = _int(m["format_version"], "format_version", 1)
    if version > format_version:
        raise ManifestError(f"written in elasticize file format {version} (by elasticize "
                            f"{str(m.get('library_version', '?'))[:40]}); this elasticize reads format "
                            f"{format_version} and older. Upgrade: pip install -U elasticize")
    kind = m["kind"]
    if kind not in ("super-network", "sub-network"):
        _fail("kind", f"is {kind!r:.40}; it must be 'super-network' or 'sub-network'")
    if kind == "super-network":
        _dict(m, "(top level)", required=_COMMON + ("presets",), optional=_SUPER_KEYS)
    else:
        _dict(m, "(top level)", required=_COMMON + ("config", "macs", "params"), optional=_SUB_KEYS)
    if "bn_stats" in m and version < 2:
        _fail("bn_stats", "calibrated statistics need format version 2")
    _str(m["library_version"], "library_version", max_len=64)
    try:
        check_recipe(m["recipe"])
    except (KeyError, TypeError, ValueError) as e:
        raise ManifestError(f"manifest key recipe: {e.args[0] if e.args else e}") from None
    for i, s in enumerate(_list(m.get("input_shapes", []), "input_shapes", max_len=64)):
        shape = _ints(s, f"input_shapes[{i}]", 0)
        if math.prod(shape) > 1 << 31:
            _fail(f"input_shapes[{i}]", f"{shape} is too large an example input")
    imp = m.get("importance")
    if imp is not None:
        _dict(imp, "importance", optional=("order", "calibration_batches"))
        if imp.get("order") is not None:
            _str(imp["order"], "importance.order", pattern=r"[\w\-]{1,40}")
        if "calibration_batches" in imp:
            _int(imp["calibration_batches"], "importance.calibration_batches")
    aliases = _str_map(m.get("aliases", {}), "aliases")
    plan = Plan.from_json(m["plan"])
    space = SearchSpace(plan)
    if _plain(m["search_space"]) != _plain(space.dimensions):
        _fail("search_space", "differs from the plan's choices; the file is corrupted")
    for alias, target in aliases.items():
        if alias in header.tensors or target not in header.tensors:
            _fail(f"aliases[{alias!r:.120}]", f"must name a tensor the file does not store and one it stores "
                  f"({target!r:.120})")
    check_files(m.get("files", {}), header)
    if m.get("files") and version < 3:
        _fail("files", "stored files need format version 3")
    stored = {n for n in header.tensors if not n.startswith(FILE_PREFIX)}

    def shape_of(name: str) -> list[int] | None:
        return header.shape(aliases.get(name, name))

    if kind == "sub-network":
        cfg = _config(space, m["config"], "config")
        _counts(space, cfg, m, "")
        spec = dense_tensors(plan, space, live_state(plan, space, cfg), cfg)
        want: dict[str, list[int]] = {}
        for dense, (src, ranges) in spec.items():
            info = plan.tensors.get(src) or plan.tensors.get(src.replace(SWITCH_PREFIX, "")) or {}
            if info.get("persistent") is False:
                continue
            want[dense] = (list(info["shape"]) if info else shape_of(dense)) if ranges is None else \
                [sum(b - a for a, b in rs) for rs in ranges]
        _same_set(set(want) - set(aliases), stored, "the stored tensors of this sub-network")
        for n, shape in want.items():
            if shape_of(n) != shape:
                _fail(f"tensors[{n!r:.120}]", f"is stored with shape {shape_of(n)} but the sub-network needs {shape}")
        return plan, space
    for fqn, info in plan.tensors.items():
        if info.get("persistent") is False:
            if fqn in header.tensors:
                _fail(f"plan.tensors[{fqn!r:.120}]", "is marked persistent: false but the file stores it")
            continue
        if shape_of(fqn) is not None and shape_of(fqn) != list(info["shape"]):
            _fail(f"plan.tensors[{fqn!r:.120}].shape", f"is {info['shape']} but the file stores {shape_of(fqn)}")
        dtype = header.tensors.get(aliases.get(fqn, fqn), {}).get("dtype")
        if info["param"] and dtype is not None and dtype not in _FLOAT:
            _fail(f"tensors[{fqn!r:.120}].dtype", f"a parameter is stored as {dtype}, not a floating-point dtype")
    presets = _dict(m["presets"], "presets", required=("full",), optional=None)
    for name in presets:
        _str(name, f"presets[{name!r:.80}]", pattern=r"[\w.\-]{1,128}")
    bn = _dict(m.get("bn_stats", {}), "bn_stats", optional=None)
    if tables is not None:
        _dict(tables, "elasticize.presets", optional=None)
        _same_set(set(presets), set(tables), "the per-preset tables (metadata key elasticize.presets)")
    switch = {f"{mod}.{SWITCH_PREFIX}{t}" if mod else f"{SWITCH_PREFIX}{t}"
              for mod, sw in plan.switchable.items() for t in sw["tensors"]}
    stored_bn: set[str] = set()
    for name, table in bn.items():
        if name not in presets:
            _fail(f"bn_stats[{name!r:.80}]", "is not a preset of the file")
        for fqn, s in _str_map(table, f"bn_stats[{name!r:.80}]").items():
            key = f"bn_stats[{name!r:.80}][{fqn!r:.120}]"
            if (fqn not in plan.tensors and fqn not in switch) or fqn.rpartition(".")[2].removeprefix(SWITCH_PREFIX) \
                    not in ("running_mean", "running_var"):
                _fail(key, "is not a BatchNorm running statistic of the plan")
            if s != bn_name(name, fqn) or s not in header.tensors:
                _fail(key, f"points at {s!r:.120}, which the file does not hold under that name")
            stored_bn.add(s)
    items = {n: (header.shape(n), DTYPE_BYTES[t["dtype"]]) for n, t in header.tensors.items()}
    items.update({a: items[t] for a, t in aliases.items()})
    for fqn, info in plan.tensors.items():  # non-persistent tensors: the plan's shape, 4 bytes (never stored)
        items.setdefault(fqn, (list(info["shape"]), 4))
    for name, entry in presets.items():
        key = f"presets[{name!r:.80}]"
        _dict(entry, key, required=("config", "macs", "params"), optional=("bytes", "metrics", "tensors"))
        cfg = _config(space, entry["config"], f"{key}.config")
        if name == "full" and cfg != space.full():
            _fail(f"{key}.config", "the preset 'full' must be the whole super-network")
        _counts(space, cfg, entry, key + ".")
        for mk, mv in _dict(entry.get("metrics", {}), f"{key}.metrics", optional=None).items():
            _str(mk, f"{key}.metrics", pattern=r"[\w.\-]{1,64}")
            _num(mv, f"{key}.metrics.{mk}")
        calibrated = bn.get(name, {})
        try:
            table, total = preset_table(plan, space, name, cfg, items, calibrated)
        except KeyError as e:
            raise ManifestError(f"manifest key {key}: the file does not store tensor {e.args[0]!r:.120}") from None
        for dense, e in table.items():
            if e["source"].startswith(BN_PREFIX) and header.shape(e["source"]) != e["shape"]:
                _fail(f"bn_stats[{name!r:.80}]", f"{e['source']!r:.120} is stored with shape "
                      f"{header.shape(e['source'])}; the preset's {dense!r:.80} has {e['shape']}")
        if "bytes" in entry and _int(entry["bytes"], f"{key}.bytes") != total:
            _fail(f"{key}.bytes", f"is {entry['bytes']} but the preset's tensors hold {total} bytes")
        if tables is not None and _plain(tables[name]) != _plain(table):
            bad = next((k for k in sorted(set(table) | set(tables[name] if isinstance(tables[name], dict) else {}))
                        if not isinstance(tables[name], dict) or _plain(table.get(k)) != _plain(tables[name].get(k))),
                       "(the table)")
            _fail(f"elasticize.presets[{name!r:.80}]", f"the entry {bad!r:.120} differs from what the plan computes; "
                  "a reader following it would cut another sub-network. The file is corrupted")
    expected = ({f for f, info in plan.tensors.items() if info.get("persistent") is not False} | switch
                | stored_bn) - set(aliases)
    _same_set(expected, stored, "the stored tensors")
    return plan, space


def _plain(v: Any) -> Any:
    """``v`` with tuples as lists, so a table computed here compares equal to one read from JSON."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _config(space: Any, cfg: Any, key: str) -> dict:
    try:
        resolved = space.resolve(cfg)
    except (KeyError, ValueError, TypeError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        raise ManifestError(f"manifest key {key}: is outside the search space: {msg}") from None
    if _plain(resolved) != _plain(cfg):
        _fail(key, "must list every group and stage at one of its choices")
    return resolved


def _counts(space: Any, cfg: dict, entry: dict, key: str) -> None:
    for what, fn in (("macs", space.macs), ("params", space.params)):
        want = fn(cfg)
        if _int(entry[what], key + what) != want:
            _fail(key + what, f"is {entry[what]} but the plan computes {want}")


def _same_set(expected: set[str], stored: set[str], what: str) -> None:
    missing, extra = sorted(expected - stored), sorted(stored - expected)
    if missing or extra:
        parts = [f"{label} {len(v)} ({', '.join(repr(x)[:80] for x in v[:3])}{', ...' if len(v) > 3 else ''})"
                 for label, v in (("missing", missing), ("unexpected", extra)) if v]
        raise ManifestError(f"{what} disagree with the plan: {'; '.join(parts)}; the file is corrupted")
