"""The rule context: the public API a rule's ``analyze`` uses on the module it handles.

A rule (:class:`elasticize.rules.Rule`) sees one :class:`SiteContext` per call of a module
it handles. Everything a rule needs is a method or attribute here (shapes, slots and their
sizes, coupling, fixing with a reason, producers, units, attributes that follow a group,
chunked and per-unit tensor axes, MAC terms, layer stages, the common layer patterns);
the propagation state behind it is not part of the API.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch.fx as fx
from torch import nn

from .ops.layers import conv_like, linear_like
from .propagator import Propagator, Value
from .results import StageInfo

__all__ = ["SiteContext"]


class SiteContext:
    """What a rule sees while the analysis visits one module (a leaf of the trace).

    Slots are integers; a tensor value is a tuple with one slot per axis. A rule joins
    the slots of its inputs with the slots of its tensors and returns its output value.

    Attributes:
        path: the module's path in the model (``""`` for the model itself).
        module: the module.
        node: its call in the traced graph (``node.args`` / ``node.kwargs`` are the call's arguments).
    """

    def __init__(self, prop: Propagator, path: str, module: nn.Module, node: fx.Node) -> None:
        self._p = prop
        self._c = prop.c
        self.path = path
        self.module = module
        self.node = node

    # shapes -------------------------------------------------------------
    @property
    def out_shape(self) -> tuple[int, ...]:
        """Shape of the module's output on the example inputs."""
        return self._p.shape(self.node)

    def in_shape(self, i: int = 0) -> tuple[int, ...]:
        """Shape of the module's ``i``-th positional input on the example inputs."""
        return self._p.shape(self.node.args[i])

    def shape_of(self, arg: Any) -> tuple[int, ...]:
        """Shape of an argument of the call (``ctx.node.kwargs["key"]``) on the example inputs; ``()`` for a non-tensor."""
        return self._p.shape(arg)

    # slots --------------------------------------------------------------
    def tensor(self, name: str) -> tuple[int, ...] | None:
        """Slots of the module's own parameter or buffer ``name`` (a dotted path below it), or None."""
        return self._p.tensor_slots(f"{self.path}.{name}" if self.path else name)

    def value(self, arg: fx.Node) -> Value:
        """The slots of an argument of the call given as a graph node (one passed by keyword), or None."""
        return self._p.env.get(arg)

    def size(self, slot: int) -> int:
        """Channels of ``slot`` (its full size)."""
        return self._c.size[slot]

    def couple(self, a: int, b: int) -> int:
        """Put two slots in one coupling group; returns the group's root slot."""
        return self._c.union(a, b)

    def new(self, size: int, fixed: str | None = None) -> int:
        """A fresh slot of ``size``; ``fixed`` gives the reason it may never be sliced."""
        return self._c.new(size, fixed)

    def fresh(self, reason: str | None = None, *, item: int | None = None) -> Value:
        """New slots shaped like the module's output, fixed with ``reason`` unless it is None.

        Args:
            reason: why these slots may never be sliced, or None for free slots.
            item: for an output that is a tuple, new slots for its ``item``-th element only
                (None when the output has no such element).
        """
        if item is None:
            return self._p.fresh(self.node, reason)
        meta = self.node.meta.get("tensor_meta", self.node.meta.get("val"))
        return self._p.fresh_from(meta[item], reason) if isinstance(meta, (list, tuple)) and len(meta) > item else None

    def fix(self, value: Value, reason: str) -> None:
        """Mark every slot of ``value`` as never sliced, with the reason."""
        self._p.fix_value(value, reason)

    def refuse(self, reason: str, *inputs: Value) -> Value:
        """Keep the module whole: fix its inputs, list it as not elastic with ``reason``, return fixed outputs."""
        for v in inputs:
            self.fix(v, reason)
        self._p.not_elastic.append((self.path, reason))
        return self.fresh(reason)

    def producer(self, slot: int, *, unit: int = 1, kind: str = "width") -> None:
        """Mark a slot as an elastic dimension's source (a layer's output channels or its heads)."""
        self._c.producer.add(slot)
        if unit > 1:
            self._c.unit[slot] = math.lcm(self._c.unit.get(slot, 1), unit)
        if kind != "width":
            self._c.kind[slot] = kind

    def unit(self, slot: int, unit: int) -> None:
        """Make ``slot``'s group move in multiples of ``unit`` channels (whole heads, whole norm groups).

        Units add up as their least common multiple: a group that holds heads of 64
        channels and norm groups of 48 moves in steps of 192.
        """
        self._c.require_unit(slot, unit)

    def attr(self, name: str, slot: int, *, kind: str = "int", mul: int = 1, div: int = 1,
             module: str | None = None) -> None:
        """Declare that attribute ``name`` of the module (or of ``module``, a path below it) follows a slot.

        ``kind="int"`` gives ``active * mul // div``; ``kind="shape"`` gives ``(active * mul // div,)``.
        """
        path = self.path if module is None else (f"{self.path}.{module}" if self.path else module)
        self._c.attrs.append((path, name, slot, kind, mul, div))

    def chunked(self, name: str, axis: int, chunks: int) -> None:
        """Declare that axis ``axis`` of tensor ``name`` is ``chunks`` equal parts sliced alike (fused q/k/v).

        Call it before :meth:`tensor` first reads ``name``: the axis's slot then has
        ``size // chunks`` channels.
        """
        fqn = f"{self.path}.{name}" if self.path else name
        self._c.chunks[(fqn, axis)] = chunks

    def per_unit(self, name: str, axis: int, slot: int, unit: int) -> None:
        """Declare axis ``axis`` of tensor ``name`` one entry per ``unit`` channels of ``slot``'s group.

        A relative position bias table ``(positions, num_heads)`` next to a heads group whose
        size is in channels (``head_dim`` per head) has ``unit=head_dim``: it keeps one column
        per active head, and the importance order moves its columns with their heads.

        Raises:
            ValueError: if the axis does not have ``size(slot) / unit`` entries.
        """
        fqn = f"{self.path}.{name}" if self.path else name
        n = self._p.state[fqn].shape[axis]
        if n * unit != self._c.size[slot]:
            raise ValueError(f"{fqn} axis {axis} has {n} entries, not {self._c.size[slot]} / {unit}")
        self._c.per_unit[(fqn, axis)] = (slot, unit)

    def repeated(self, slot: int, chunks: int) -> int:
        """A fresh activation slot made of ``chunks`` side-by-side copies of ``slot``'s channels.

        For outputs such as a bidirectional RNN's ``(..., 2 * hidden)``: whatever joins the
        returned slot (the next layer's input columns) is sliced as ``chunks`` chunks of
        ``slot``'s group.
        """
        return self._c.repeated(slot, chunks)

    def macs(self, macs: int, factors: Sequence[int], *, owner: str | None = None) -> None:
        """Record ``macs`` multiply-accumulates (whole example batch) scaled by the slots' active ratios.

        ``owner`` (default: this module) is the block whose skipping removes the term, e.g. one
        of the layer names :meth:`layers` returns.
        """
        self._p.add_macs(self.path if owner is None else owner, macs, factors)

    def layers(self, tensors: Sequence[Sequence[str]], *, attr: str, n_mandatory: int = 1) -> list[str]:
        """Declare the module's own stacked layers a depth stage (prefix depth, e.g. ``nn.LSTM.num_layers``).

        At depth ``k`` the module runs its first ``k`` layers: attribute ``attr`` reads ``k``
        (the rule's mixin makes the forward honour it), the MAC terms recorded with
        ``owner=`` a dropped layer's name are not counted, and an extracted sub-network
        loses the dropped layers' tensors (then :meth:`Rule.densify` fixes the module's
        derived state). The stage is named after the module's path.

        Args:
            tensors: per layer, the names (below the module) of the tensors that belong to it.
            attr: the module's attribute that holds the number of layers.
            n_mandatory: leading layers that always run.

        Returns:
            The layers' names, ``<module>:l<k>``, for the ``owner`` of :meth:`macs`.
        """
        blocks = [f"{self.path}:l{k}" for k in range(len(tensors))]
        fqns = [[f"{self.path}.{n}" if self.path else n for n in names] for names in tensors]
        if not any(st.module == self.path for st in self._p.layer_stages):  # a module called twice declares once
            self._p.layer_stages.append(StageInfo(self.path or "<root>", blocks, n_mandatory, self.path, attr, fqns))
        return blocks

    # the common layer patterns, shared with the functional handlers ------
    def linear(self, x: Value, weight: str = "weight", bias: str | None = "bias") -> Value:
        """``y = x W^T + b`` along the last axis (``W``: (out, in))."""
        w = self.tensor(weight)
        b = self.tensor(bias) if bias else None
        return linear_like(self._p, x, w, b, self.out_shape, self.path)

    def conv(self, x: Value, groups: int, weight: str = "weight", bias: str | None = "bias") -> Value:
        """Convolution over axis 1 (``W``: (out, in/groups, *kernel))."""
        w = self.tensor(weight)
        b = self.tensor(bias) if bias else None
        return conv_like(self._p, x, w, b, groups, self.out_shape, self.path, module=self.path)

    def norm(self, x: Value, axis: int, names: Sequence[str]) -> Value:
        """A norm whose tensors ``names`` are per-channel along ``axis`` of ``x``; output slots = input slots."""
        ax = axis % len(x)
        for n in names:
            t = self.tensor(n)
            if t is not None:
                self.couple(x[ax], t[0])
        return x
