"""Import an optional dependency, or fail with the extra that installs it."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


def require(module: str, extra: str) -> ModuleType:
    """``import module``, or raise naming the extra to install.

    Raises:
        ImportError: ``module`` is not installed (the message names ``pip install 'elasticize[extra]'``).
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"this integration needs {module.split('.')[0]}, which is not installed ({e}); "
                          f"install it with: pip install 'elasticize[{extra}]'") from e
