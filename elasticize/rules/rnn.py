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

Elastic depth (prefix depth over the RNN's own ``num_layers``, a depth stage named after the
module's path, choices ``num_layers`` down to 1): at depth ``k`` only the first ``k`` layers
run, so the output keeps its feature size (``D * H``) while ``h_n`` / ``c_n`` have ``k * D``
rows (the last active layer's state is ``h_n[-D:]``, as for a plain ``k``-layer RNN); an
initial state given with ``num_layers * D`` rows is cut to its first ``k * D``. The layers
above ``k`` count no MACs and no parameters, and an extracted sub-network is a plain
``nn.LSTM(num_layers=k)``. Code that reshapes ``h_n`` with a hard-coded ``num_layers`` breaks
at a smaller depth; exclude the stage (``exclude=("<path>",)``) for such a model.

An LSTM with ``proj_size > 0`` is kept whole and listed with the reason.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..graph import SiteContext
from . import Rule, register_rule

__all__ = ["RNNRule", "ElasticRNNMixin"]

_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


class ElasticRNNMixin:
    """Rebuilds ``_flat_weights`` from the sliced views before every forward, for the active layers.

    ``nn.RNNBase.forward`` hands the fused kernel ``self._flat_weights``, a list cached at
    construction and on ``_apply``; the sliced views of the active sub-network are new
    tensors, so the list is rebuilt (a few ``narrow`` views, no copy) on each call. With
    elastic depth, ``num_layers`` reads the active depth ``k`` and ``_flat_weights_names``
    lists the first ``k`` layers' tensors only, so the kernel runs those layers. An initial
    state ``hx`` given with the full ``num_layers * D`` rows is cut to its first ``k * D``.
    """

    @property
    def _flat_weights_names(self) -> list[str]:
        names = self.__dict__["_flat_weights_names"]
        if "_el_attrs" not in self.__dict__:  # being restored to the plain class
            return names
        full, active = self.__dict__["num_layers"], self.num_layers  # type: ignore[attr-defined]
        return names if active == full else names[: len(names) // full * active]

    @_flat_weights_names.setter
    def _flat_weights_names(self, value: list[str]) -> None:
        self.__dict__["_flat_weights_names"] = value

    def _weights_have_changed(self) -> bool:
        # the depth may have changed since the cached list was built
        if len(self._flat_weight_refs) != len(self._flat_weights_names):  # type: ignore[attr-defined]
            return True
        return super()._weights_have_changed()  # type: ignore[misc]

    def forward(self, input: Any, hx: Any = None) -> Any:
        self._init_flat_weights()  # type: ignore[attr-defined]
        full, active = self.__dict__["num_layers"], self.num_layers  # type: ignore[attr-defined]
        if hx is not None and active != full:
            dirs = 2 if self.bidirectional else 1  # type: ignore[attr-defined]

            def cut(h: torch.Tensor) -> torch.Tensor:
                return h.narrow(0, 0, active * dirs) if h.shape[0] == full * dirs else h

            hx = tuple(cut(h) for h in hx) if isinstance(hx, tuple) else cut(hx)
        return super().forward(input, hx)  # type: ignore[misc]

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
        size = ctx.size
        names = [[f"{w}_l{layer}{sfx}" for sfx in ("", "_reverse")[:dirs]
                  for w in ("weight_ih", "weight_hh", *(("bias_ih", "bias_hh") if m.bias else ()))]
                 for layer in range(m.num_layers)]
        owners = ctx.layers(names, attr="num_layers") if m.num_layers > 1 else [None]
        for layer in range(m.num_layers):
            owner = owners[layer] if m.num_layers > 1 else None
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
                    ctx.macs(positions * gates * size(hid) * size(x[-1]), [hid, x[-1]], owner=owner)
                else:
                    ctx.couple(hid, w_ih[1])
                    ctx.macs(positions * gates * size(hid) * size(hid) * dirs, [hid, hid], owner=owner)
                ctx.macs(positions * gates * size(hid) * size(hid), [hid, hid], owner=owner)
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

    def densify(self, module: nn.Module) -> None:
        """Keep the tensor-name lists of an extracted RNN to the layers it still has (``num_layers``)."""
        d = module.__dict__
        dirs = 2 if module.bidirectional else 1  # type: ignore[attr-defined]
        k = module.num_layers  # type: ignore[attr-defined]
        d["_all_weights"] = d["_all_weights"][: k * dirs]
        d["_flat_weights_names"] = [n for ws in d["_all_weights"] for n in ws]
        module._init_flat_weights()  # type: ignore[operator]
