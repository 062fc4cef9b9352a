"""Your own model by import path, ``package.module:builder`` (as uvicorn names apps): imported with
the current folder, or the :func:`~elasticize.adapters.app_dir` folder, first on ``sys.path``."""

from __future__ import annotations

import contextlib
import importlib
import re
import sys
from typing import Any, Iterator

import torch
from torch import nn

from . import Adapter, _import_folder, register_adapter

__all__ = ["ImportAdapter"]


@contextlib.contextmanager
def _first_on_path(folder: str | None) -> Iterator[None]:
    """``folder`` at the front of ``sys.path`` inside (for one import), as it was after."""
    if folder is None:
        yield
        return
    sys.path.insert(0, folder)
    importlib.invalidate_caches()  # a module written since the folder was last listed
    try:
        yield
    finally:
        if sys.path and sys.path[0] == folder:
            del sys.path[0]
        elif folder in sys.path:
            sys.path.remove(folder)


def import_callable(name: str) -> Any:
    """The callable ``package.module:attr`` names, imported with the :func:`app_dir` folder (or the current
    folder) first on ``sys.path``. Only for a name the user gave (a model builder, an ``eval --data`` function).

    Raises:
        KeyError: not an import path, a module that cannot be imported, or no such callable.
    """
    mod_name, _, attr = name.partition(":")
    if not attr or not re.fullmatch(r"[\w.]+", mod_name) or not re.fullmatch(r"[\w.]+", attr):
        raise KeyError(f"{name!r} is not an import path; write package.module:builder")
    folder = _import_folder()
    with _first_on_path(folder):
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as e:
            where = f"in {folder} or on sys.path" if folder else "on sys.path"
            raise KeyError(f"cannot import {mod_name!r} for {name!r} ({e}); looked {where}: run from the folder "
                           "that holds it, or pass --app-dir DIR (Python: elasticize.adapters.app_dir)") from e
        obj: Any = mod
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise KeyError(f"{mod_name!r} has no {attr!r}")
            obj = getattr(obj, part)
    if not callable(obj):
        raise KeyError(f"{name!r} is not callable")
    return obj


@register_adapter("import")
class ImportAdapter(Adapter):
    """Your own model: ``package.module:builder``, a function or class called with ``kwargs``.

    As uvicorn does for ``module:app``, the module is imported with the current folder (or the
    :func:`app_dir` folder) first on ``sys.path``, for the import and the call only.

    Building imports and calls code that is not elasticize's, so a file's ``import`` recipe is only
    built with ``trust_remote_code=True``; its kwargs may then be any JSON values.
    """

    runs_user_code = True

    def check_kwargs(self, name: str, kwargs: dict[str, Any]) -> None:
        if not re.fullmatch(r"[\w.]{1,200}:[\w.]{1,200}", name):
            raise ValueError(f"{name!r:.80} is not an import path; write package.module:builder")

    def build(self, name: str, *, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
        """Import ``package.module`` and call ``builder(**kwargs)``.

        Raises:
            KeyError: not an import path, a module that cannot be imported, or no such callable.
            TypeError: the builder returned something other than an ``nn.Module``.
        """
        folder = _import_folder()
        with _first_on_path(folder):
            obj = import_callable(name)
            model = obj(**kwargs)
        if not isinstance(model, nn.Module):
            raise TypeError(f"{name!r} returned {type(model).__name__}, not an nn.Module")
        return model

    def example_inputs(self, model: nn.Module) -> tuple[torch.Tensor, ...]:
        ex = getattr(model, "example_inputs", None)
        if callable(ex):
            ex = ex()
        if isinstance(ex, torch.Tensor):
            return (ex,)
        if isinstance(ex, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in ex):
            return tuple(ex)
        raise ValueError(f"pass example_inputs: elasticize cannot guess the input of {type(model).__name__} "
                         "(e.g. example_inputs=torch.randn(1, 3, 224, 224)), or give --input-shape on the command line, "
                         "or define model.example_inputs()")
