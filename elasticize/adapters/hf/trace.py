"""One forward pass with hooks over a transformers model: what its plan measures rather than reads.

MACs are counted per sample at the example inputs' size: every linear / ``Conv1D`` / convolution
and mixture-of-experts block as measured by the pass (the planner adds ``2 * tokens^2 * heads *
head_dim`` per attention for the two attention matmuls).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .roles import in_out, is_conv1d, is_experts, is_norm, is_router

__all__ = ["Trace", "trace"]


@dataclass
class Trace:
    """What :func:`trace` measured.

    Attributes:
        seen: module path -> MACs per sample (linear layers, convolutions, experts, routers).
        tokens: projection path -> the tokens per sample it saw (at the inputs' full length).
        reads: projection path -> the storage address of its input.
        stream: the storage addresses of the residual stream (outputs of the stack's layers,
            embeddings and norms).
        tuple_layers: layer path -> the length of the ``(hidden_states, None, ...)`` tuple it
            returns, or None for any other non-tensor output.
        stream_is_output: whether the model's (first) output is the residual stream itself.
    """

    seen: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    reads: dict[str, int | None] = field(default_factory=dict)
    stream: set[int | None] = field(default_factory=set)
    tuple_layers: dict[str, int | None] = field(default_factory=dict)
    stream_is_output: bool = False


def trace(model: nn.Module, inputs: tuple, stack_path: str, hidden: int) -> Trace:
    """One forward pass with hooks: MACs and tokens per projection, and which tensors are the residual stream.

    The stream is every output of a layer of the stack, of an embedding and of a norm; a projection
    outside the stack reads the stream if its input shares storage with one of those (a view such
    as ``hidden[:, 0]`` does; a pooler's ``tanh(dense(x))`` does not).

    Token inputs longer than 16 are traced at 16 tokens, and the projections that see every token
    are counted at the full length (MACs are linear in tokens, attention matmuls quadratic).

    Args:
        model: the model, in eval mode.
        inputs: its example positional inputs, e.g. ``(input_ids,)`` of shape ``(batch, tokens)``.
        stack_path: the path of the layer stack (``"\\0"`` when there is none).
        hidden: the residual-stream width (``config.hidden_size``), to tell a router.
    """
    short, full = 0, 0
    x0 = inputs[0] if inputs else None
    if isinstance(x0, torch.Tensor) and x0.dim() == 2 and not x0.is_floating_point() and x0.shape[1] > 16:
        short, full = 16, int(x0.shape[1])
        inputs = (x0[:, :short], *inputs[1:])
    tr = Trace()
    hooks, alive = [], []  # tensors are kept alive so that no storage address is reused during the pass

    def storage(x: Any) -> int | None:
        if not isinstance(x, torch.Tensor):
            return None
        alive.append(x)
        return x.untyped_storage().data_ptr()

    n_batch = x0.shape[0] if isinstance(x0, torch.Tensor) and x0.dim() > 1 else 1  # MACs are per sample
    for name, m in model.named_modules():
        if is_experts(m) or is_router(m, hidden):
            def moe_hook(mod, args, out, name=name):  # per sample: tokens routed to an expert, or all tokens
                if is_experts(mod):  # args: (hidden (tokens, H), top_k_index (tokens, k), top_k_weights)
                    e, two_i, h = mod.gate_up_proj.shape
                    macs = args[1].numel() * (two_i * h + h * two_i // 2) / n_batch
                else:
                    macs = args[0].numel() // args[0].shape[-1] * mod.weight.numel() / n_batch
                tr.seen[name] = tr.seen.get(name, 0) + int(macs * (full / short if short else 1))
            hooks.append(m.register_forward_hook(moe_hook))
        elif isinstance(m, (nn.Linear, nn.Conv2d)) or is_conv1d(m):
            def hook(mod, args, out, name=name):
                x = args[0]
                batch = n_batch  # not x.shape[0]: MoE blocks flatten (batch, tokens) into one axis
                if isinstance(mod, nn.Conv2d):
                    k = mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
                    macs = out.numel() // batch * k
                else:
                    i, o = in_out(mod)
                    t = x.numel() // i // batch
                    tr.tokens[name] = full if short and t == short else t
                    macs = tr.tokens[name] * i * o
                tr.seen[name] = tr.seen.get(name, 0) + macs
                tr.reads[name] = storage(x)
            hooks.append(m.register_forward_hook(hook))
        elif isinstance(m, nn.Embedding) or is_norm(m) or name.startswith(stack_path + ".") and \
                name.count(".") == stack_path.count(".") + 1:
            def out_hook(mod, args, out, name=name):
                tr.stream.add(storage(out[0] if isinstance(out, tuple) else out))
                if name.startswith(stack_path + ".") and not isinstance(out, torch.Tensor):
                    # a tuple (hidden, None, ...) can be mimicked by a skipped layer; anything else not
                    tr.tuple_layers[name] = (len(out) if isinstance(out, tuple) and out
                                         and all(o is None for o in out[1:]) else None)
            hooks.append(m.register_forward_hook(out_hook))
    try:
        with torch.no_grad():
            out = model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    first = out[0] if isinstance(out, (tuple, list)) or hasattr(out, "to_tuple") else out
    tr.stream_is_output = storage(first) in tr.stream
    alive.clear()
    return tr
