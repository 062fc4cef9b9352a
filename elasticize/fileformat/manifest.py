"""Checking a whole manifest against its file, and the one function that computes a preset's tensor table.

The per-preset tables are the contract for readers in other languages (see the file format
page): :func:`preset_table` computes them for :func:`elasticize.save` and for every reader's check,
so a file whose tables disagree with its plan is refused.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from ..plan.parse import (DTYPE_BYTES, FLOAT_DTYPES, ManifestError, as_dict, as_int, as_ints, as_list, as_num, as_str,
                          as_str_map, fail)
from ..export import dense_tensors
from ..modules import SWITCH_PREFIX, GroupState, StageState
from ..plan import MANIFEST_FORMAT, ElasticState, Plan
from ..plan.manifest import Manifest
from ..space import SearchSpace
from ..tensorfile import name_summary
from .header import Header
from .measurements import BIAS_PREFIX, check_compensation, check_measurements

__all__ = ["BN_PREFIX", "FILE_PREFIX", "bn_name", "live_state", "preset_table", "check_files", "check_manifest"]

_SUPER_KEYS = ("input_shapes", "importance", "aliases", "bn_stats", "files", "measurements", "bias_compensation",
               "layout")
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

    state = ElasticState({g.name: GroupState(g.name, g.size, g.unit) for g in plan.groups},
                         {s.name: StageState(s.name, len(s.blocks), s.first_skippable) for s in plan.stages}, [])
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
        calibrated: the preset's calibrated tensors: BatchNorm buffers (fqn -> anything, stored under
            :func:`bn_name`) and compensated biases (fqn -> stored name, see
            :mod:`elasticize.fileformat.measurements`).

    Returns:
        ``({dense name: {"source", "shape", "slices"}}, total bytes)``.
    """

    spec = dense_tensors(plan, space, live_state(plan, space, cfg), cfg)
    tensors: dict[str, Any] = {}
    total = 0
    for dense, (src, ranges) in spec.items():
        if src in plan.tensors and not plan.tensors[src].persistent:
            continue  # not in the file: the model builds it (see Plan.tensors)
        shape0, item = stored[src]
        shape = list(shape0) if ranges is None else [sum(b - a for a, b in rs) for rs in ranges]
        total += math.prod(shape) * item
        if src in calibrated:
            name = calibrated[src] if isinstance(calibrated[src], str) else bn_name(preset, src)
            tensors[dense] = {"source": name, "shape": shape, "slices": None}
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
    from ..adapters.hf import check_file_name

    as_dict(files, "files", optional=None)
    for name, e in files.items():
        key = f"files[{name!r:.80}]"
        try:
            check_file_name(name)
        except ValueError as e:
            fail(key, str(e)[:300])
        as_dict(e, key, required=("tensor", "bytes", "sha256"))
        t = header.tensors.get(e["tensor"])
        if e["tensor"] != FILE_PREFIX + name or t is None or t["dtype"] != "U8" or t["shape"] != [
                as_int(e["bytes"], f"{key}.bytes")]:
            fail(key, "must point at a uint8 tensor of its size under " + FILE_PREFIX)
        as_str(e["sha256"], f"{key}.sha256", pattern=r"[0-9a-f]{64}")
    unlisted = sorted(n for n in header.tensors if n.startswith(FILE_PREFIX)) 
    unlisted = [n for n in unlisted if n.removeprefix(FILE_PREFIX) not in files]
    if unlisted:
        fail("files", f"does not list the stored file(s) {unlisted[:3]}; the file is corrupted")
    return files


class _File:
    """What the checks of one file share: its header, aliases, plan and search space."""

    def __init__(self, header: Header, aliases: dict[str, str], plan: Plan, space: SearchSpace) -> None:
        self.header, self.aliases, self.plan, self.space = header, aliases, plan, space
        self.stored = {n for n in header.tensors if not n.startswith(FILE_PREFIX)}

    def shape_of(self, name: str) -> list[int] | None:
        """The stored shape of ``name`` (or of the tensor it aliases)."""
        return self.header.shape(self.aliases.get(name, name))


