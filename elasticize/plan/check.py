"""The strict check of a plan read from a file, before :class:`~elasticize.plan.core.Plan` is built from it."""

from __future__ import annotations

import re
from typing import Any, Mapping

from .parse import ManifestError, as_dict, as_int, as_ints, as_list, as_num, as_str, fail

__all__ = ["check_plan"]

_PLAN_KEYS = ("version", "tracer", "dims", "depth_mode", "groups", "tensors", "attrs", "sites", "stages",
              "switchable", "mac_terms", "not_elastic")
_GROUP_KEYS = ("step", "constraint", "sort")
_STAGE_KEYS = ("order", "drop", "skip_tuple", "module", "attr", "tensors", "outputs", "skip_empty")
_ATTR_KINDS = ("int", "shape")
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_FQN = r"[\w.\-:]*"


def check_plan(data: Any, *, version: int, kind_dim: Mapping[str, str], dimensions: tuple[str, ...],
               norm_tensors: tuple[str, ...]) -> None:
    """Check a plan's JSON before :class:`elasticize.plan.Plan` is built from it.

    Args:
        data: the plan as read from the file.
        version: the newest plan version this elasticize reads.
        kind_dim: group kind -> dimension (:data:`elasticize.plan.KIND_DIM`).
        dimensions: the known dimensions.
        norm_tensors: tensor names a switchable norm may duplicate.

    Raises:
        ManifestError: naming the first key that is missing, unknown, of the wrong type, or
            inconsistent (a group size that its tensors' shapes disagree with, choices that do
            not run from the full size down to >= 1, a stage whose blocks and choices disagree,
            a reference to a group or stage that does not exist).
    """
    p = as_dict(data, "plan", required=("version", "groups", "tensors"), optional=_PLAN_KEYS)
    v = as_int(p["version"], "plan.version")
    if v > version:
        raise ManifestError(f"plan format version {v} is newer than this elasticize reads ({version}); upgrade "
                            "elasticize (pip install -U elasticize)")
    as_str(p.get("tracer", "fx"), "plan.tracer", pattern=r"fx|export|structure")
    dims = as_list(p.get("dims", []), "plan.dims", max_len=len(dimensions))
    for i, d in enumerate(dims):
        if d not in dimensions:
            fail(f"plan.dims[{i}]", f"{d!r:.40} is not a dimension; known: {list(dimensions)}")
    as_str(p.get("depth_mode", "prefix"), "plan.depth_mode", pattern=r"prefix|spaced|skippable")
    groups = _groups(p, kind_dim)
    _tensors(p, groups)
    _attrs_and_sites(p, groups)
    stages = _stages(p)
    _switchable(p, stages, norm_tensors)
    _mac_terms(p, groups)


