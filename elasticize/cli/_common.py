"""What the commands share: the consoles, the one-line error runner, option parsers and the base-model options."""

from __future__ import annotations

import json
import re
from typing import Any, Callable

import click
from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def _fmt(n: float) -> str:
    """A count in words: ``1.43G``, ``597.84M``, ``12.00K``, ``7``."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def _metrics(m: dict[str, float]) -> str:
    """Measured metrics in words: ``accuracy=0.9833, latency_s=0.00123``."""
    return ", ".join(f"{k}={v:.3g}" if k == "latency_s" else f"{k}={v:.4f}" for k, v in m.items())


def _run(fn: Callable[[], Any]) -> Any:
    """Run an API call; a user error becomes a one-line message and exit code 1.

    So does every ``OSError`` (a folder that cannot be written, a full disk...): the system's
    own ones read ``PATH: reason``.

    Raises:
        click.ClickException: ``fn`` raised KeyError, ValueError, TypeError, OSError or RuntimeError.
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


def _app_dir_option(fn: Callable) -> Callable:
    """``--app-dir DIR``: where ``package.module:builder`` imports look first (see :func:`_app_dir`)."""
    return click.option("--app-dir", type=click.Path(exists=True, file_okay=False), default=None,
                        help=_APP_DIR_HELP)(fn)


def _app_dir(folder: str | None) -> Any:
    """The context in which ``package.module:builder`` imports look in ``folder`` first (None: the current folder)."""
    from ..adapters import app_dir

    return app_dir(folder)


def _floats(text: str) -> tuple[float, ...]:
    """``"1,0.5"`` as ratios ``(1.0, 0.5)``.

    Raises:
        click.BadParameter: not a comma-separated list of numbers in (0, 1].
    """
    try:
        vals = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers") from None
    if not vals or any(not 0 < v <= 1 for v in vals):
        raise click.BadParameter("ratios must be in (0, 1], e.g. 1,0.75,0.5,0.25")
    return vals


def _kwargs(items: tuple[str, ...]) -> dict[str, Any]:
    """``--kwarg name=value`` items as a dict (JSON values; anything else is a string).

    Raises:
        click.BadParameter: an item that is not ``name=value`` with a Python name.
    """
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


def _budget(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    """click callback of a budget option: ``50M``, ``1.2G``, ``40%``, ``5ms`` (see :func:`elasticize.space.parse_budget`).

    Raises:
        click.BadParameter: text that is not a positive, finite budget of the option's kind.
    """
    from ..space import parse_budget

    if value is None:
        return None
    kind = "latency" if "latency" in (param.name or "") else "params" if "params" in (param.name or "") else "macs"
    try:
        return parse_budget(value, kind=kind)
    except ValueError as e:
        raise click.BadParameter(str(e), param=param) from None


def _config_json(text: str) -> Any:
    """The ``--config`` JSON (read as a manifest value: bounded, no NaN).

    Raises:
        click.BadParameter: not such JSON.
    """
    from ..plan.parse import loads

    try:
        return loads(text, "--config")
    except ValueError as e:
        raise click.BadParameter(str(e).replace("; the file is corrupted", ""), param_hint="--config") from None


def _base_model_options(fn: Callable) -> Callable:
    """``--model SPEC`` and ``--trust-remote-code``: how a file's base model is built (see the README's Security model)."""
    fn = click.option("--trust-remote-code", is_flag=True,
                      help="Allow a file whose recipe imports and calls package.module:builder (code outside "
                           "elasticize) to run it. Only for files you trust.")(fn)
    return click.option("--model", "model_spec", metavar="SPEC", default=None,
                        help="Build the base model yourself instead of from the file's recipe: a timm name, "
                             "torchvision:NAME or package.module:builder (random weights; the file brings its own).")(fn)


def _build_base(spec: str | None, file: str) -> Any:
    """The base model ``--model SPEC`` names (None without the option).

    Raises:
        click.ClickException: ``file`` cannot be read, or ``spec`` names no model that can be built.
    """
    if spec is None:
        return None
    from ..adapters import get_adapter, resolve_spec
    from ..checkpoint import load_manifest
    from ..plan.manifest import thaw

    recipe = thaw(_run(lambda: load_manifest(file)).recipe)
    adapter, name = _run(lambda: resolve_spec(spec))
    kwargs = dict(recipe.get("kwargs") or {}) if (recipe.get("adapter"), recipe.get("name")) == (adapter, name) else {}
    return _run(lambda: get_adapter(adapter).build(name, pretrained=False, kwargs=kwargs))
