"""Tracing: the model's graph, with shapes, from ``torch.fx`` or else ``torch.export``.

The model is traced with ``torch.fx``; modules a rule handles are leaves, and a submodule
whose ``forward`` cannot be traced becomes a leaf too, with the reason recorded (as NVIDIA
ModelOpt's tracer does) and its MACs measured. When the top-level ``forward`` itself cannot
be traced, ``torch.export`` (non-strict) is used instead, and parameters are found through
its graph signature. Shapes come from running the graph once on the example inputs
(``ShapeProp``). PyTorch's ``nn.TransformerEncoder``, ``nn.TransformerDecoder`` and
``nn.Transformer`` branch on their inputs' properties; they are traced through equivalent
loops over their layers (``_TRACE_AS``).
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from .coupling import Coupling
from .macs import measure_macs

__all__ = ["Trace", "Tracer", "trace", "stand_in_attrs"]


def _encoder_stack(m: nn.TransformerEncoder, src: Any, mask: Any = None, src_key_padding_mask: Any = None,
                   is_causal: Any = None) -> Any:
    """What ``nn.TransformerEncoder.forward`` computes on a padded (not nested) input, in traceable form.

    Its own forward reads ``src.is_nested`` to find the sequence length and picks a nested-tensor
    kernel from the input's properties; neither changes a shape or a coupling, so the analysis
    traces this loop over its layers instead (the model still runs its own forward).
    """
    out = src
    for layer in m.layers:
        out = layer(out, src_mask=mask, is_causal=is_causal is True, src_key_padding_mask=src_key_padding_mask)
    return m.norm(out) if m.norm is not None else out


def _decoder_stack(m: nn.TransformerDecoder, tgt: Any, memory: Any, tgt_mask: Any = None, memory_mask: Any = None,
                   tgt_key_padding_mask: Any = None, memory_key_padding_mask: Any = None, tgt_is_causal: Any = None,
                   memory_is_causal: bool = False) -> Any:
    """``nn.TransformerDecoder.forward`` in traceable form (see :func:`_encoder_stack`)."""
    out = tgt
    for layer in m.layers:
        out = layer(out, memory, tgt_mask=tgt_mask, memory_mask=memory_mask, tgt_key_padding_mask=tgt_key_padding_mask,
                    memory_key_padding_mask=memory_key_padding_mask, tgt_is_causal=tgt_is_causal is True,
                    memory_is_causal=memory_is_causal)
    return m.norm(out) if m.norm is not None else out


def _transformer(m: nn.Transformer, src: Any, tgt: Any, src_mask: Any = None, tgt_mask: Any = None,
                 memory_mask: Any = None, src_key_padding_mask: Any = None, tgt_key_padding_mask: Any = None,
                 memory_key_padding_mask: Any = None, src_is_causal: Any = None, tgt_is_causal: Any = None,
                 memory_is_causal: bool = False) -> Any:
    """``nn.Transformer.forward`` without its input checks (they branch on ``src.dim()``)."""
    memory = m.encoder(src, mask=src_mask, src_key_padding_mask=src_key_padding_mask, is_causal=src_is_causal)
    return m.decoder(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask, tgt_key_padding_mask=tgt_key_padding_mask,
                     memory_key_padding_mask=memory_key_padding_mask, tgt_is_causal=tgt_is_causal,
                     memory_is_causal=memory_is_causal)


def stand_in_attrs(model: nn.Module, c: Coupling) -> None:
    """Attributes of modules traced through a stand-in that their own forward checks.

    ``nn.Transformer.forward`` requires ``src`` and ``tgt`` to have ``d_model`` features; with an
    elastic width that is the group of its first encoder layer's attention input.
    """
    for path, m in model.named_modules():
        if isinstance(m, nn.Transformer):
            first = f"{path}." if path else ""
            slot = c.tensor_slot.get((f"{first}encoder.layers.0.self_attn.in_proj_weight", 1))
            if slot is not None:
                c.attrs.append((path, "d_model", slot, "int", 1, 1))


#: modules whose forward branches on input properties that do not change shapes, traced through a stand-in
_TRACE_AS: dict[type, Callable[..., Any]] = {nn.TransformerEncoder: _encoder_stack,
                                              nn.TransformerDecoder: _decoder_stack, nn.Transformer: _transformer}


class Tracer(fx.Tracer):
    """``torch.fx`` tracer that keeps rule-handled modules whole and makes an untraceable submodule a leaf.

    Attributes:
        forced_leaves: path -> reason, for each submodule whose forward could not be traced.
        calls: ``(path, inputs, output)`` of each non-leaf module call, as proxies (for the stages).
        call_count: path -> how many times the module was called.
    """

    def __init__(self, is_rule_leaf: Callable[[nn.Module], bool]) -> None:
        super().__init__()
        self._is_rule_leaf = is_rule_leaf
        self.forced_leaves: dict[str, str] = {}
        self.calls: list[tuple[str, list[Any], Any]] = []
        self.call_count: dict[str, int] = {}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.forced_leaves or self._is_rule_leaf(m)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        path = self.path_of_module(m)
        self.call_count[path] = self.call_count.get(path, 0) + 1
        if self.is_leaf_module(m, path):
            return super().call_module(m, forward, args, kwargs)
        saved = OrderedDict(self.module_stack)
        stand_in = _TRACE_AS.get(type(m))
        if stand_in is not None:
            forward = lambda *a, **kw: stand_in(m, *a, **kw)  # noqa: E731
        try:
            out = super().call_module(m, forward, args, kwargs)
        except Exception as e:  # noqa: BLE001 - any failure makes the module a leaf, with the reason kept
            self.module_stack.clear()
            self.module_stack.update(saved)
            self.forced_leaves[path] = f"untraceable ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
            return super().call_module(m, forward, args, kwargs)
        self.calls.append((path, [*args, *kwargs.values()], out))
        return out


def _concrete_args(model: nn.Module, n_given: int) -> dict[str, Any] | None:
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    extra = {}
    for p in params[n_given:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is inspect.Parameter.empty:
            return None
        extra[p.name] = p.default
    return extra or None


def _is_wrapped_function(n: fx.Node) -> bool:
    """A call of a function from outside PyTorch kept whole in the graph (``torch.fx.wrap``, e.g.
    torchvision's ``shifted_window_attention``)."""
    if n.op != "call_function":
        return False
    mod = getattr(n.target, "__module__", None) or ""
    return not (mod.split(".")[0] in ("torch", "_operator", "operator", "builtins", "math", "_tensor")
                or isinstance(n.target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)))


