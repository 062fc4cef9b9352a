"""Batches and model outputs: how elasticize feeds a model and reads what it returns.

Shared by conversion (activation importance, the function check), the trainer and the adapters,
so none of them imports another's layer for it. Batches come in three shapes, handled the same
way everywhere:

* a tensor ``x``: ``model(x)``, no target;
* a tuple or list ``(x, y)`` (or ``(x1, ..., xn, y)``): ``model(x1, ..., xn)``, target ``y``;
  a 1-tuple ``(x,)`` has no target;
* a mapping (Hugging Face style): ``model(**inputs)`` with every key except the target keys
  (``labels``, ``label``, ``targets``), whose value, if present, is the target.

A model's output is reduced to one tensor by :func:`default_output` (the tensor itself, or
``logits``, or ``last_hidden_state`` of a Hugging Face ``ModelOutput``), or to all of its
floating-point tensors by :func:`float_tensors`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch

__all__ = ["TARGET_KEYS", "OutputFn", "split_batch", "forward_batch", "to_device", "batch_size", "default_output",
           "float_tensors"]

#: Mapping keys treated as the target, not passed to the model.
TARGET_KEYS = ("labels", "label", "targets")

#: An output function ``(output, batch) -> tensor`` (e.g. :func:`default_output`).
OutputFn = Callable[[Any, Any], torch.Tensor]


def split_batch(batch: Any) -> tuple[tuple, dict[str, Any], Any]:
    """``(args, kwargs, target)`` of a batch (see the module docstring).

    Raises:
        TypeError: a batch that is not a tensor, a tuple/list or a mapping.
    """
    if isinstance(batch, torch.Tensor):
        return (batch,), {}, None
    if isinstance(batch, Mapping):
        kwargs = {k: v for k, v in batch.items() if k not in TARGET_KEYS}
        target = next((batch[k] for k in TARGET_KEYS if k in batch), None)
        return (), kwargs, target
    if isinstance(batch, (tuple, list)):
        if len(batch) == 1:
            return (batch[0],), {}, None
        return tuple(batch[:-1]), {}, batch[-1]
    raise TypeError(f"a batch must be a tensor, a tuple (x, y) or a mapping of model inputs, not {type(batch).__name__}")


def forward_batch(model: Callable[..., Any], batch: Any) -> Any:
    """Run ``model`` on a batch: ``model(x)``, ``model(*xs)`` or ``model(**inputs)``."""
    args, kwargs, _ = split_batch(batch)
    return model(*args, **kwargs)


def to_device(batch: Any, device: torch.device) -> Any:
    """The batch with every tensor moved to ``device`` (same structure)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def batch_size(batch: Any) -> int:
    """Number of samples in a batch (first dimension of its first tensor)."""
    args, kwargs, _ = split_batch(batch)
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor):
            return int(v.shape[0])
    return 1


def default_output(output: Any, batch: Any = None) -> torch.Tensor:
    """The tensor of a model output: itself, its ``logits``, its ``last_hidden_state``, its ``out`` (torchvision's
    segmentation models return ``{"out": ..., "aux": ...}``), or its first element.

    Raises:
        TypeError: an output with none of these.
    """
    if isinstance(output, torch.Tensor):
        return output
    for key in ("logits", "last_hidden_state", "out"):
        v = output.get(key) if isinstance(output, Mapping) else getattr(output, key, None)
        if isinstance(v, torch.Tensor):
            return v
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find the output tensor in a {type(output).__name__}; pass output_fn=")


def same_outputs(got: Sequence[torch.Tensor], ref: Sequence[torch.Tensor], rtol: float) -> bool:
    """Whether two :func:`float_tensors` lists agree: the same shapes, every difference within ``rtol`` of the
    reference's largest magnitude (at least 1)."""
    return len(got) == len(ref) and all(
        a.shape == b.shape and bool((a - b).abs().max() <= rtol * max(1.0, b.abs().max().item())) for a, b in zip(got, ref))


def float_tensors(output: Any) -> list[torch.Tensor]:
    """The floating-point tensors of a model output (tensor, tuple, list, dict, ``ModelOutput``), in
    order, detached; integer tensors and other values are left out."""
    if isinstance(output, torch.Tensor):
        return [output.detach()] if output.is_floating_point() else []
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        return [t for o in output for t in float_tensors(o)]
    return []
