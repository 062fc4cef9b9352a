"""``elasticize`` command line: thin click commands over the Python API, with rich output.

One module per command (:mod:`.convert`, :mod:`.inspect`, :mod:`.extract`, :mod:`.train`, :mod:`.eval`);
:mod:`._common` holds what they share (the consoles, the one-line error runner, option parsers,
the base-model options).
"""

from __future__ import annotations

import click

from . import convert, eval, extract, inspect, train
from ._common import _fmt, console, err_console  # noqa: F401 (_fmt: examples/minilm.py imports it from here)
from .inspect import report_tables

__all__ = ["main", "console", "err_console", "report_tables"]


@click.group()
@click.version_option(package_name="elasticize")
def main() -> None:
    """Turn a trained PyTorch model into an elastic super-network, and cut sub-networks out of it."""


main.add_command(convert.convert)
main.add_command(inspect.inspect)
main.add_command(extract.extract)
main.add_command(train.train)
main.add_command(eval.eval_)
