"""``elasticize eval``: measure every preset (and candidates, solver picks) without training.

A thin call of :func:`elasticize.load`, :func:`elasticize.measure.eval_data`,
:func:`elasticize.measure.evaluate`, :mod:`elasticize.measure.report` and :func:`elasticize.save`.
"""

from __future__ import annotations

from typing import Any

import click

from ._common import _app_dir, _app_dir_option, _base_model_options, _build_base, _run, console


def _budgets(ctx: click.Context, param: click.Parameter, value: str | None) -> list[Any]:
    """``--budgets 25%,50%,75%`` (or ``50M,1.2G``) as MACs budgets; items with a time unit (``5ms``,
    ``0.01s``, ``800us``) as measured-latency budgets.

    Raises:
        click.BadParameter: an item that is neither.
    """
    import re

    from ..space import parse_budget

    out = []
    for v in (value or "").split(","):
        v = v.strip()
        if not v:
            continue
        timed = re.fullmatch(r".*[0-9.]\s*(s|ms|us|µs)", v, flags=re.IGNORECASE) is not None
        try:
            out.append(parse_budget(v, kind="latency" if timed else "macs"))
        except ValueError as e:
            raise click.BadParameter(str(e), param=param) from None
    return out


@click.command("eval")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--data", required=True, help="Image folder (one sub-folder per class), text file (one sample per line) "
              "or package.module:function returning batches; half calibrates, half is measured.")
@click.option("-o", "--output", type=click.Path(), help="Write the measured super-network here (never the input).")
@click.option("--candidates", type=click.IntRange(0, 10_000), default=0, show_default=True,
              help="Also measure this many nested uniform sub-networks.")
@click.option("--budgets", callback=_budgets, metavar="LIST",
              help="Add the solver's pick for each budget as a preset budget-<budget>: MACs (25%,50%,1.2G) or "
              "measured latency per --batch-size batch (5ms, 800us).")
@click.option("--refine-rounds", type=click.IntRange(0, 20), default=3, show_default=True,
              help="Re-linearisation rounds of each budget pick (0: the checked pick as it is).")
@click.option("--batch-size", type=click.IntRange(1), default=1, show_default=True, help="Samples per timed batch.")
@click.option("--data-batch-size", type=click.IntRange(1), default=32, show_default=True,
              help="Samples per calibration / measured batch.")
@click.option("--threads", type=click.IntRange(1), default=None, help="CPU threads for timing (default: torch's).")
@click.option("--device", default="cpu", show_default=True, help="Where to run and time: cpu, cuda, cuda:1...")
@click.option("--no-compensation", is_flag=True, help="Skip bias compensation (BN recalibration still runs).")
@click.option("--min-time", type=click.FloatRange(0.001), default=0.2, show_default=True,
              help="Seconds of timing per sub-network (torch.utils.benchmark blocked_autorange).")
@click.option("--no-latency", is_flag=True, help="Skip timing and peak memory.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="Write the results as CSV.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the results as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Draw quality vs MACs with the presets marked (PNG; needs elasticize[plot]).")
@click.option("--plot-x", type=click.Choice(["macs", "latency_s"]), default="macs", show_default=True)
@click.option("--force", is_flag=True, help="Replace existing outputs (never the input).")
@_base_model_options
@_app_dir_option
def eval_(file: str, data: str, output: str | None, candidates: int, budgets: list, refine_rounds: int, batch_size: int,
          data_batch_size: int, threads: int | None, device: str, no_compensation: bool, min_time: float, no_latency: bool,
          csv_path: str | None, json_path: str | None, plot_path: str | None, plot_x: str, force: bool,
          model_spec: str | None, trust_remote_code: bool, app_dir: str | None) -> None:
    """Calibrate and measure FILE's sub-networks on --data: a table, and the results in the manifest (-o).

    Every preset (and --candidates N uniform sub-networks, and a solver pick per --budgets entry)
    gets BN recalibration and bias compensation on half the data, then its metric (accuracy, or
    cosine to the original), latency, params, MACs and peak memory on the other half.
    """
    from .. import checkpoint
    from .._files import check_output
    from ..measure import eval_data, evaluate, report

    outs = [(p, "file") for p in (output, csv_path, json_path, plot_path) if p]
    for p, kind in outs:  # every output checked before any work: nothing written on a bad input
        _run(lambda p=p: check_output(p, kind=kind, overwrite=force, inputs=(file,)))
    with console.status(f"loading {file}"), _app_dir(app_dir):
        base = _build_base(model_spec, file)
        em = _run(lambda: checkpoint.load(file, model=base, trust_remote_code=trust_remote_code))
        ds = _run(lambda: eval_data(data, em, batch_size=data_batch_size))
    with console.status("calibrating and measuring"):
        record = _run(lambda: evaluate(em, ds.held, calibration=ds.calibration, metric=ds.metric,
                                       output_fn=ds.output_fn, candidates=candidates, budgets=budgets,
                                       device=device, batch_size=batch_size, threads=threads,
                                       latency=not no_latency, min_time=min_time, compensation=not no_compensation,
                                       source=ds.source, refine_rounds=refine_rounds))
    console.print(report.table(record, em.macs(None)))
    if csv_path:
        _run(lambda: report.write_csv(record, csv_path, overwrite=force))
    if json_path:
        _run(lambda: report.write_json(record, json_path, overwrite=force))
    if plot_path:
        _run(lambda: report.plot_pareto(record, plot_path, x=plot_x, overwrite=force))
    if output:
        em.to("cpu")
        _run(lambda: checkpoint.save(em, output, overwrite=force))
    for p, _ in outs:
        console.print(f"[green]wrote[/green] {p}")