def check_manifest(m: Any, *, header: Header, tables: Any,
                   format_version: int = MANIFEST_FORMAT.current) -> tuple[Manifest, SearchSpace]:
    """Check a whole manifest against the file's header, migrate it from its format version to the current
    one (:data:`elasticize.plan.migrate.MANIFEST_FORMAT`, one registered step per old version) and type it.

    Returns:
        ``(the typed manifest, the plan's search space)``; the manifest keeps the version it was written in.

    Raises:
        ManifestError: naming the key: missing ``kind`` or ``plan``, unknown keys, a version this
            elasticize does not read, sizes that disagree with the stored tensors, preset
            configurations outside the search space, MACs/params/bytes or per-preset tables that
            differ from what the plan computes, calibrated statistics or aliases that point at
            tensors the file does not hold, a recipe off its adapter's allow-list.
    """
    version = _check_top(m, format_version)
    aliases = as_str_map(m.get("aliases", {}), "aliases")
    plan = Plan.from_json(m["plan"])
    space = SearchSpace(plan)
    if _plain(m["search_space"]) != _plain(space.dimensions):
        fail("search_space", "differs from the plan's choices; the file is corrupted")
    for alias, target in aliases.items():
        if alias in header.tensors or target not in header.tensors:
            fail(f"aliases[{alias!r:.120}]", f"must name a tensor the file does not store and one it stores "
                 f"({target!r:.120})")
    check_files(m.get("files", {}), header)
    f = _File(header, aliases, plan, space)
    if m["kind"] == "sub-network":
        _check_sub_network(m, f)
    else:
        _check_super_network(m, tables, f)
    migrated = MANIFEST_FORMAT.migrate(m, version)
    return Manifest.from_json({**migrated, "format_version": version}, plan), space


def _check_top(m: Any, format_version: int) -> int:
    """The top-level keys, the version, the recipe, the example input shapes and the importance record."""
    from ..adapters import check_recipe

    as_dict(m, "(top level)", required=("format", "format_version", "kind", "plan"), optional=None)
    if m["format"] != "elasticize":
        fail("format", f"is {m['format']!r:.40}, not 'elasticize'")
    version = as_int(m["format_version"], "format_version", 1)
    if version > format_version:
        raise ManifestError(f"written in elasticize file format {version} (by elasticize "
                            f"{str(m.get('library_version', '?'))[:40]}); this elasticize reads format "
                            f"{format_version} and older. Upgrade: pip install -U elasticize")
    kind = m["kind"]
    if kind not in ("super-network", "sub-network"):
        fail("kind", f"is {kind!r:.40}; it must be 'super-network' or 'sub-network'")
    if kind == "super-network":
        as_dict(m, "(top level)", required=_COMMON + ("presets",), optional=_SUPER_KEYS)
    else:
        as_dict(m, "(top level)", required=_COMMON + ("config", "macs", "params"), optional=_SUB_KEYS)
    MANIFEST_FORMAT.check_keys(m, version)  # e.g. bn_stats in a format-1 file
    as_str(m["library_version"], "library_version", max_len=64)
    try:
        check_recipe(m["recipe"])
    except (KeyError, TypeError, ValueError) as e:
        raise ManifestError(f"manifest key recipe: {e.args[0] if e.args else e}") from None
    for i, s in enumerate(as_list(m.get("input_shapes", []), "input_shapes", max_len=64)):
        shape = as_ints(s, f"input_shapes[{i}]", 0)
        if math.prod(shape) > 1 << 31:
            fail(f"input_shapes[{i}]", f"{shape} is too large an example input")
    imp = m.get("importance")
    if imp is not None:
        as_dict(imp, "importance", optional=("order", "calibration_batches"))
        if imp.get("order") is not None:
            as_str(imp["order"], "importance.order", pattern=r"[\w\-]{1,40}")
        if "calibration_batches" in imp:
            as_int(imp["calibration_batches"], "importance.calibration_batches")
    return version


