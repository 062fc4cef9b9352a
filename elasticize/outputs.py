"""Reading a model's output: the one tensor of whatever a forward returned.

Below both the trainer (:mod:`elasticize.train.losses`, whose output functions start from it) and
the adapters (:mod:`elasticize.adapters.hf.export` compares a rebuilt transformers model's
output with the sub-network's), so neither imports the other.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

__all__ = ["default_output"]


def default_output(output: Any, batch: Any = None) -> torch.Tensor:
    """The tensor of a model output: itself, its ``logits``, its ``last_hidden_state``, or its first element.

    Raises:
        TypeError: an output with none of these.
    """
    if isinstance(output, torch.Tensor):
        return output
    for key in ("logits", "last_hidden_state"):
        v = output.get(key) if isinstance(output, Mapping) else getattr(output, key, None)
        if isinstance(v, torch.Tensor):
            return v
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find the output tensor in a {type(output).__name__}; pass output_fn=")
