"""Recurrent layers: ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` with an elastic hidden size.

The hidden size ``H`` of an RNN is one coupling group. Every tensor that reads or writes a
hidden unit is a member:

* ``weight_ih_l{k}`` and ``weight_hh_l{k}`` rows and ``bias_*_l{k}``: ``gates`` chunks of
  ``H`` rows (LSTM: i, f, g, o = 4; GRU: r, z, n = 3; RNN: 1), each chunk sliced alike, so
  one importance order is shared by the gates of a unit;
* ``weight_hh_l{k}`` columns (the recurrent input) and, for ``k > 0``, ``weight_ih_l{k}``
  columns (the previous layer's output, ``D`` chunks of ``H`` when bidirectional);
* the ``*_reverse`` tensors of a bidirectional RNN, and the initial state's last axis.

The output's feature axis is ``H`` (one direction) or ``2 * H`` laid out as two copies of the
hidden index space (forward, backward), so a consumer (the next RNN, a ``Linear`` head, a
norm) is sliced through the same group, in two chunks. ``hidden_size`` (and ``input_size``
when the input features are elastic) follow the active size, so an extracted sub-network is
a plain ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` of the smaller size. ``batch_first``,
unbatched input and packed sequences (``nn.utils.rnn.PackedSequence``) run unchanged.

MACs per sample (Subnetwork-to-go, arXiv 2312.03464, counts MACs of its BLSTMs the same way):
``positions * gates * H * (I_k + H)`` per layer and direction, with ``I_0`` the input
features and ``I_k = D * H`` above; gate nonlinearities and element-wise products are not
counted (as for norms and activations elsewhere).

An LSTM with ``proj_size > 0`` is kept whole and listed with the reason.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from ..graph import SiteContext
from . import Rule, register_rule

__all__ = ["RNNRule", "ElasticRNNMixin"]

_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


class ElasticRNNMixin:
    """Rebuilds ``_flat_weights`` from the sliced views before every forward.

    ``nn.RNNBase.forward`` hands the fused kernel ``self._flat_weights``, a list cached at
    construction and on ``_apply``; the sliced views of the active sub-network are new
    tensors, so the list is rebuilt (a few ``narrow`` views, no copy) on each call.
    """

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._init_flat_weights()  # type: ignore[attr-defined]
        return super().forward(*args, **kwargs)  # type: ignore[misc]

    def __getstate__(self) -> dict[str, Any]:
        # copies (extraction deep-copies the module) hold the full parameters, not views
        state = super().__getstate__()  # type: ignore[misc]
        state["_flat_weights"] = [self._parameters.get(n) for n in self._flat_weights_names]  # type: ignore[attr-defined]
        return state


@register_rule("rnn")
class RNNRule(Rule):
    """``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` (and subclasses): the hidden size is a width dimension."""

    module_types = (nn.RNNBase,)
    mixin = ElasticRNNMixin

    def analyze(self, ctx: SiteContext, x: Any, hx: Any = None, *rest: Any) -> Any:
        m = ctx.module
        if not isinstance(x, tuple):
            return ctx.refuse(f"{type(m).__name__} input is not a plain tensor during the analysis; pass a padded "
                              "tensor as the example input (packed sequences still run after conversion)", x, hx)
        if getattr(m, "proj_size", 0) > 0:
            return ctx.refuse(f"{type(m).__name__} with proj_size={m.proj_size} > 0 is not supported (its projected "
                              "state would need a second group); it is kept at full size", x, hx)
        gates = _GATES.get(m.mode)
        if gates is None:
            return ctx.refuse(f"unknown RNN mode {m.mode!r}", x, hx)
        dirs = 2 if m.bidirectional else 1
        hid = None
        shape = ctx.in_shape(0)
        positions = math.prod(shape[:-1]) if shape else 1
        size = ctx.c.size
        for layer in range(m.num_layers):
            for sfx in ("", "_reverse")[:dirs]:
                ih, hh = f"weight_ih_l{layer}{sfx}", f"weight_hh_l{layer}{sfx}"
                biases = (f"bias_ih_l{layer}{sfx}", f"bias_hh_l{layer}{sfx}") if m.bias else ()
                for n in (ih, hh, *biases):
                    ctx.chunked(n, 0, gates)
                if layer > 0 and dirs > 1:
                    ctx.chunked(ih, 1, dirs)
                w_ih, w_hh = ctx.tensor(ih), ctx.tensor(hh)
                hid = w_ih[0] if hid is None else ctx.couple(hid, w_ih[0])
                ctx.couple(hid, w_hh[0])
                ctx.couple(hid, w_hh[1])
                for n in biases:
                    ctx.couple(hid, ctx.tensor(n)[0])
                if layer == 0:
                    ctx.couple(x[-1], w_ih[1])
                    ctx.macs(positions * gates * size[hid] * size[x[-1]], [hid, x[-1]])
                else:
                    ctx.couple(hid, w_ih[1])
                    ctx.macs(positions * gates * size[hid] * size[hid] * dirs, [hid, hid])
                ctx.macs(positions * gates * size[hid] * size[hid], [hid, hid])
        ctx.producer(hid)
        ctx.attr("hidden_size", hid)
        ctx.attr("input_size", x[-1])
        states = hx if isinstance(hx, list) else [hx]
        for h in states:
            if isinstance(h, tuple):
                ctx.couple(hid, h[-1])
        out = x[:-1] + (hid if dirs == 1 else ctx.repeated(hid, dirs),)
        if len(x) == 3:
            batch = x[0] if m.batch_first else x[1]
            h_n = (ctx.new(dirs * m.num_layers), batch, hid)
        else:
            h_n = (ctx.new(dirs * m.num_layers), hid)
        return [out, [h_n, h_n]] if m.mode == "LSTM" else [out, h_n]