def _check_sub_network(m: dict, f: _File) -> None:
    """A dense sub-network file: its configuration, counts, and exactly the tensors of that sub-network."""
    plan, space = f.plan, f.space
    cfg = _config(space, m["config"], "config")
    _counts(space, cfg, m, "")
    spec = dense_tensors(plan, space, live_state(plan, space, cfg), cfg)
    want: dict[str, list[int] | None] = {}
    for dense, (src, ranges) in spec.items():
        info = plan.tensors.get(src) or plan.tensors.get(src.replace(SWITCH_PREFIX, ""))
        if info is not None and not info.persistent:
            continue
        want[dense] = (list(info.shape) if info else f.shape_of(dense)) if ranges is None else \
            [sum(b - a for a, b in rs) for rs in ranges]
    _same_set(set(want) - set(f.aliases), f.stored, "the stored tensors of this sub-network")
    for n, shape in want.items():
        if f.shape_of(n) != shape:
            fail(f"tensors[{n!r:.120}]", f"is stored with shape {f.shape_of(n)} but the sub-network needs {shape}")


def _check_super_network(m: dict, tables: Any, f: _File) -> None:
    """A super-network file: its tensors against the plan, its calibrated statistics, every preset."""
    plan, header = f.plan, f.header
    for fqn, info in plan.tensors.items():
        if not info.persistent:
            if fqn in header.tensors:
                fail(f"plan.tensors[{fqn!r:.120}]", "is marked persistent: false but the file stores it")
            continue
        if f.shape_of(fqn) is not None and f.shape_of(fqn) != list(info.shape):
            fail(f"plan.tensors[{fqn!r:.120}].shape", f"is {list(info.shape)} but the file stores {f.shape_of(fqn)}")
        dtype = header.tensors.get(f.aliases.get(fqn, fqn), {}).get("dtype")
        if info.param and dtype is not None and dtype not in FLOAT_DTYPES:
            fail(f"tensors[{fqn!r:.120}].dtype", f"a parameter is stored as {dtype}, not a floating-point dtype")
    presets = as_dict(m["presets"], "presets", required=("full",), optional=None)
    for name in presets:
        as_str(name, f"presets[{name!r:.80}]", pattern=r"[\w.\-]{1,128}")
    bn = as_dict(m.get("bn_stats", {}), "bn_stats", optional=None)
    if tables is not None:
        as_dict(tables, "elasticize.presets", optional=None)
        _same_set(set(presets), set(tables), "the per-preset tables (metadata key elasticize.presets)")
    switch = {f"{mod}.{SWITCH_PREFIX}{t}" if mod else f"{SWITCH_PREFIX}{t}"
              for mod, sw in plan.switchable.items() for t in sw.tensors}
    stored_bn = _check_bn_stats(bn, presets, switch, f)
    check_measurements(m.get("measurements", {}), f.space)  # their format version: _check_top
    stored_comp, comp = check_compensation(m.get("bias_compensation", {}), presets, plan, header)
    items = {n: (header.shape(n), DTYPE_BYTES[t["dtype"]]) for n, t in header.tensors.items()}
    items.update({a: items[t] for a, t in f.aliases.items()})
    for fqn, info in plan.tensors.items():  # non-persistent tensors: the plan's shape, 4 bytes (never stored)
        items.setdefault(fqn, (list(info.shape), 4))
    for name, entry in presets.items():
        _check_preset(name, entry, None if tables is None else tables[name],
                      {**bn.get(name, {}), **comp.get(name, {})}, items, f)
    expected = ({n for n, info in plan.tensors.items() if info.persistent} | switch
                | stored_bn | stored_comp) - set(f.aliases)
    _same_set(expected, f.stored, "the stored tensors")


