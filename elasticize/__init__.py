"""elasticize: turn a trained PyTorch model into an elastic super-network.

One set of nested weights holds many sub-networks of smaller width, attention heads
and depth, cut at inference without retraining, and shipped as one safetensors file.

    >>> import elasticize
    >>> em = elasticize.elasticize(model, example_inputs=x)
    >>> with em.subnet("small"):
    ...     y = em(x)
    >>> dense = em.extract("small")
    >>> elasticize.save(em, "m.safetensors")
"""

from ._version import __version__
from .adapters import Adapter, register_adapter
from .model import ConvertOptions, ElasticModel, convert, elasticize
from .rules import Rule, register_rule
from .space import SearchSpace

__all__ = ["__version__", "elasticize", "convert", "ConvertOptions", "ElasticModel", "SearchSpace", "Rule",
           "register_rule", "Adapter", "register_adapter", "save", "save_subnet", "load", "load_subnet",
           "read_manifest", "evaluate"]

_CHECKPOINT = ("save", "save_subnet", "load", "load_subnet", "read_manifest")


def __getattr__(name: str):  # checkpoint functions, imported on first use
    if name in _CHECKPOINT:
        from . import checkpoint

        return getattr(checkpoint, name)
    if name == "evaluate":  # elasticize eval in Python (elasticize.measure.evaluate)
        from .measure import evaluate

        return evaluate
    raise AttributeError(f"module 'elasticize' has no attribute {name!r}")
