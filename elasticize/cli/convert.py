"""``elasticize convert``: build a model by name, make it elastic and save it.

A thin call of :func:`elasticize.convert` and :func:`elasticize.save`.
"""

from __future__ import annotations

import re
from pathlib import Path

import click

from ._common import _app_dir, _app_dir_option, _floats, _kwargs, _run, console, err_console
from .inspect import report_tables


@click.command()
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
@_app_dir_option
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

    from .. import checkpoint
    from .._files import check_output
    from ..model import convert as api_convert

    stem = Path(model).name if Path(model).is_dir() else model
    out = Path(output) if output else Path(re.sub(r"[^\w.-]+", "_", stem) + ".elastic.safetensors")
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
    report_tables(em.plan, rep["presets"], rep["presets"]["full"]["macs"])
    if em.recipe.get("adapter") == "hf":
        from ..adapters.hf import has_tokenizer

        if em.files:
            console.print(f"stored with the model: {', '.join(em.files)}")
        if not has_tokenizer(em.files):
            err_console.print(f"[yellow]warning:[/yellow] {model} has no tokenizer files (tokenizer.json, vocab.txt, "
                              "...): folders exported from this file will have no tokenizer", soft_wrap=True)
    console.print(f"[green]wrote[/green] {out}")
