"""torchvision models, by name (``torchvision.models.get_model``), built without fetching a backbone."""

from __future__ import annotations

import difflib
from typing import Any

import torch
from torch import nn

from . import Adapter, _offline_error, register_adapter

__all__ = ["TorchvisionAdapter"]


@register_adapter("torchvision")
class TorchvisionAdapter(Adapter):
    """torchvision models, by name (``torchvision.models.get_model``).

    Without pretrained weights the builder is also told ``weights_backbone=None`` where it takes
    one: torchvision's segmentation and detection builders otherwise fetch (and unpickle) an
    ImageNet backbone checkpoint.
    """

    allowed_kwargs = frozenset({
        "num_classes", "aux_logits", "transform_input", "init_weights", "dropout", "attention_dropout",
        "stochastic_depth_prob", "width_mult", "zero_init_residual", "groups", "width_per_group",
        "replace_stride_with_dilation", "image_size", "aux_loss", "num_segments", "progress"})

    def build(self, name: str, *, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
        import torchvision

        names = torchvision.models.list_models()
        if name not in names:
            close = difflib.get_close_matches(name, names, n=5)
            raise KeyError(f"unknown torchvision model {name!r}" + (f"; did you mean {close}?" if close else ""))
        import inspect

        kwargs = dict(kwargs)
        if not pretrained and "weights_backbone" in inspect.signature(torchvision.models.get_model_builder(name)).parameters:
            kwargs.setdefault("weights_backbone", None)
        try:
            return torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None, **kwargs)
        except (OSError, RuntimeError, ConnectionError) as e:
            if pretrained:
                raise _offline_error(f"torchvision model {name!r}", e) from e
            raise

    def owns(self, model: nn.Module) -> bool:
        return type(model).__module__.startswith("torchvision.")

    def example_inputs(self, model: nn.Module) -> tuple[torch.Tensor, ...]:
        return (torch.randn(1, 3, 224, 224),)
