"""Model-family adapters: build a model by name, its example inputs, and non-tensor state.

A *recipe* (``{"adapter": "timm", "name": "resnet50", "kwargs": {...}}``) is how a
checkpoint rebuilds its base model without pickle: the adapter builds the architecture
(with random weights, fast, on the ``meta`` device when asked) and the checkpoint's
tensors fill it in. Adapters import their libraries lazily, so ``import elasticize``
needs neither timm nor torchvision.

Model specs understood by :func:`resolve_spec` (and by ``elasticize convert``):

* ``resnet50``: a timm model name;
* ``timm:resnet50`` / ``torchvision:resnet50``: explicit family;
* ``package.module:builder``: a function or class that builds your own model, as uvicorn names apps;
  as in uvicorn, the import looks in the current folder first (:func:`app_dir` chooses another,
  CLI ``--app-dir``);
* ``hf:bert-base-uncased`` or a local folder with a ``config.json``: a Hugging Face transformers model
  (:mod:`elasticize.adapters.hf`).

This module holds the :class:`Adapter` base, the registry, the recipe checks and building; one
module per family registers its adapter: :mod:`~elasticize.adapters.timm`,
:mod:`~elasticize.adapters.torchvision`, :mod:`~elasticize.adapters.importpath` (``import``) and
the package :mod:`~elasticize.adapters.hf`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .. import _registry

__all__ = ["Adapter", "register_adapter", "get_adapter", "resolve_spec", "build_from_recipe", "adapter_for_model",
           "check_recipe", "runs_code", "RECIPE_KEYS", "app_dir", "TimmAdapter", "TorchvisionAdapter", "ImportAdapter",
           "HFAdapter"]

#: The keys of a recipe; ``pretrained`` records whether conversion started from pretrained weights,
#: ``origin`` (transformers) whether ``name`` was a local folder's name or a hub id (informational).
RECIPE_KEYS = ("adapter", "name", "kwargs", "pretrained", "origin")
#: A string argument in a recipe may not look like a path or an address.
_SAFE_STR = re.compile(r"[\w.\-+ ]{0,64}")

_ADAPTERS: dict[str, "Adapter"] = {}
#: the folder ``package.module:builder`` imports look in first (None: the current folder); see :func:`app_dir`
_APP_DIR: contextvars.ContextVar[str | None] = contextvars.ContextVar("elasticize_app_dir", default=None)


class Adapter:
    """Glue for one model family. Subclass and register with :func:`register_adapter`.

    Attributes:
        name: the registered name.
        allowed_kwargs: the builder arguments a file's recipe may carry (JSON scalars, or flat lists
            of them, and strings that cannot name a path). Anything else could open a file, reach
            the network or unpickle, so :func:`check_recipe` refuses it with the key named.
        runs_user_code: building runs code outside elasticize and the family's library (the
            ``import`` adapter); a file's recipe then needs ``trust_remote_code=True``.
    """

    name: str = ""
    allowed_kwargs: frozenset[str] = frozenset()
    runs_user_code: bool = False

    def check_kwargs(self, name: str, kwargs: dict[str, Any]) -> None:
        """Check a file's recipe before anything is built from it.

        Raises:
            ValueError: a name that is not a plain model name, or an argument off
                :attr:`allowed_kwargs` or of a type that is not a JSON scalar (or flat list of them).
        """
        if not re.fullmatch(r"[\w.\-]{1,200}", name):
            raise ValueError(f"{name!r:.80} is not a {self.name} model name")
        for k, v in kwargs.items():
            if k not in self.allowed_kwargs:
                raise ValueError(f"kwargs.{k:.80}: the {self.name} adapter does not build from this argument from a "
                                 f"file (it could open a file, reach the network or unpickle); allowed: "
                                 f"{sorted(self.allowed_kwargs)}. Build the model yourself and pass it as model=")
            for x in v if isinstance(v, list) and len(v) <= 16 else [v]:
                if not (x is None or isinstance(x, (bool, int, float)) or (isinstance(x, str) and _SAFE_STR.fullmatch(x))):
                    raise ValueError(f"kwargs.{k}: {x!r:.80} is not a plain value (a number, a flag or a short name)")
                if isinstance(x, float) and not math.isfinite(x) or isinstance(x, int) and abs(x) > 1 << 24:
                    raise ValueError(f"kwargs.{k}: {x!r:.40} is not a finite number of a plausible size")

    def build(self, name: str, *, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
        """Build model ``name``.

        Raises:
            KeyError: unknown name (with close matches).
            RuntimeError: pretrained weights cannot be had (offline); the message names the way out.
        """
        raise NotImplementedError

    def example_inputs(self, model: nn.Module) -> tuple[torch.Tensor, ...]:
        """Example inputs for tracing, batch 1."""
        raise ValueError(f"pass example_inputs: the {self.name!r} adapter cannot guess {type(model).__name__}'s input")

    def owns(self, model: nn.Module) -> bool:
        """Whether a live model belongs to this family."""
        return False

    def after_extract(self, dense: nn.Module) -> None:
        """Bring non-tensor state (feature counts, configs) in line with a dense sub-network."""

    def recipe(self, model: nn.Module, name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        """How a checkpoint rebuilds ``model``: ``{"adapter", "name", "kwargs"}``, JSON-native, with no
        absolute path of this machine in it (a checkpoint is read elsewhere)."""
        return {"adapter": self.name, "name": name, "kwargs": dict(kwargs)}

    def files(self, name: str) -> dict[str, bytes]:
        """Small files that travel inside a checkpoint of model ``name`` (a Hugging Face model's
        tokenizer), file name -> contents; none by default."""
        return {}

    def plan(self, model: nn.Module, inputs: tuple, **options: Any) -> Any:
        """A plan made from the family's known structure, or None to analyse the traced graph.

        ``options`` are :func:`elasticize.elasticize`'s ``dims, depth_mode, width_ratios,
        heads_ratios, exclude``.
        """
        return None


def register_adapter(name: str) -> Callable[[type], type]:
    """Class decorator registering an :class:`Adapter` under ``name``.

    Raises:
        ValueError: if ``name`` is taken.
        TypeError: if the class is not an :class:`Adapter`.
    """

    def deco(cls: type) -> type:
        _registry.add(_ADAPTERS, "adapter", name, cls, Adapter, "pick another name")
        return cls

    return deco


def get_adapter(name: str) -> Adapter:
    """The adapter registered as ``name``.

    Raises:
        KeyError: if none is; the message lists the known adapters.
    """
    return _registry.get(_ADAPTERS, "adapter", name)


def adapter_for_model(model: nn.Module) -> Adapter | None:
    """The adapter whose family ``model`` belongs to, if any."""
    for a in _ADAPTERS.values():
        if a.owns(model):
            return a
    return None


def _offline_error(what: str, err: Exception) -> RuntimeError:
    return RuntimeError(
        f"could not get pretrained weights for {what} ({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}). "
        "If this machine is offline, use --no-pretrained (random weights) or --weights FILE.safetensors "
        "(in Python: pretrained=False, or load your weights into the model first)")


@contextlib.contextmanager
def app_dir(folder: str | os.PathLike | None) -> Iterator[None]:
    """Context manager: inside, ``package.module:builder`` imports look in ``folder`` first instead of
    the current folder (uvicorn's ``--app-dir``; CLI ``--app-dir``). The folder is never stored in a
    checkpoint; None keeps the current folder.

    Raises:
        FileNotFoundError: ``folder`` is not a folder.
    """
    if folder is not None and not Path(folder).is_dir():
        raise FileNotFoundError(f"app dir {folder}: no such folder")
    token = _APP_DIR.set(None if folder is None else str(Path(folder).resolve()))
    try:
        yield
    finally:
        _APP_DIR.reset(token)


def _import_folder() -> str | None:
    """The folder imports look in first: :func:`app_dir`'s, else the current folder."""
    folder = _APP_DIR.get()
    if folder is not None:
        return folder
    try:
        return os.getcwd()
    except OSError:  # the current folder was deleted
        return None


def resolve_spec(spec: str) -> tuple[str, str]:
    """``(adapter, name)`` for a model spec string; see the module docstring.

    Raises:
        KeyError: for an empty spec or an unknown family prefix.
    """
    spec = spec.strip()
    if not spec:
        raise KeyError("empty model name")
    if (Path(spec) / "config.json").is_file():
        return "hf", spec
    family, sep, rest = spec.partition(":")
    if sep and family in _ADAPTERS and family != "import":
        return family, rest
    if sep:
        return "import", spec
    return "timm", spec


def check_recipe(recipe: Any) -> None:
    """Check a recipe read from a file: its shape, its adapter, and the adapter's allow-list.

    Nothing is imported or built. An ``import`` recipe passes (``inspect`` shows it, with a
    warning); building it is refused by :func:`build_from_recipe` without ``trust_remote_code``.

    Raises:
        ValueError: a recipe that is not ``{"adapter", "name", "kwargs"[, "pretrained"]}`` of
            JSON-native values, an unknown adapter, or an argument off the adapter's allow-list.
    """
    if recipe == {}:
        return
    if not isinstance(recipe, dict) or not isinstance(recipe.get("adapter"), str) or \
            not isinstance(recipe.get("name"), str) or not isinstance(recipe.get("kwargs", {}), dict):
        raise ValueError("a recipe is {} or {\"adapter\": str, \"name\": str, \"kwargs\": {...}}")
    extra = sorted(set(recipe) - set(RECIPE_KEYS))
    if extra:
        raise ValueError(f"unknown key(s) {extra[:5]}")
    if not isinstance(recipe.get("pretrained", False), bool):
        raise ValueError("pretrained must be true or false")
    if recipe["adapter"] not in _ADAPTERS:
        raise ValueError(f"adapter {recipe['adapter']!r:.40} is not one of {sorted(_ADAPTERS)}")
    kwargs = recipe.get("kwargs") or {}
    if not all(isinstance(k, str) for k in kwargs):
        raise ValueError("kwargs keys must be strings")
    _ADAPTERS[recipe["adapter"]].check_kwargs(recipe["name"], kwargs)


def runs_code(recipe: dict[str, Any]) -> bool:
    """Whether building ``recipe`` would import and call code outside elasticize and its model libraries."""
    a = _ADAPTERS.get(recipe.get("adapter") or "")
    return bool(a is not None and a.runs_user_code)


def build_from_recipe(recipe: dict[str, Any], *, pretrained: bool = False, device: str | None = None,
                      trust_remote_code: bool = False) -> nn.Module:
    """Build the base model a file's recipe names, in eval mode.

    The recipe is checked first (:func:`check_recipe`): only allow-listed arguments reach a
    builder, and an ``import`` recipe (``package.module:builder``, your own code) is built only
    when ``trust_remote_code`` is True.

    Args:
        recipe: ``{"adapter", "name", "kwargs"}``.
        pretrained: fetch pretrained weights (off when a checkpoint brings its own).
        device: ``"meta"`` builds without allocating weights (for loading).
        trust_remote_code: allow an ``import`` recipe to import and call its builder.

    Raises:
        ValueError: if the recipe names no adapter (a model passed as an object): pass ``model=``;
            a recipe off its adapter's allow-list; an ``import`` recipe without ``trust_remote_code``.
        KeyError: unknown adapter or model name.
    """
    if not recipe or not recipe.get("adapter"):
        raise ValueError("this checkpoint was made from a model object, not a named model; pass the same "
                         "architecture: elasticize.load(path, model=my_model) (CLI: --model SPEC)")
    check_recipe(recipe)
    adapter = get_adapter(recipe["adapter"])
    if adapter.runs_user_code and not trust_remote_code:
        raise ValueError(f"this file's model is built by importing and calling {recipe['name']!r}, code from outside "
                         "elasticize; if you trust the file, pass trust_remote_code=True (CLI: --trust-remote-code), "
                         "or build the model yourself and pass it: model= (CLI: --model SPEC)")
    kwargs = dict(recipe.get("kwargs") or {})
    if device is None:
        model = adapter.build(recipe["name"], pretrained=pretrained, kwargs=kwargs)
    else:
        with torch.device(device):
            model = adapter.build(recipe["name"], pretrained=pretrained, kwargs=kwargs)
    return model.eval()


# the families, registered in this order (adapter_for_model asks them in turn); each imports its library lazily
from .timm import TimmAdapter  # noqa: E402,I001
from .torchvision import TorchvisionAdapter  # noqa: E402
from .importpath import ImportAdapter  # noqa: E402
from .hf import HFAdapter  # noqa: E402
