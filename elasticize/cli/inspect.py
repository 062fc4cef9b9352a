"""``elasticize inspect``: a file's manifest as tables; :func:`report_tables`, which ``convert`` prints too."""

from __future__ import annotations

import json
from typing import Any, Mapping

import click
from rich.table import Table

from ..plan import Plan
from ..plan.manifest import thaw
from ._common import _fmt, _metrics, _run, console, err_console


def report_tables(plan: Plan, presets: Mapping[str, Mapping[str, Any]], full_macs: int) -> None:
    """Print a plan and its presets (name -> ``{"macs", "params", "metrics"}``) as rich tables: groups, depth
    stages, what is not elastic."""
    width = Table(title="Elastic width, heads and modules (coupling groups)", show_lines=False)
    for col in ("group", "kind", "size", "choices"):
        width.add_column(col)
    for g in plan.groups:
        unit = {"heads": " heads", "modules": " modules"}.get(g.kind, "")
        if not unit and g.unit > 1:  # channels that move together: whole heads of an nn.MultiheadAttention, groups
            unit = f" (in units of {g.unit})"
            size = g.size
        else:
            size = g.size // g.unit if unit else g.size
        width.add_row(g.name, g.kind, f"{size}{unit}", ", ".join(map(str, g.choices)))
    if plan.groups:
        console.print(width)
    if plan.stages:
        depth = Table(title=f"Elastic depth ({plan.depth_mode})")
        for col in ("stage", "blocks", "choices"):
            depth.add_column(col)
        for s in plan.stages:
            depth.add_row(s.name, str(len(s.blocks)), ", ".join(map(str, s.choices)))
        console.print(depth)
    if plan.not_elastic:
        fixed = Table(title="Not elastic")
        fixed.add_column("where")
        fixed.add_column("why")
        for n in plan.not_elastic:
            fixed.add_row(n.where, n.why)
        console.print(fixed)
    pt = Table(title="Presets (MACs per sample; FLOPs = 2 x MACs)")
    for col in ("preset", "MACs", "% of full", "params", "metrics"):
        pt.add_column(col, justify="right" if col != "preset" else "left")
    for name, p in presets.items():
        metrics = _metrics(p.get("metrics") or {})
        pt.add_row(name, _fmt(p["macs"]), f"{100 * p['macs'] / max(full_macs, 1):.1f}%", _fmt(p["params"]), metrics)
    console.print(pt)


def _order(importance: dict) -> str:
    """How the manifest says the units were ordered, in words."""
    if not importance:
        return "importance order not recorded"
    if importance.get("order") is None:
        return "units in their original order"
    n = importance.get("calibration_batches")
    return f"{importance['order']} importance order" + (f" ({n} calibration batches)" if n is not None else "")


@click.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON instead of tables.")
def inspect(file: str, as_json: bool) -> None:
    """Print the manifest of an elasticize FILE."""
    from ..checkpoint import load_manifest, read_manifest

    if as_json:
        click.echo(json.dumps(_run(lambda: read_manifest(file)), indent=2))
        return
    from ..adapters import runs_code

    m = _run(lambda: load_manifest(file))
    recipe = thaw(m.recipe)
    console.print(f"[bold]{file}[/bold]: {m.kind}, format {m.format_version}, elasticize "
                  f"{m.library_version}, traced with {m.plan.tracer}, {_order(m.importance or {})}")
    if recipe.get("adapter"):
        kw = {k: v for k, v in (recipe.get("kwargs") or {}).items() if k != "config"}
        shown = json.dumps(kw)[:300] + (" + a config" if "config" in (recipe.get("kwargs") or {}) else "")
        console.print(f"base model: {recipe['adapter']} builder {recipe['name']!r}, kwargs {shown}", markup=False)
        if runs_code(recipe):
            err_console.print(f"warning: loading this file imports and calls {recipe['name']!r}, code from outside "
                              "elasticize; elasticize does so only with --trust-remote-code (Python: "
                              "trust_remote_code=True), or pass --model SPEC / model=", markup=False)
    else:
        console.print("base model: a model object (loading needs --model SPEC, or model= in Python)")
    if not m.is_sub_network:
        presets = {n: p.to_json() for n, p in m.presets.items()}
        report_tables(m.plan, presets, presets.get("full", next(iter(presets.values())))["macs"])
    else:
        console.print(f"sub-network {json.dumps(thaw(m.config))}: {_fmt(m.macs)} MACs, {_fmt(m.params)} params")
