"""Op handlers: how each op the analysis knows joins the slots of its inputs and outputs.

One table (:func:`registered_ops`) says which ops are handled: each handler is registered
with :func:`op` under the canonical names of its ops (:func:`canonical`), and the first
paragraph of its docstring says how the op couples axes. The handlers live by kind:
:mod:`.shape` (element-wise, broadcasts, reshapes, reductions, pooling, permutations),
:mod:`.join` (concatenation, stacking, splitting, indexing), :mod:`.layers` (functional
linear, convolution, norms, embedding), :mod:`.channels` (per-channel activations, channel
splits and shuffles, order-dependent ops, sampling), :mod:`.contract` (matmul, einsum, attention);
:mod:`.sizes` follows sizes read off axes. Adding an op is one decorated function::

    @op("my_op")
    def my_op(p, node):
        \"\"\"The output keeps the input's slots.\"\"\"
        return p.env.get(node.args[0])
"""

from __future__ import annotations

from .registry import OpHandler, as_tuple, call_args, canonical, handler_for, op, registered_ops

__all__ = ["OpHandler", "op", "handler_for", "registered_ops", "canonical", "call_args", "as_tuple"]

from . import channels, contract, join, layers, shape  # noqa: E402,F401  (register the handlers)
