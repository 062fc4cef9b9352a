"""``elasticize`` command line: thin click commands over the Python API, with rich output."""

from __future__ import annotations

import json
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import click
from rich.console import Console
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


def _fmt(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def _run(fn: Callable[[], Any]) -> Any:
    """Run an API call; a user error becomes a one-line message and exit code 1.

    So does every ``OSError`` (a folder that cannot be written, a full disk...): the system's
    own ones read ``PATH: reason``.
    """
    try:
        return fn()
    except (KeyError, ValueError, TypeError, OSError, RuntimeError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        if isinstance(e, OSError) and e.strerror and e.filename is not None:  # "[Errno 13] Permission denied: 'x'"
            msg = f"{e.filename}: {e.strerror}" + (f" (renaming to {e.filename2})" if e.filename2 else "")
        raise click.ClickException(str(msg)) from e


_APP_DIR_HELP = ("Folder that package.module:builder imports look in first (default: the current folder, as "
                 "uvicorn does); never stored in the file.")


def _app_dir(folder: str | None) -> Any:
    """The context in which ``package.module:builder`` imports look in ``folder`` first (None: the current folder)."""
    from .adapters import app_dir

    return app_dir(folder)


def _floats(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers") from None
    if not vals or any(not 0 < v <= 1 for v in vals):
        raise click.BadParameter("ratios must be in (0, 1], e.g. 1,0.75,0.5,0.25")
    return vals


def _kwargs(items: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_]\w*", key):
            raise click.BadParameter(f"{item!r}: write --kwarg name=value, e.g. --kwarg num_classes=10")
        try:
            out[key] = json.loads(value)
        except (ValueError, RecursionError):  # not JSON (or a number past Python's digit limit): a string
            out[key] = value
    return out


def report_tables(plan: dict[str, Any], presets: dict[str, dict[str, Any]], full_macs: int) -> None:
    """Print a plan (as JSON) and its presets as rich tables: groups, depth stages, what is not elastic."""
    width = Table(title="Elastic width, heads and modules (coupling groups)", show_lines=False)
    for col in ("group", "kind", "size", "choices"):
        width.add_column(col)
    for g in plan["groups"]:
        unit = {"heads": " heads", "modules": " modules"}.get(g["kind"], "")
        if not unit and g["unit"] > 1:  # channels that move together: whole heads of an nn.MultiheadAttention, groups
            unit = f" (in units of {g['unit']})"
            size = g["size"]
        else:
            size = g["size"] // g["unit"] if unit else g["size"]
        width.add_row(g["name"], g["kind"], f"{size}{unit}", ", ".join(map(str, g["choices"])))
    if plan["groups"]:
        console.print(width)
    if plan["stages"]:
        depth = Table(title=f"Elastic depth ({plan['depth_mode']})")
        for col in ("stage", "blocks", "choices"):
            depth.add_column(col)
        for s in plan["stages"]:
            depth.add_row(s["name"], str(len(s["blocks"])), ", ".join(map(str, s["choices"])))
        console.print(depth)
    if plan["not_elastic"]:
        fixed = Table(title="Not elastic")
        fixed.add_column("where")
        fixed.add_column("why")
        for where, why in plan["not_elastic"]:
            fixed.add_row(where, why)
        console.print(fixed)
    pt = Table(title="Presets (MACs per sample; FLOPs = 2 x MACs)")
    for col in ("preset", "MACs", "% of full", "params", "metrics"):
        pt.add_column(col, justify="right" if col != "preset" else "left")
    for name, p in presets.items():
        metrics = _metrics(p.get("metrics") or {})
        pt.add_row(name, _fmt(p["macs"]), f"{100 * p['macs'] / max(full_macs, 1):.1f}%", _fmt(p["params"]), metrics)
    console.print(pt)


def _budget(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    import math

    if value is not None and not (math.isfinite(value) and value > 0):
        raise click.BadParameter(f"{value} is not a positive, finite budget", param=param)
    return value


def _base_model_options(fn: Callable) -> Callable:
    """``--model SPEC`` and ``--trust-remote-code``: how a file's base model is built (see the README's Security model)."""
    fn = click.option("--trust-remote-code", is_flag=True,
                      help="Allow a file whose recipe imports and calls package.module:builder (code outside "
                           "elasticize) to run it. Only for files you trust.")(fn)
    return click.option("--model", "model_spec", metavar="SPEC", default=None,
                        help="Build the base model yourself instead of from the file's recipe: a timm name, "
                             "torchvision:NAME or package.module:builder (random weights; the file brings its own).")(fn)


def _build_base(spec: str | None, file: str) -> Any:
    """The base model ``--model SPEC`` names (None without the option)."""
    if spec is None:
        return None
    from .adapters import get_adapter, resolve_spec
    from .checkpoint import read_manifest

    recipe = _run(lambda: read_manifest(file, presets=False)).get("recipe") or {}
    adapter, name = _run(lambda: resolve_spec(spec))
    kwargs = dict(recipe.get("kwargs") or {}) if (recipe.get("adapter"), recipe.get("name")) == (adapter, name) else {}
    return _run(lambda: get_adapter(adapter).build(name, pretrained=False, kwargs=kwargs))


def _config_json(text: str) -> Any:
    from .plan.parse import loads

    try:
        return loads(text, "--config")
    except ValueError as e:
        raise click.BadParameter(str(e).replace("; the file is corrupted", ""), param_hint="--config") from None


@click.group()
@click.version_option(package_name="elasticize")
def main() -> None:
    """Turn a trained PyTorch model into an elastic super-network, and cut sub-networks out of it."""


@main.command()
@click.argument("model")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Output .safetensors (default: MODEL.elastic.safetensors).")
@click.option("--pretrained/--no-pretrained", default=True, show_default=True,
              help="Fetch pretrained weights (needs the network or a cache).")
@click.option("--weights", type=click.Path(dir_okay=False), help="A .safetensors state dict to start from.")
@click.option("--kwarg", "kwargs", multiple=True, help="Builder argument name=value (JSON value), repeatable.")
@click.option("--dims", default="width,heads,depth,modules", show_default=True, help="Elastic dimensions.")
@click.option("--depth-mode", type=click.Choice(["prefix", "spaced", "skippable"]), default="prefix", show_default=True,
              help="prefix: keep the first k blocks of a stage (SortedNet); spaced: drop transformer layers evenly "
                   "(transformers only); skippable: skippable second half (Adaptive Depth).")
@click.option("--width-ratios", default="1,0.75,0.5,0.25", show_default=True, help="Width choices as fractions.")
@click.option("--heads-ratios", default="1,0.75,0.5,0.25", show_default=True, help="Heads choices as fractions.")
@click.option("--modules-ratios", default=None, help="TAC parallel-module choices as fractions (default: every w <= W).")
@click.option("--exclude", multiple=True, help="Group or stage name pattern kept at full size, repeatable.")
@click.option("--input-shape", default=None, help="Example input shape, e.g. 1,3,224,224 (default: from the model).")
@click.option("--no-sort", is_flag=True, help="Keep the channel order (no importance sorting).")
@click.option("--calibrate", type=click.Path(), default=None,
              help="Image folder or text file (one sample per line): rank units by activation importance on 8 "
                   "batches of it instead of data-free weight magnitude.")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
@click.option("--app-dir", type=click.Path(exists=True, file_okay=False), default=None, help=_APP_DIR_HELP)
def convert(model: str, output: str | None, pretrained: bool, weights: str | None, kwargs: tuple[str, ...], dims: str,
            depth_mode: str, width_ratios: str, heads_ratios: str, modules_ratios: str | None, exclude: tuple[str, ...], input_shape: str | None,
            no_sort: bool, calibrate: str | None, force: bool, app_dir: str | None) -> None:
    """Make MODEL elastic and save it.

    MODEL is a timm name (resnet50), torchvision:NAME, package.module:builder (imported from the
    current folder, or --app-dir), or a Hugging Face transformers model: a local folder with a
    config.json, or hf:HUB_ID (e.g. hf:bert-base-uncased; --kwarg class=AutoModelForCausalLM picks
    the model class, default AutoModel); its tokenizer files are stored in the output file.
    """
    import torch

    from . import checkpoint
    from ._files import check_output
    from .model import convert as api_convert

    stem = Path(model).name if Path(model).is_dir() else model
    out = Path(output) if output else Path(re.sub(r"[^\w.-]+", "_", stem) + ".elastic.safetensors")
    if weights and out.exists() and Path(weights).exists() and out.resolve() == Path(weights).resolve():
        raise click.ClickException("-o points at the --weights input; choose another output path")
    if out.exists() and out.is_file() and not force:
        raise click.ClickException(f"{out} exists; pass --force to replace it or choose another -o")
    _run(lambda: check_output(out, overwrite=force, inputs=(weights,)))  # before the conversion
    if calibrate and no_sort:
        raise click.UsageError("--calibrate ranks units for sorting; it cannot go with --no-sort")
    example = None
    if input_shape:
        try:
            example = torch.randn(*[int(v) for v in input_shape.split(",")])
        except ValueError:
            raise click.BadParameter("--input-shape takes integers like 1,3,224,224") from None
    options = dict(dims=tuple(d.strip() for d in dims.split(",") if d.strip()), depth_mode=depth_mode,
                   width_ratios=_floats(width_ratios), heads_ratios=_floats(heads_ratios), exclude=exclude,
                   modules_ratios=_floats(modules_ratios) if modules_ratios else None,
                   sort=None if no_sort else "auto")
    if calibrate:
        options["calibration"] = calibrate
    with console.status(f"building and converting {model}"), _app_dir(app_dir):
        em = _run(lambda: api_convert(model, pretrained=pretrained, kwargs=_kwargs(kwargs), weights=weights,
                                      example_inputs=example, **options))
    with console.status(f"writing {out}"):
        _run(lambda: checkpoint.save(em, out, overwrite=force))
    rep = em.report()
    report_tables(em.plan.to_json(), rep["presets"], rep["presets"]["full"]["macs"])
    if em.recipe.get("adapter") == "hf":
        from .adapters.hf import has_tokenizer

        if em.files:
            console.print(f"stored with the model: {', '.join(em.files)}")
        if not has_tokenizer(em.files):
            err_console.print(f"[yellow]warning:[/yellow] {model} has no tokenizer files (tokenizer.json, vocab.txt, "
                              "...): folders exported from this file will have no tokenizer", soft_wrap=True)
    console.print(f"[green]wrote[/green] {out}")


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON instead of tables.")
def inspect(file: str, as_json: bool) -> None:
    """Print the manifest of an elasticize FILE."""
    from .checkpoint import read_manifest

    m = _run(lambda: read_manifest(file))
    if as_json:
        click.echo(json.dumps(m, indent=2))
        return
    from .adapters import runs_code

    recipe = m.get("recipe") or {}
    console.print(f"[bold]{file}[/bold]: {m['kind']}, format {m['format_version']}, elasticize "
                  f"{m['library_version']}, traced with {m['plan'].get('tracer', 'fx')}, {_order(m.get('importance') or {})}")
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
    if m["kind"] == "super-network":
        presets = m["presets"]
        report_tables(m["plan"], presets, presets.get("full", next(iter(presets.values())))["macs"])
    else:
        console.print(f"sub-network {json.dumps(m['config'])}: {_fmt(m['macs'])} MACs, {_fmt(m['params'])} params")


def _metrics(m: dict[str, float]) -> str:
    """Measured metrics in words: ``accuracy=0.9833, latency_s=0.00123``."""
    return ", ".join(f"{k}={v:.3g}" if k == "latency_s" else f"{k}={v:.4f}" for k, v in m.items())


def _order(importance: dict) -> str:
    """How the manifest says the units were ordered, in words."""
    if not importance:
        return "importance order not recorded"
    if importance.get("order") is None:
        return "units in their original order"
    n = importance.get("calibration_batches")
    return f"{importance['order']} importance order" + (f" ({n} calibration batches)" if n is not None else "")


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--preset", help="Preset name (see `elasticize inspect FILE`).")
@click.option("--config", "config_json", help='Sub-network as JSON, e.g. \'{"width": 0.5}\'.')
@click.option("--max-macs", type=float, callback=_budget, help="Largest sub-network with at most this many MACs per sample.")
@click.option("--max-params", type=float, callback=_budget, help="Largest sub-network with at most this many parameters.")
@click.option("--max-latency-s", type=float, callback=_budget, help="Measured preset whose latency (seconds per batch, measured by "
              "`elasticize train --latency`) is at most this.")
@click.option("--best", metavar="METRIC", help="With --max-macs/--max-params/--max-latency-s: the measured preset with "
              "the highest METRIC (e.g. accuracy, cosine) within them, instead of the largest sub-network.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Dense sub-network .safetensors, or a folder "
              "with --format hf.")
@click.option("--format", "fmt", type=click.Choice(["safetensors", "hf"]), default="safetensors", show_default=True,
              help="safetensors: one file for elasticize.load_subnet; hf: a Hugging Face folder (save_pretrained) "
                   "that plain transformers loads.")
@click.option("--force", is_flag=True, help="Replace an existing output (never the input).")
@_base_model_options
@click.option("--app-dir", type=click.Path(exists=True, file_okay=False), default=None, help=_APP_DIR_HELP)
def extract(file: str, preset: str | None, config_json: str | None, max_macs: float | None, max_params: float | None,
            max_latency_s: float | None, best: str | None, output: str, fmt: str, force: bool,
            model_spec: str | None, trust_remote_code: bool, app_dir: str | None) -> None:
    """Write one dense sub-network of FILE to OUTPUT (a file for elasticize.load_subnet, or a HF folder).

    A budget (--max-macs, --max-params, --max-latency-s) picks without search: the largest nested
    sub-network within it, or with --best METRIC the measured preset scoring highest within it.
    """
    from . import checkpoint
    from ._files import check_output

    budget = any(x is not None for x in (max_macs, max_params, max_latency_s))
    if best is not None and not budget:
        raise click.UsageError("--best picks within a budget: add --max-macs, --max-params and/or --max-latency-s")
    if sum([preset is not None, config_json is not None, budget]) != 1:
        raise click.UsageError("choose the sub-network with exactly one of --preset, --config, "
                               "--max-macs/--max-params/--max-latency-s")
    if Path(output).exists() and Path(file).exists() and Path(output).resolve() == Path(file).resolve():
        raise click.ClickException("-o points at the input file; choose another output path")
    subnet: Any = preset
    if config_json is not None:
        subnet = _config_json(config_json)
    _run(lambda: check_output(output, kind="folder" if fmt == "hf" else "file", overwrite=force, inputs=(file,)))
    with console.status(f"loading {file}"), _app_dir(app_dir):
        base = _build_base(model_spec, file)
        em = _run(lambda: checkpoint.load(file, model=base, trust_remote_code=trust_remote_code))
    if budget:
        subnet = _run(lambda: em.select(max_macs=None if max_macs is None else int(max_macs),
                                        max_params=None if max_params is None else int(max_params),
                                        max_latency_s=max_latency_s, metric=best))
    cfg = _run(lambda: em.resolve(subnet))
    name = next((n for n in em.presets if em.resolve(n) == cfg), None)
    measured = _metrics(em.metrics.get(name, {})) if name else ""
    with console.status(f"writing {output}"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if fmt == "hf":
            _run(lambda: em.save_pretrained(output, cfg, overwrite=force))
        else:
            _run(lambda: checkpoint.save_subnet(em, cfg, output, overwrite=force))
    for w in caught:  # e.g. an exported folder without a tokenizer: said, never silent
        if issubclass(w.category, UserWarning):
            err_console.print(f"[yellow]warning:[/yellow] {w.message}", soft_wrap=True)
    console.print(f"[green]wrote[/green] {output}: {_fmt(em.macs(cfg))} MACs "
                  f"({100 * em.macs(cfg) / em.macs(None):.1f}% of full), {_fmt(em.params(cfg))} params"
                  + (f"; preset {name}" if name else "") + (f" ({measured})" if measured else ""))


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--data", required=True, type=click.Path(), help="Image folder (one sub-folder per class) or text file (one sample per line).")
@click.option("--steps", required=True, type=int, help="Optimizer updates.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Trained super-network .safetensors.")
@click.option("--strategy", type=click.Choice(["sortednet", "subnetwork-to-go", "sandwich", "skip-aware", "full"]),
              default="sortednet", show_default=True, help="Which sub-networks each step trains.")
@click.option("--accumulate", type=int, default=None, help="sortednet: sampled sub-networks per update (gradient accumulation).")
@click.option("--objective", type=click.Choice(["stochastic-loss", "stochastic-summation"]), default=None,
              help="sortednet objective (default stochastic-loss).")
@click.option("--n-random", type=int, default=None, help="sandwich: random sub-networks between largest and smallest.")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--lr", type=float, default=1e-4, show_default=True, help="AdamW (peak) learning rate.")
@click.option("--schedule", type=click.Choice(["constant", "cosine", "onecycle"]), default="constant",
              show_default=True, help="Learning rate: constant, cosine decay to 0, or one-cycle (warm up to --lr, "
              "then cosine decay).")
@click.option("--warmup", type=float, default=0.06, show_default=True, help="One-cycle warm-up share of --steps.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--distill/--no-distill", default=None,
              help="Distill from the frozen original (default: on for a model converted from pretrained weights; always for text).")
@click.option("--distill-loss", type=click.Choice(["cosine", "hidden", "kl", "mse"]), default=None,
              help="Text: cosine (sentence embedding, default) or hidden (also every token's final state); "
                   "images: kl (default) or mse on the logits.")
@click.option("--dropout/--no-dropout", default=True, show_default=True,
              help="Keep the model's dropout while training.")
@click.option("--latency", is_flag=True, help="Also measure each preset's latency (seconds per held-out batch on "
              "--device) into the manifest, for `elasticize extract --max-latency-s`.")
@click.option("--eval-every", type=int, default=0, show_default=True,
              help="Also measure every preset on the held-out data every N steps (0: only at the end).")
@click.option("--eval-fraction", type=float, default=0.1, show_default=True, help="Share of the data held out to measure presets.")
@click.option("--max-length", type=int, default=128, show_default=True, help="Tokens per text sample.")
@click.option("--state", type=click.Path(dir_okay=False), help="Write the trainer state (for --resume) here.")
@click.option("--save-every", type=int, default=0, show_default=True, help="Steps between --state writes (0: at the end).")
@click.option("--resume", type=click.Path(dir_okay=False), help="Resume from a --state file of an earlier run.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda when available).")
@click.option("--always", multiple=True, metavar="PRESET",
              help="Also train this preset at every step (repeatable), e.g. the presets you will ship.")
@click.option("--amp/--no-amp", default=None,
              help="bf16 autocast for the training passes (default: on for CUDA only; --amp speeds up "
                   "CPUs with AVX512-BF16).")
@click.option("--force", is_flag=True, help="Replace an existing output file (never the input).")
@_base_model_options
@click.option("--app-dir", type=click.Path(exists=True, file_okay=False), default=None, help=_APP_DIR_HELP)
def train(file: str, data: str, steps: int, output: str, strategy: str, accumulate: int | None, objective: str | None,
          n_random: int | None, batch_size: int, lr: float, schedule: str, warmup: float, seed: int,
          distill: bool | None, distill_loss: str | None, dropout: bool, latency: bool, eval_every: int,
          eval_fraction: float, max_length: int, state: str | None, save_every: int, resume: str | None,
          device: str | None, always: tuple[str, ...], amp: bool | None, force: bool, model_spec: str | None,
          trust_remote_code: bool, app_dir: str | None) -> None:
    """Train the super-network FILE so every sub-network is good, and write it to OUTPUT."""
    from ._files import check_output
    from .train.run import train_file

    _run(lambda: check_output(output, overwrite=force, inputs=(file,)))  # before any training
    if state is not None:
        _run(lambda: check_output(state, overwrite=True, inputs=(file,)))  # train_file refuses --state == -o

    def _report(step: int, measured: dict[str, dict[str, float]]) -> None:
        console.print(f"step {step}: " + "; ".join(f"{p} {_metrics(m)}" for p, m in measured.items()))

    options = {k: v for k, v in (("accumulate", accumulate), ("objective", objective), ("n", n_random)) if v is not None}
    click.get_current_context().with_resource(_app_dir(app_dir))  # for this command, as uvicorn's --app-dir
    base = _build_base(model_spec, file)
    result = _run(lambda: train_file(file, data=data, steps=steps, output=output, strategy=strategy,
                                     strategy_options=options, batch_size=batch_size, lr=lr, schedule=schedule,
                                     warmup=warmup, seed=seed, distill=distill, distill_loss=distill_loss,
                                     dropout=dropout, latency=latency, eval_every=eval_every, on_eval=_report,
                                     eval_fraction=eval_fraction, max_length=max_length, state=state,
                                     resume=resume, save_every=save_every, overwrite=force, progress=True,
                                     device=device, always=always, amp=amp, model=base,
                                     trust_remote_code=trust_remote_code))
    if result["rank"] != 0:  # under torchrun, rank 0 reports
        return
    if result["metrics"]:
        t = Table(title="Measured presets (held-out data)")
        t.add_column("preset")
        t.add_column("metrics", justify="right")
        for name, m in result["metrics"].items():
            t.add_row(name, _metrics(m))
        console.print(t)
    procs = f" on {result['world']} processes" if result["world"] > 1 else ""
    console.print(f"[green]wrote[/green] {result['output']} after {result['steps']} steps{procs}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