def _check_bn_stats(bn: dict, presets: dict, switch: set[str], f: _File) -> set[str]:
    """Each preset's calibrated BatchNorm statistics point at stored running statistics; return their names."""
    stored: set[str] = set()
    for name, table in bn.items():
        if name not in presets:
            fail(f"bn_stats[{name!r:.80}]", "is not a preset of the file")
        for fqn, s in as_str_map(table, f"bn_stats[{name!r:.80}]").items():
            key = f"bn_stats[{name!r:.80}][{fqn!r:.120}]"
            if (fqn not in f.plan.tensors and fqn not in switch) or fqn.rpartition(".")[2].removeprefix(SWITCH_PREFIX) \
                    not in ("running_mean", "running_var"):
                fail(key, "is not a BatchNorm running statistic of the plan")
            if s != bn_name(name, fqn) or s not in f.header.tensors:
                fail(key, f"points at {s!r:.120}, which the file does not hold under that name")
            stored.add(s)
    return stored


def _check_preset(name: str, entry: Any, table_read: Any, calibrated: dict, items: dict, f: _File) -> None:
    """One preset: its configuration, MACs, params, metrics, bytes and tensor table, against the plan."""
    key = f"presets[{name!r:.80}]"
    space = f.space
    as_dict(entry, key, required=("config", "macs", "params"), optional=("bytes", "metrics", "tensors"))
    cfg = _config(space, entry["config"], f"{key}.config")
    if name == "full" and cfg != space.full():
        fail(f"{key}.config", "the preset 'full' must be the whole super-network")
    _counts(space, cfg, entry, key + ".")
    for mk, mv in as_dict(entry.get("metrics", {}), f"{key}.metrics", optional=None).items():
        as_str(mk, f"{key}.metrics", pattern=r"[\w.\-]{1,64}")
        as_num(mv, f"{key}.metrics.{mk}")
    try:
        table, total = preset_table(f.plan, space, name, cfg, items, calibrated)
    except KeyError as e:
        raise ManifestError(f"manifest key {key}: the file does not store tensor {e.args[0]!r:.120}") from None
    for dense, e in table.items():
        if e["source"].startswith((BN_PREFIX, BIAS_PREFIX)) and f.header.shape(e["source"]) != e["shape"]:
            fail(f"bn_stats[{name!r:.80}]", f"{e['source']!r:.120} is stored with shape "
                 f"{f.header.shape(e['source'])}; the preset's {dense!r:.80} has {e['shape']}")
    if "bytes" in entry and as_int(entry["bytes"], f"{key}.bytes") != total:
        fail(f"{key}.bytes", f"is {entry['bytes']} but the preset's tensors hold {total} bytes")
    if table_read is not None and _plain(table_read) != _plain(table):
        read = table_read if isinstance(table_read, dict) else {}
        bad = next((k for k in sorted(set(table) | set(read)) if _plain(table.get(k)) != _plain(read.get(k))),
                   "(the table)")
        fail(f"elasticize.presets[{name!r:.80}]", f"the entry {bad!r:.120} differs from what the plan computes; "
             "a reader following it would cut another sub-network. The file is corrupted")


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
        fail(key, "must list every group and stage at one of its choices")
    return resolved


def _counts(space: Any, cfg: dict, entry: dict, key: str) -> None:
    for what, fn in (("macs", space.macs), ("params", space.params)):
        want = fn(cfg)
        if as_int(entry[what], key + what) != want:
            fail(key + what, f"is {entry[what]} but the plan computes {want}")


def _same_set(expected: set[str], stored: set[str], what: str) -> None:
    missing, extra = sorted(expected - stored), sorted(stored - expected)
    if missing or extra:
        summary = name_summary((("missing", missing), ("unexpected", extra)), quote=True)
        raise ManifestError(f"{what} disagree with the plan: {summary}; the file is corrupted")