class _ShapePropCountingLeaves(ShapeProp):
    """ShapeProp that also measures the MACs of the untraceable leaves (``node.meta["leaf_macs"]``).

    A leaf the tracer could not enter stays whole (and so does a wrapped function, see
    :func:`_is_wrapped_function`), but its multiply-accumulates still belong to the model's
    count: each one runs once under ``FlopCounterMode`` (FLOPs / 2, for the whole example
    batch; :func:`elasticize.graph.macs.measure_macs`).
    """

    def __init__(self, gm: fx.GraphModule, leaves: set[str]) -> None:
        super().__init__(gm)
        self.leaves = leaves

    def run_node(self, n: fx.Node) -> Any:
        if not ((n.op == "call_module" and n.target in self.leaves) or _is_wrapped_function(n)):
            return super().run_node(n)
        run = super().run_node
        out, n.meta["leaf_macs"] = measure_macs(lambda: run(n))
        return out


def _trace_fx(model: nn.Module, inputs: tuple, find_rule: Callable) -> tuple[Tracer, fx.GraphModule]:
    tracer = Tracer(lambda m: find_rule(m) is not None)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    # nn.TransformerEncoder(Layer) branch on their input's properties to pick the fused inference kernel;
    # with that fast path off they run (and trace as) their plain Python forward
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        graph = tracer.trace(model, concrete_args=_concrete_args(model, len(inputs)))
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    gm = fx.GraphModule(model, graph)
    gm.graph.eliminate_dead_code()
    _ShapePropCountingLeaves(gm, set(tracer.forced_leaves)).propagate(*inputs)
    return tracer, gm


def _trace_export(model: nn.Module, inputs: tuple) -> tuple[fx.Graph, dict[str, str]]:
    ep = torch.export.export(model, inputs, strict=False)
    sig = ep.graph_signature
    param_of = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    return ep.graph_module.graph, dict(param_of)


@dataclass
class Trace:
    """A traced model.

    Attributes:
        how: ``"fx"`` or ``"export"``.
        graph: the graph; every node's ``meta`` holds its shapes (``tensor_meta`` or ``val``).
        param_of: for ``torch.export``, placeholder name -> fqn of the parameter or buffer it is.
        tracer: the ``torch.fx`` tracer (module calls, forced leaves), or None after ``torch.export``.
        fx_error: why ``torch.fx`` failed, when ``torch.export`` was used.
    """

    how: str
    graph: fx.Graph
    param_of: dict[str, str]
    tracer: Tracer | None
    fx_error: str | None


def trace(model: nn.Module, example_inputs: tuple, find_rule: Callable[[nn.Module], Any]) -> Trace:
    """Trace ``model`` with ``torch.fx`` (modules ``find_rule`` matches are leaves), else with ``torch.export``.

    Args:
        model: the model, in eval mode; it is not changed.
        example_inputs: positional inputs, e.g. ``(x,)`` with ``x`` of shape ``(batch, 3, H, W)``.
        find_rule: maps a module to the rule that handles it as a leaf, or None.

    Raises:
        ValueError: if neither ``torch.fx`` nor ``torch.export`` can trace the model; the
            message holds both errors.
    """
    fx_error = None
    tracer = None
    with torch.no_grad():
        try:
            tracer, gm = _trace_fx(model, example_inputs, find_rule)
            graph, param_of, how = gm.graph, {}, "fx"
        except Exception as e:  # noqa: BLE001
            fx_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            try:
                graph, param_of = _trace_export(model, example_inputs)
                how = "export"
            except Exception as e2:  # noqa: BLE001
                raise ValueError(
                    f"cannot trace {type(model).__name__}: torch.fx failed ({fx_error}) and torch.export failed "
                    f"({type(e2).__name__}: {str(e2).splitlines()[0] if str(e2) else ''}). Make the forward traceable, "
                    "or register a rule for the module that fails (see README, 'Your own rule')."
                ) from e2
    return Trace(how, graph, param_of, tracer, fx_error)
