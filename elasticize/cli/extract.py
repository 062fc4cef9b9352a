"""``elasticize extract``: write one dense sub-network of a file.

A thin call of :func:`elasticize.load`, :meth:`~elasticize.ElasticModel.select`, and one writer per
``--format``: :func:`elasticize.checkpoint.save_subnet`, :meth:`~elasticize.ElasticModel.save_pretrained`,
:func:`elasticize.deploy.save_sentence_transformers` or :func:`elasticize.deploy.to_onnx`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import click

from ._common import (_app_dir, _app_dir_option, _base_model_options, _budget, _build_base, _config_json, _fmt,
                      _metrics, _run, console, err_console)


def _safetensors(em: Any, cfg: Any, output: str, force: bool) -> str:
    from .. import checkpoint

    checkpoint.save_subnet(em, cfg, output, overwrite=force)
    return ""


def _hf(em: Any, cfg: Any, output: str, force: bool) -> str:
    from ..adapters.hf import is_sentence_model

    em.save_pretrained(output, cfg, overwrite=force)
    return "a sentence-transformers folder: SentenceTransformer(folder) loads it" if is_sentence_model(em.files) else ""


def _sentence(em: Any, cfg: Any, output: str, force: bool) -> str:
    from ..deploy import save_sentence_transformers

    save_sentence_transformers(em, output, cfg, overwrite=force)
    return "a sentence-transformers folder: SentenceTransformer(folder) loads it"


def _onnx(em: Any, cfg: Any, output: str, force: bool) -> str:
    from ..deploy import example_inputs, to_onnx

    dense = em.extract(cfg)
    inputs = example_inputs(dense, recipe=em.recipe, input_shapes=em.input_shapes)
    try:
        done = to_onnx(dense, inputs, output, overwrite=force)
    except ImportError as e:  # the onnx extra is not installed: a one-line error, not a traceback
        raise RuntimeError(str(e)) from None
    axes = ", ".join(f"{k}: {v}" for k, v in done.dynamic.items() if v) or "none"
    return f"onnxruntime agrees with PyTorch to {done.max_abs_diff:.2g}; dynamic axes: {axes}"


#: --format -> writer ``(em, cfg, output, force) -> note``
_WRITERS = {"safetensors": _safetensors, "hf": _hf, "sentence-transformers": _sentence, "onnx": _onnx}
#: the formats that write a folder
_FOLDERS = ("hf", "sentence-transformers")


@click.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--preset", help="Preset name (see `elasticize inspect FILE`).")
@click.option("--config", "config_json", help='Sub-network as JSON, e.g. \'{"width": 0.5}\'.')
@click.option("--max-macs", callback=_budget, metavar="BUDGET",
              help="Largest sub-network with at most this many MACs per sample: 50M, 1.2G, 2.5e9, or 40% of full.")
@click.option("--max-params", callback=_budget, metavar="BUDGET",
              help="Largest sub-network with at most this many parameters: 5M, or 25% of full.")
@click.option("--max-latency-s", "--max-latency", "max_latency_s", callback=_budget, metavar="BUDGET",
              help="Measured sub-network whose latency (seconds per batch, measured by `elasticize eval`, or "
                   "`elasticize train --latency`) is at most this: 5ms, 0.005, or 50% of full's.")
@click.option("--best", metavar="METRIC", help="With --max-macs/--max-params/--max-latency-s: the measured preset with "
              "the highest METRIC (e.g. accuracy, cosine) within them, instead of the largest sub-network.")
@click.option("--data", help="Without measurements in FILE: calibrate the budget's pick on this data (BN "
              "recalibration, bias compensation), as `elasticize eval --data` reads it.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Dense sub-network .safetensors or .onnx, or "
              "a folder with --format hf / sentence-transformers.")
@click.option("--format", "fmt", type=click.Choice(list(_WRITERS)), default="safetensors", show_default=True,
              help="safetensors: one file for elasticize.load_subnet; hf: a Hugging Face folder (save_pretrained) "
                   "that plain transformers loads (a sentence-transformers folder when the model is one); "
                   "sentence-transformers: that folder, refused for other models; onnx: one .onnx file "
                   "(torch.onnx.export, dynamic batch and sequence axes, checked by onnxruntime).")
@click.option("--force", is_flag=True, help="Replace an existing output (never the input).")
@_base_model_options
@_app_dir_option
def extract(file: str, preset: str | None, config_json: str | None, max_macs: Any, max_params: Any,
            max_latency_s: Any, best: str | None, data: str | None, output: str, fmt: str, force: bool,
            model_spec: str | None, trust_remote_code: bool, app_dir: str | None) -> None:
    """Write one dense sub-network of FILE to OUTPUT (a file for elasticize.load_subnet, or a HF folder).

    A budget (--max-macs, --max-params, --max-latency-s) picks without search: the largest nested
    sub-network within it, or with --best METRIC the measured preset scoring highest within it.
    """
    from .. import checkpoint
    from .._files import check_output

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
    _run(lambda: check_output(output, kind="folder" if fmt in _FOLDERS else "file", overwrite=force, inputs=(file,)))
    with console.status(f"loading {file}"), _app_dir(app_dir):
        base = _build_base(model_spec, file)
        em = _run(lambda: checkpoint.load(file, model=base, trust_remote_code=trust_remote_code))
    if budget:
        subnet = _run(lambda: _select(em, max_macs, max_params, max_latency_s, best))
        if not em.measurements:
            _unmeasured(em, file, subnet, data)
    cfg = _run(lambda: em.resolve(subnet))
    if isinstance(subnet, dict):
        _say_rounding(em, subnet, cfg)
    name = next((n for n in em.presets if em.resolve(n) == cfg), None)
    measured = _metrics(em.metrics.get(name, {})) if name else ""
    with console.status(f"writing {output}"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        note = _run(lambda: _WRITERS[fmt](em, cfg, output, force))
    for w in caught:  # e.g. an exported folder without a tokenizer: said, never silent
        if issubclass(w.category, UserWarning):
            err_console.print(f"[yellow]warning:[/yellow] {w.message}", soft_wrap=True)
    console.print(f"[green]wrote[/green] {output}: {_fmt(em.macs(cfg))} MACs "
                  f"({100 * em.macs(cfg) / em.macs(None):.1f}% of full), {_fmt(em.params(cfg))} params"
                  + (f"; preset {name}" if name else "") + (f" ({measured})" if measured else ""), soft_wrap=True)
    if note:
        console.print(note, soft_wrap=True)



def _select(em: Any, max_macs: Any, max_params: Any, max_latency: Any, metric: str | None) -> Any:
    """``em.select`` with the budgets resolved against the full network; says what each came to."""
    bounds: dict[str, Any] = {}
    for key, budget, full, unit in (("max_macs", max_macs, em.macs(None), "MACs"),
                                    ("max_params", max_params, em.params(None), "params")):
        if budget is not None:
            bounds[key] = int(budget.resolve(full))
            console.print(f"budget: {budget.describe(full, unit)}", soft_wrap=True)
    if max_latency is not None:
        from ..measured import full_latency

        full, where = full_latency(em)
        if max_latency.share and full is None:
            raise ValueError(f"--max-latency {max_latency.text} is a share of the full network's measured latency, "
                             "which this file does not hold; measure it (elasticize eval FILE --data DATA -o "
                             "MEASURED.safetensors) or give seconds (5ms)")
        bounds["max_latency_s"] = max_latency.resolve(full or 0.0)
        console.print(f"budget: {max_latency.describe(full or 0.0, 's per batch')}"
                      + (f" (full: {where})" if max_latency.share else ""), soft_wrap=True)
    return em.select(metric=metric, **bounds)


def _say_rounding(em: Any, asked: dict, cfg: dict) -> None:
    """A ratio in ``--config`` becomes each group's or stage's nearest choice; say what it came to when
    that differs from the ratio asked (``{"width": 0.3}`` is 25% where the choices are quarters)."""
    full = em.space.full()
    for dim, value in asked.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not full.get(dim):
            continue
        got = sorted({cfg[dim][k] / full[dim][k] for k in full[dim] if full[dim][k]})
        if any(abs(r - value) > 1e-9 for r in got):
            shown = ", ".join(f"{100 * r:.4g}%" for r in got)
            console.print(f"--config {dim} {value:g} was rounded to the nearest choices: {shown} of full", soft_wrap=True)


def _unmeasured(em: Any, file: str, cfg: Any, data: str | None) -> None:
    """A budget's pick in a file without measurements: calibrated on ``data``, or a warning naming ``elasticize eval``."""
    if data is None:
        err_console.print(f"[yellow]warning:[/yellow] {file} holds no measurements, so this is the largest sub-network "
                          "within the budget, unmeasured and uncalibrated; measure the file first: elasticize eval "
                          f"{file} --data DATA -o MEASURED.safetensors (or pass --data to calibrate this pick)",
                          soft_wrap=True)
        return
    from ..measure import calibrate, eval_data

    name = em.preset_name(em.resolve(cfg))
    if name is None:
        em.add_preset("selected", cfg, replace=True)
    ds = _run(lambda: eval_data(data, em))
    with console.status("calibrating the pick (BN recalibration, bias compensation)"):
        _run(lambda: calibrate(em, ds.calibration))
