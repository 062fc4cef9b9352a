"""``elasticize train``: the sorted trainer on an image folder or a text file.

A thin call of :func:`elasticize.train.run.train_file`.

``--strategy`` and the options after it come from the strategy registry: every strategy
registered with :func:`elasticize.train.register_strategy` by the time the command runs is a
choice, and its :attr:`~elasticize.train.Strategy.cli_options` are options of the command.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable, Iterable

import click
from rich.table import Table

from ..train.run import DEFAULTS as _DEFAULTS
from ._common import _app_dir, _app_dir_option, _base_model_options, _build_base, _metrics, _run, console

if TYPE_CHECKING:
    from ..train.strategies import StrategyOption

_ALWAYS_HELP = "Default: every preset." if _DEFAULTS["always"] is None else "Default: none."

#: ``ctx.meta`` key of the strategy options given on the command line (option key -> value).
_OPTIONS_KEY = "elasticize.strategy_options"


class _Registered(click.Choice):
    """A :class:`click.Choice` of the names ``names()`` gives when asked (a registry's, at that moment)."""

    def __init__(self, names: Callable[[], Iterable[str]]) -> None:  # click.Choice's fixed tuple is a property here
        self._names = names
        self.case_sensitive = True

    @property
    def choices(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(self._names())


def _strategy_names() -> list[str]:
    """The registered strategies, in registration order (imported when asked: other commands never need them)."""
    from ..train.strategies import STRATEGIES

    return list(STRATEGIES)


def _always(given: tuple[str, ...]) -> tuple[str, ...] | None:
    """``--always`` as :func:`~elasticize.train.run.train_file` takes it: none given is the default,
    ``none`` is no preset."""
    if not given:
        return _DEFAULTS["always"]
    return () if given == ("none",) else given


def _keep(key: str, ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """click callback of a strategy option: a given value goes to the strategy's ``key`` argument."""
    if value is not None:
        ctx.meta.setdefault(_OPTIONS_KEY, {})[key] = value
    return value


@functools.lru_cache(maxsize=None)
def _strategy_options(declared: tuple[tuple[StrategyOption, tuple[str, ...]], ...]) -> tuple[click.Option, ...]:
    """click options for :func:`strategy_cli_options` (made once per registry content: click tells
    options apart by identity)."""
    return tuple(click.Option([opt.flag], type=click.Choice(opt.choices) if opt.choices else opt.type, default=None,
                              expose_value=False, callback=functools.partial(_keep, opt.key),
                              help=f"{', '.join(names)}: {opt.help}")
                 for opt, names in declared)


class _StrategyCommand(click.Command):
    """A command whose options after ``--strategy`` are the registered strategies' own."""

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        """The declared parameters with the strategies' options after ``--strategy``.

        Raises:
            click.ClickException: a strategy declares an option this command already has.
        """
        from ..train.strategies import strategy_cli_options

        params = super().get_params(ctx)
        extra = _strategy_options(tuple(strategy_cli_options()))
        taken = {o for p in params for o in (*p.opts, *p.secondary_opts)}
        for opt in extra:
            if opt.opts[0] in taken:
                raise click.ClickException(f"a registered strategy declares {opt.opts[0]}, an option elasticize train "
                                           "has already; give the strategy's option another flag")
        at = next(i for i, p in enumerate(params) if p.name == "strategy") + 1
        return [*params[:at], *extra, *params[at:]]


def _distribution(values: tuple[str, ...]) -> dict[str, list[float]]:
    """``--distribution`` values ``DIM=P,P,...`` as ``{dim: [p, ...]}`` (checked by the sampler).

    Raises:
        click.BadParameter: a value that is not ``DIM=`` and numbers, or a dimension given twice.
    """
    out: dict[str, list[float]] = {}
    for v in values:
        dim, sep, probs = v.partition("=")
        try:
            ps = [float(p) for p in probs.split(",")]
        except ValueError:
            ps = []
        if not sep or not dim or not ps:
            raise click.BadParameter(f"{v!r}: give DIM=P,P,... with one probability per choice, largest first, "
                                     "e.g. width=0.4,0.3,0.2,0.1", param_hint="--distribution")
        if dim in out:
            raise click.BadParameter(f"{dim} is given twice", param_hint="--distribution")
        out[dim] = ps
    return out


@click.command(cls=_StrategyCommand)
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--data", required=True, type=click.Path(), help="Image folder (one sub-folder per class), labelled text (.jsonl or .csv with text and label "
              "fields: sequence classification) or text file (one sample per line).")
@click.option("--steps", required=True, type=int, help="Optimizer updates.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Trained super-network .safetensors.")
@click.option("--strategy", type=_Registered(_strategy_names), default=_DEFAULTS["strategy"], show_default=True,
              help="Which sub-networks each step trains.")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--lr", type=float, default=_DEFAULTS["lr"], show_default=True, help="AdamW (peak) learning rate.")
@click.option("--schedule", type=click.Choice(["constant", "cosine", "onecycle"]), default=_DEFAULTS["schedule"],
              show_default=True, help="Learning rate: constant, cosine decay to 0, or one-cycle (warm up to --lr, "
              "then cosine decay).")
@click.option("--warmup", type=float, default=0.06, show_default=True, help="One-cycle warm-up share of --steps.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--distill/--no-distill", default=None,
              help="Distill from the frozen original (default: on for a model converted from pretrained weights; always for text).")
@click.option("--distill-loss", type=click.Choice(["cosine", "hidden", "kl", "mse"]), default=None,
              help="Text: cosine (sentence embedding, default) or hidden (also every token's final state); "
                   "images: kl (default) or mse on the logits.")
@click.option("--dropout/--no-dropout", default=_DEFAULTS["dropout"], show_default=True,
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
              help="Also train this preset at every step (repeatable), e.g. the presets you will ship; "
                   "`--always none`: none. " + _ALWAYS_HELP)
@click.option("--amp/--no-amp", default=None,
              help="bf16 autocast for the training passes (default: on for CUDA only; --amp speeds up "
                   "CPUs with AVX512-BF16).")
@click.option("--val-data", type=click.Path(), help="Held-out data of the kind of --data to measure the presets on "
              "(then all of --data trains).")
@click.option("--workers", type=int, default=0, show_default=True, help="DataLoader worker processes.")
@click.option("--weight-decay", type=float, default=0.01, show_default=True, help="AdamW weight decay.")
@click.option("--max-grad-norm", type=float, default=None, help="Clip each update's gradients to this L2 norm.")
@click.option("--distribution", multiple=True, metavar="DIM=P,P,...", callback=lambda c, p, v: _distribution(v),
              help="SortedNet sampling probabilities of a dimension's choices, largest first (repeatable), "
                   "e.g. width=0.4,0.3,0.2,0.1.")
@click.option("--fsdp", is_flag=True, help="Under torchrun: shard parameters, gradients and optimizer state with "
              "FSDP2 (each process holds 1/N) instead of DDP.")
@click.option("--log-dir", type=click.Path(file_okay=False), help="Write metrics.csv and TensorBoard scalars here.")
@click.option("--log-every", type=int, default=10, show_default=True,
              help="A plain progress line every N steps when the output is not a terminal (0: none).")
@click.option("--augment", is_flag=True, help="Image folders: augment the training images with timm's training "
              "transform (random resized crop, flip, colour jitter); held-out images never are.")
@click.option("--sort", type=click.Choice(["auto", "activation", "keep"]), default="auto", show_default=True,
              help="Before training, rank the units by activation importance on 8 batches of --data "
                   "(function-preserving): auto does it for a file still as converted without data, activation "
                   "insists, keep never does.")
@click.option("--force", is_flag=True, help="Replace an existing output file (never the input).")
@_base_model_options
@_app_dir_option
def train(file: str, data: str, steps: int, output: str, strategy: str, batch_size: int, lr: float, schedule: str,
          warmup: float, seed: int, distill: bool | None, distill_loss: str | None, dropout: bool, latency: bool,
          eval_every: int, eval_fraction: float, max_length: int, state: str | None, save_every: int,
          resume: str | None, device: str | None, always: tuple[str, ...], amp: bool | None, val_data: str | None,
          workers: int, weight_decay: float, max_grad_norm: float | None, distribution: dict[str, list[float]],
          fsdp: bool, log_dir: str | None, log_every: int, augment: bool, sort: str, force: bool, model_spec: str | None,
          trust_remote_code: bool, app_dir: str | None) -> None:
    """Train the super-network FILE so every sub-network is good, and write it to OUTPUT."""
    from .._files import check_output
    from ..train.run import RunOptions, train_file

    _run(lambda: check_output(output, overwrite=force, inputs=(file,)))  # before any training
    if state is not None:
        _run(lambda: check_output(state, overwrite=True, inputs=(file,)))  # train_file refuses --state == -o

    def _report(step: int, measured: dict[str, dict[str, float]]) -> None:
        console.print(f"step {step}: " + "; ".join(f"{p} {_metrics(m)}" for p, m in measured.items()))

    ctx = click.get_current_context()
    options = dict(ctx.meta.get(_OPTIONS_KEY, {}))
    ctx.with_resource(_app_dir(app_dir))  # for this command, as uvicorn's --app-dir
    base = _build_base(model_spec, file)
    tty = console.is_terminal
    run = RunOptions(weight_decay=weight_decay, max_grad_norm=max_grad_norm, workers=workers,
                     distribution=distribution or None, parallel="fsdp" if fsdp else "ddp", val_data=val_data,
                     log_dir=log_dir, log_every=0 if tty else log_every, augment=augment, sort=sort,
                     status=lambda line: console.print(line, soft_wrap=True))  # a log line stays one line
    result = _run(lambda: train_file(file, data=data, steps=steps, output=output, strategy=strategy,
                                     strategy_options=options, batch_size=batch_size, lr=lr, schedule=schedule,
                                     warmup=warmup, seed=seed, distill=distill, distill_loss=distill_loss,
                                     dropout=dropout, latency=latency, eval_every=eval_every, on_eval=_report,
                                     eval_fraction=eval_fraction, max_length=max_length, state=state,
                                     resume=resume, save_every=save_every, overwrite=force, progress=tty,
                                     device=device, always=_always(always), amp=amp, model=base,
                                     trust_remote_code=trust_remote_code, run=run))
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
