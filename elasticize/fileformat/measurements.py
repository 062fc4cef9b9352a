"""The manifest's ``measurements`` and ``bias_compensation`` keys (format version 4, see
:data:`elasticize.plan.migrate.MANIFEST_FORMAT`), checked before use.

``measurements`` is what ``elasticize eval`` measured, per device and batch size (see
:mod:`elasticize.measured` for the layout); a file measured on two machines keeps both.

``bias_compensation`` (:mod:`elasticize.calibration`) is::

    {"means": {consumer weight: "elastic_mean.<consumer weight>"},
     "presets": {preset: {bias: "elastic_bias.<preset>.<bias>"}}}

The means are float32 ``(in,)`` tensors; each preset's compensated biases are stored dense like
its BN statistics, and that preset's tensor table points its bias at them (``source``, no slices),
so a reader that follows the table gets the compensated values.
"""

from __future__ import annotations

from typing import Any

from ..plan.manifest import Manifest, thaw
from ..plan.parse import as_dict, as_int, as_list, as_num, as_str, as_str_map, fail

__all__ = ["BIAS_PREFIX", "MEAN_PREFIX", "bias_name", "mean_name", "check_measurements",
           "check_compensation"]

#: Prefix of the stored per-preset compensated biases.
BIAS_PREFIX = "elastic_bias."
#: Prefix of the stored consumer means.
MEAN_PREFIX = "elastic_mean."
_MAX_RESULTS = 10_000


def bias_name(preset: str, fqn: str) -> str:
    """The stored name of preset ``preset``'s compensated bias ``fqn``."""
    return f"{BIAS_PREFIX}{preset}.{fqn}"


def mean_name(fqn: str) -> str:
    """The stored name of consumer ``fqn``'s calibration means."""
    return f"{MEAN_PREFIX}{fqn}"


def check_measurements(value: Any, space: Any) -> dict:
    """Check the ``measurements`` key: per key, device, batch size, threads, metric and result rows.

    Raises:
        ManifestError: naming the key: a wrong type, a missing field, a configuration outside the
            search space, or MACs/params that differ from what the plan computes.
    """
    as_dict(value, "measurements", optional=None)
    for k, rec in value.items():
        key = f"measurements[{k!r:.60}]"
        as_str(k, key, pattern=r"[\w.:\-]{1,64}/bs[0-9]{1,6}")
        as_dict(rec, key, required=("device", "batch_size", "threads", "metric", "results"),
                optional=("device_name", "data", "calibration"))
        as_str(rec["device"], f"{key}.device", pattern=r"[\w.:\-]{1,64}")
        as_int(rec["batch_size"], f"{key}.batch_size", 1)
        as_int(rec["threads"], f"{key}.threads", 0)
        metric = as_str(rec["metric"], f"{key}.metric", pattern=r"[\w.\-]{1,64}")
        for opt in ("device_name", "data", "calibration"):
            if opt in rec:
                as_str(rec[opt], f"{key}.{opt}", max_len=200)
        for i, row in enumerate(as_list(rec["results"], f"{key}.results", max_len=_MAX_RESULTS)):
            _check_row(row, f"{key}.results[{i}]", metric, space)
    return value


def _check_row(row: Any, key: str, metric: str, space: Any) -> None:
    as_dict(row, key, required=("name", "config", "macs", "params", metric), optional=None)
    if row["name"] is not None:
        as_str(row["name"], f"{key}.name", pattern=r"[\w.\-]{1,128}")
    try:
        cfg = space.resolve(row["config"])
    except (KeyError, ValueError, TypeError) as e:
        fail(f"{key}.config", f"is outside the search space: {e.args[0] if e.args else e}")
    for what, fn in (("macs", space.macs), ("params", space.params)):
        if as_int(row[what], f"{key}.{what}") != fn(cfg):
            fail(f"{key}.{what}", f"is {row[what]} but the plan computes {fn(cfg)}")
    for mk, mv in row.items():
        if mk not in ("name", "config", "macs", "params"):
            as_str(mk, key, pattern=r"[\w.\-]{1,64}")
            as_num(mv, f"{key}.{mk}")


