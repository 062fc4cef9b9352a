"""timm models, by name (``timm.create_model``): builder arguments a file may carry, example inputs
at the pretrained config's size, and ``num_features`` / ``head_hidden_size`` after extraction."""

from __future__ import annotations

import difflib
from typing import Any

import torch
from torch import nn

from . import Adapter, _offline_error, register_adapter

__all__ = ["TimmAdapter"]


@register_adapter("timm")
class TimmAdapter(Adapter):
    """timm models, by name (``timm.create_model``)."""

    allowed_kwargs = frozenset({
        "num_classes", "in_chans", "img_size", "global_pool", "drop_rate", "drop_path_rate", "proj_drop_rate",
        "attn_drop_rate", "pos_drop_rate", "patch_drop_rate", "drop_block_rate", "class_token", "no_embed_class",
        "reg_tokens", "pre_norm", "fc_norm", "dynamic_img_size", "dynamic_img_pad", "output_stride", "patch_size",
        "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "qk_norm", "init_values", "layer_scale_init_value",
        "scriptable", "exportable", "no_jit", "features_only", "out_indices", "window_size"})

    def build(self, name: str, *, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
        import timm

        if not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=5)
            raise KeyError(f"unknown timm model {name!r}" + (f"; did you mean {close}?" if close else
                           "; see timm.list_models(), or use torchvision:NAME or package.module:builder"))
        try:
            return timm.create_model(name, pretrained=pretrained, **kwargs)
        except (OSError, RuntimeError, ConnectionError) as e:
            if pretrained:
                raise _offline_error(f"timm model {name!r}", e) from e
            raise

    def owns(self, model: nn.Module) -> bool:
        return type(model).__module__.startswith("timm.") and hasattr(model, "pretrained_cfg")

    def example_inputs(self, model: nn.Module) -> tuple[torch.Tensor, ...]:
        """Batch 1 at the pretrained config's input size, or at the image size the model was built
        for (an ``img_size`` kwarg reaches the patch embedding, not the config)."""
        cfg = getattr(model, "pretrained_cfg", None) or {}
        size = list(cfg.get("input_size", (3, 224, 224)))
        img = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if isinstance(img, (tuple, list)) and len(img) == 2 and all(isinstance(n, int) for n in img):
            size[1:] = img
        return (torch.randn(1, *size),)

    def after_extract(self, dense: nn.Module) -> None:
        get = getattr(dense, "get_classifier", None)
        head = get() if callable(get) else None
        if isinstance(head, nn.Linear):
            for attr in ("num_features", "head_hidden_size"):
                if isinstance(getattr(dense, attr, None), int):
                    setattr(dense, attr, head.in_features)
            if isinstance(getattr(dense, "embed_dim", None), int) and hasattr(dense, "blocks"):
                dense.embed_dim = head.in_features