def _groups(p: dict, kind_dim: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    groups: dict[str, dict[str, Any]] = {}
    for i, g in enumerate(as_list(p["groups"], "plan.groups")):
        key = f"plan.groups[{i}]"
        as_dict(g, key, required=("name", "kind", "size", "unit", "choices"), optional=_GROUP_KEYS)
        name = as_str(g["name"], f"{key}.name")
        if name in groups:
            fail(f"{key}.name", f"{name!r:.80} names two groups")
        if g["kind"] not in kind_dim:
            fail(f"{key}.kind", f"{g['kind']!r:.40} is not a group kind; known: {list(kind_dim)}")
        size, unit = as_int(g["size"], f"{key}.size", 1), as_int(g["unit"], f"{key}.unit", 1)
        if size % unit:
            fail(f"{key}.unit", f"{unit} does not divide the size {size}")
        step = as_int(g.get("step", 1), f"{key}.step", 1)
        if "constraint" in g:
            as_str(g["constraint"], f"{key}.constraint")
        if "sort" in g and not isinstance(g["sort"], bool):
            fail(f"{key}.sort", "must be true or false")
        ch = as_list(g["choices"], f"{key}.choices")
        full = size if kind_dim[g["kind"]] == "width" else size // unit
        per = unit * step if kind_dim[g["kind"]] == "width" else step
        if not ch or any(isinstance(c, bool) or not isinstance(c, int) for c in ch) or ch[0] != full \
                or any(a <= b for a, b in zip(ch, ch[1:])) or ch[-1] < 1 or any(c % per for c in ch):
            fail(f"{key}.choices", f"must run from the full size {full} down to >= 1 in steps of {per}, largest "
                  f"first; got {ch!r:.120}")
        groups[name] = g
    return groups


def _tensors(p: dict, groups: dict[str, dict[str, Any]]) -> None:
    for fqn, info in as_dict(p["tensors"], "plan.tensors", optional=None).items():
        key = f"plan.tensors[{fqn!r:.120}]"
        as_str(fqn, key, pattern=_FQN)
        as_dict(info, key, required=("shape", "param", "axes"), optional=("persistent",))
        shape = as_ints(info["shape"], f"{key}.shape")
        if not isinstance(info["param"], bool):
            fail(f"{key}.param", "must be true or false")
        if info.get("persistent", False) is not False:
            fail(f"{key}.persistent", "may only be false")
        for ax, entry in as_dict(info["axes"], f"{key}.axes", optional=None).items():
            akey = f"{key}.axes[{ax!r:.20}]"
            if not re.fullmatch(r"\d{1,2}", ax) or int(ax) >= len(shape):
                fail(akey, f"the tensor has {len(shape)} axes")
            if isinstance(entry, list) and entry and not isinstance(entry[0], str):
                n = _segments(entry, akey, groups)
                if n != shape[int(ax)]:
                    fail(akey, f"the axis has {shape[int(ax)]} entries but its segments hold {n}")
                continue
            e = as_list(entry, akey, max_len=3)
            if len(e) < 2 or e[0] not in groups:
                fail(akey, f"must be [group, chunks] or [group, chunks, div] with a group of the plan, got {e!r:.120}")
            chunks, div = as_int(e[1], f"{akey}[1]", 1), as_int(e[2], f"{akey}[2]", 1) if len(e) > 2 else 1
            gsize = groups[e[0]]["size"]
            if gsize % div or shape[int(ax)] != chunks * (gsize // div):
                fail(akey, f"the axis has {shape[int(ax)]} entries but group {e[0]!r:.80} of size {gsize} in {chunks} "
                      f"chunk(s), divided by {div}, needs {chunks * (gsize // max(div, 1))}")


def _segments(entry: list, key: str, groups: dict[str, dict[str, Any]]) -> int:
    """Check a segmented entry (a concatenation of groups: each segment ``[group, chunks(, div)]`` of a group
    of the plan, or an int of channels kept whole, at least one a group); returns the channels it spans."""
    total, named = 0, False
    for j, seg in enumerate(as_list(entry, key, max_len=1 << 16)):
        skey = f"{key}[{j}]"
        if isinstance(seg, int) and not isinstance(seg, bool):
            total += as_int(seg, skey, 1)
            continue
        e = as_list(seg, skey, max_len=3)
        if len(e) < 2 or e[0] not in groups:
            fail(skey, f"a segment must be [group, chunks], [group, chunks, div] with a group of the plan, or a "
                       f"number of channels; got {e!r:.120}")
        chunks, div = as_int(e[1], f"{skey}[1]", 1, 1 << 16), as_int(e[2], f"{skey}[2]", 1) if len(e) > 2 else 1
        if groups[e[0]]["size"] % div:
            fail(f"{skey}[2]", f"{div} does not divide the size of group {e[0]!r:.80}")
        total, named = total + chunks * (groups[e[0]]["size"] // div), True
    if not named:
        fail(key, "a segmented entry names no group; an axis kept whole has no entry")
    return total


def _attrs_and_sites(p: dict, groups: dict[str, dict[str, Any]]) -> None:
    for module, attrs in as_dict(p.get("attrs", {}), "plan.attrs", optional=None).items():
        as_str(module, f"plan.attrs[{module!r:.120}]", pattern=_FQN)
        for name, e in as_dict(attrs, f"plan.attrs[{module!r:.120}]", optional=None).items():
            key = f"plan.attrs[{module!r:.120}].{name:.80}"
            as_str(name, key, pattern=_IDENT)
            if name.startswith("_"):
                fail(key, "a private attribute cannot be elastic")
            e = as_list(e, key, max_len=4)
            if len(e) == 4 and isinstance(e[0], list):
                _segments(e[0], f"{key}[0]", groups)
            if len(e) != 4 or (not isinstance(e[0], list) and e[0] not in groups) or e[1] not in _ATTR_KINDS:
                fail(key, f"must be [group, kind ({'/'.join(_ATTR_KINDS)}), mul, div], got {e!r:.120}")
            as_int(e[2], f"{key}[2]", 1, 1 << 20), as_int(e[3], f"{key}[3]", 1, 1 << 20)
    for module, rule in as_dict(p.get("sites", {}), "plan.sites", optional=None).items():
        as_str(module, f"plan.sites[{module!r:.120}]", pattern=_FQN)
        as_str(rule, f"plan.sites[{module!r:.120}]", pattern=r"[\w.\-]+")


def _stages(p: dict) -> dict[str, dict[str, Any]]:
    stages: dict[str, dict[str, Any]] = {}
    for i, s in enumerate(as_list(p.get("stages", []), "plan.stages")):
        key = f"plan.stages[{i}]"
        as_dict(s, key, required=("name", "blocks", "n_mandatory", "first_skippable", "choices"), optional=_STAGE_KEYS)
        name = as_str(s["name"], f"{key}.name")
        if name in stages:
            fail(f"{key}.name", f"{name!r:.80} names two stages")
        blocks = [as_str(b, f"{key}.blocks[{j}]", pattern=_FQN) for j, b in enumerate(as_list(s["blocks"], f"{key}.blocks"))]
        n = len(blocks)
        if n < 1 or len(set(blocks)) != n:
            fail(f"{key}.blocks", "must list one or more distinct blocks")
        as_int(s["n_mandatory"], f"{key}.n_mandatory", 0, n)
        as_int(s["first_skippable"], f"{key}.first_skippable", 0, n)
        ch = as_list(s["choices"], f"{key}.choices")
        if not ch or any(isinstance(c, bool) or not isinstance(c, int) for c in ch) or ch[0] != n \
                or any(a <= b for a, b in zip(ch, ch[1:])) or ch[-1] < 0:
            fail(f"{key}.choices", f"must run from the stage's {n} blocks down to >= 0, largest first; got {ch!r:.120}")
        if "order" in s:
            order = as_ints(s["order"], f"{key}.order") if n <= 64 else [
                as_int(x, f"{key}.order", 0) for x in as_list(s["order"], f"{key}.order")]
            if sorted(order) != list(range(n)):
                fail(f"{key}.order", f"must be a permutation of the {n} block indices")
        if "drop" in s:
            as_str(s["drop"], f"{key}.drop", pattern=r"identity|remove")
        if "skip_tuple" in s:
            as_int(s["skip_tuple"], f"{key}.skip_tuple", 0, 64)
        if "skip_empty" in s:
            as_int(s["skip_empty"], f"{key}.skip_empty", 1, 1)  # written only when set
        if "outputs" in s:
            _stage_outputs(p, s["outputs"], f"{key}.outputs", n)
        if "module" in s or "attr" in s or "tensors" in s:
            as_str(s.get("module"), f"{key}.module", pattern=_FQN)
            as_str(s.get("attr"), f"{key}.attr", pattern=_IDENT)
            if s["attr"].startswith("_"):
                fail(f"{key}.attr", "a private attribute cannot follow the depth")
            ts = as_list(s.get("tensors"), f"{key}.tensors")
            if len(ts) != n:
                fail(f"{key}.tensors", f"must list the tensors of each of the {n} layers")
            for j, names in enumerate(ts):
                for name in as_list(names, f"{key}.tensors[{j}]"):
                    if as_str(name, f"{key}.tensors[{j}]") not in p["tensors"]:
                        fail(f"{key}.tensors[{j}]", f"{name!r:.80} is not a tensor of the plan")
        stages[name] = s
    return stages


def _stage_outputs(p: dict, outputs: Any, key: str, n: int) -> None:
    """A dense stage's ``outputs``: per block, a list of the groups its skip removes (each a group of the plan,
    each group the output of one block only)."""
    per = as_list(outputs, key)
    if len(per) != n:
        fail(key, f"must list the output groups of each of the {n} blocks")
    names = {g.get("name") for g in p.get("groups", []) if isinstance(g, dict)}
    seen: set[str] = set()
    for j, gs in enumerate(per):
        for g in as_list(gs, f"{key}[{j}]"):
            if as_str(g, f"{key}[{j}]") not in names:
                fail(f"{key}[{j}]", f"{g!r:.80} is not a group of the plan")
            if g in seen:
                fail(f"{key}[{j}]", f"{g!r:.80} is the output of two blocks")
            seen.add(g)


def _switchable(p: dict, stages: dict[str, dict[str, Any]], norm_tensors: tuple[str, ...]) -> None:
    for module, sw in as_dict(p.get("switchable", {}), "plan.switchable", optional=None).items():
        key = f"plan.switchable[{module!r:.120}]"
        as_str(module, key, pattern=_FQN)
        as_dict(sw, key, required=("stage", "tensors"))
        if sw["stage"] not in stages:
            fail(f"{key}.stage", f"{sw['stage']!r:.80} is not a stage of the plan")
        for j, t in enumerate(as_list(sw["tensors"], f"{key}.tensors", max_len=len(norm_tensors))):
            if t not in norm_tensors:
                fail(f"{key}.tensors[{j}]", f"{t!r:.40} is not a norm tensor ({', '.join(norm_tensors)})")
    for path, sw in p.get("switchable", {}).items():
        for t in sw["tensors"]:
            if (f"{path}.{t}" if path else t) not in p["tensors"]:
                fail(f"plan.switchable[{path!r:.120}]", f"{t!r} is not a tensor of {path!r:.80} in the plan")


def _mac_terms(p: dict, groups: dict[str, dict[str, Any]]) -> None:
    for i, term in enumerate(as_list(p.get("mac_terms", []), "plan.mac_terms")):
        key = f"plan.mac_terms[{i}]"
        e = as_list(term, key, max_len=3)
        if len(e) != 3:
            fail(key, "must be [owner, MACs per sample, [group, ...]]")
        as_str(e[0], f"{key}[0]", pattern=_FQN)
        as_num(e[1], f"{key}[1]")
        if e[1] < 0:
            fail(f"{key}[1]", "MACs cannot be negative")
        for j, f in enumerate(as_list(e[2], f"{key}[2]")):
            if isinstance(f, list):
                _segments(f, f"{key}[2][{j}]", groups)
            elif f not in groups:
                fail(f"{key}[2]", f"{f!r:.80} is not a group of the plan")
    for i, ne in enumerate(as_list(p.get("not_elastic", []), "plan.not_elastic")):
        e = as_list(ne, f"plan.not_elastic[{i}]", max_len=2)
        if len(e) != 2:
            fail(f"plan.not_elastic[{i}]", "must be [where, why]")
        as_str(e[0], f"plan.not_elastic[{i}][0]", max_len=100_000), as_str(e[1], f"plan.not_elastic[{i}][1]", max_len=100_000)