def check_compensation(value: Any, presets: dict, plan: Any, header: Any) -> tuple[set[str], dict]:
    """Check the ``bias_compensation`` key against the plan and the stored tensors.

    Returns:
        ``(the stored tensor names it lists, preset -> bias name -> stored name)``.

    Raises:
        ManifestError: naming the key: an unknown preset, a name that is not a bias / weight of the
            plan, a stored name off the naming scheme or not in the file, a mean of the wrong shape.
    """
    as_dict(value, "bias_compensation", optional=("means", "presets"))
    stored: set[str] = set()
    for fqn, s in as_str_map(value.get("means", {}), "bias_compensation.means").items():
        key = f"bias_compensation.means[{fqn!r:.120}]"
        info = plan.tensors.get(fqn)
        if info is None or not fqn.endswith(".weight") or len(info.shape) < 2:
            fail(key, "is not the weight of a layer of the plan")
        if s != mean_name(fqn) or header.shape(s) != [info.shape[1]]:
            fail(key, f"must point at a stored ({info.shape[1]},) tensor {mean_name(fqn)!r:.140}")
        stored.add(s)
    tables = as_dict(value.get("presets", {}), "bias_compensation.presets", optional=None)
    for name, table in tables.items():
        if name not in presets:
            fail(f"bias_compensation.presets[{name!r:.80}]", "is not a preset of the file")
        for fqn, s in as_str_map(table, f"bias_compensation.presets[{name!r:.80}]").items():
            key = f"bias_compensation.presets[{name!r:.80}][{fqn!r:.120}]"
            if fqn not in plan.tensors or not fqn.endswith(".bias"):
                fail(key, "is not a bias of the plan")
            if s != bias_name(name, fqn) or s not in header.tensors:
                fail(key, f"points at {s!r:.120}, which the file does not hold under that name")
            stored.add(s)
    return stored, tables


def saved_tensors(em: Any) -> dict[str, Any]:
    """The tensors :func:`elasticize.save` stores for ``em``'s bias compensation (means and per-preset biases)."""
    comp = em.compensation
    out = {mean_name(fqn): t.detach().float().contiguous().cpu() for fqn, t in comp.means.items()}
    for preset, table in comp.presets.items():
        out.update({bias_name(preset, fqn): t.detach().contiguous().cpu() for fqn, t in table.items()})
    return out


def saved_keys(em: Any) -> dict[str, Any]:
    """The manifest keys :func:`elasticize.save` writes for ``em``'s measurements and bias compensation
    (none for a model with neither, so such a file is written exactly as before)."""
    out: dict[str, Any] = {}
    if em.measurements:
        out["measurements"] = em.measurements
    comp = em.compensation
    if comp.means or comp.presets:
        out["bias_compensation"] = {"means": {f: mean_name(f) for f in comp.means},
                                    "presets": {p: {f: bias_name(p, f) for f in t} for p, t in comp.presets.items()}}
    return out


def preset_stored(em: Any, preset: str) -> dict[str, tuple[list[int], int, str]]:
    """Bias name -> (shape, bytes per element, stored name) of ``preset``'s compensated biases."""
    return {fqn: (list(t.shape), t.element_size(), bias_name(preset, fqn))
            for fqn, t in em.compensation.presets.get(preset, {}).items()}


def pop_tensors(manifest: Manifest, tensors: dict[str, Any]) -> tuple[dict, dict]:
    """``(means, per-preset biases)`` of a checked ``manifest``, popped from the file's ``tensors``."""
    comp = manifest.bias_compensation
    means = {fqn: tensors.pop(s) for fqn, s in comp.means.items()}
    presets = {p: {fqn: tensors.pop(s) for fqn, s in t.items()} for p, t in comp.presets.items()}
    return means, presets


def restore(em: Any, manifest: Manifest, popped: tuple[dict, dict]) -> None:
    """Give ``em`` the measurements of a checked ``manifest`` and the bias compensation
    :func:`pop_tensors` read, installing the active preset's biases."""
    em.measurements = thaw(manifest.measurements)
    means, presets = popped
    if means or presets:
        em.compensation.means = {k: v.float() for k, v in means.items()}
        em.compensation.presets = presets
        em.set_bn_stats(em.bn_stats)  # reinstalls the active preset's calibrated tensors


def file_table(manifest: Manifest, preset: str | None) -> dict[str, str]:
    """Bias name -> stored name of ``preset``'s compensated biases in a checked manifest."""
    if preset is None:
        return {}
    return dict(manifest.bias_compensation.presets.get(preset, {}))
