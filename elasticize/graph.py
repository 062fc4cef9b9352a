"""Graph analysis: coupling groups, residual blocks, attention heads and MAC terms.

The model is traced with ``torch.fx`` (a submodule whose ``forward`` cannot be traced
becomes a leaf, and the reason is recorded, as NVIDIA ModelOpt's tracer does); when
the top-level ``forward`` itself cannot be traced, ``torch.export`` (non-strict) is
used instead, and parameters are found through its graph signature. Shapes come
from running the graph once on the example inputs. PyTorch's ``nn.TransformerEncoder``,
``nn.TransformerDecoder`` and ``nn.Transformer`` branch on their inputs' properties; they are
traced through equivalent loops over their layers (``_TRACE_AS``).

Every axis of every tensor is a *slot*; an op that makes two axes share one channel
index space joins their slots (union-find). A parameter axis joined to a convolution
or linear output axis, across residual adds, concatenations, depthwise convolutions,
norms and reshapes, ends in one **coupling group**: a single width decision slices
every member (the dependency-graph idea of Torch-Pruning, Fang et al., CVPR 2023).
A group that touches a model input or output, a hard-coded reshape size, or an op
elasticize does not know is *fixed*, and the reason is kept for the report.
"""

from __future__ import annotations

import inspect
import math
import operator
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

__all__ = ["Analysis", "GroupInfo", "StageInfo", "MacTerm", "SiteContext", "analyze", "model_tensors"]

Value = Any  # tuple[int, ...] for a tensor, list of Values for a sequence, None otherwise


# --------------------------------------------------------------------------- results
#: group name suffix per group kind: ``<module>:out`` (width), ``:heads``, ``:modules`` (parallel modules)
_GROUP_SUFFIX = {"width": "out", "heads": "heads", "modules": "modules"}


@dataclass
class GroupInfo:
    """A coupling group: every tensor axis that shares one channel (or head) index space.

    Attributes:
        name: stable name, ``<module path of the first producer>:out`` or ``:heads``.
        kind: ``"width"``, ``"heads"`` or ``"modules"`` (parallel modules of a TAC block).
        size: full size in channels.
        unit: granularity in channels (``head_dim`` for heads, channels per group for GroupNorm).
        members: ``(tensor fqn, axis, chunks)`` for every tensor axis in the group.
    """

    name: str
    kind: str
    size: int
    unit: int
    members: list[tuple[str, int, int]]


@dataclass
class StageInfo:
    """Consecutive residual blocks whose depth is elastic, or the stacked layers inside one module.

    Attributes:
        name: the container's path, with ``[i:j]`` when it holds several stages; for layers
            inside one module (an ``nn.LSTM``'s ``num_layers``), that module's path.
        blocks: module paths of the blocks, in order; for layers inside a module,
            ``<module>:l<k>`` (names, not modules).
        n_mandatory: leading blocks that are not residual (``y = x + f(x)``) and always run.
        module: for layers inside one module (see :meth:`SiteContext.layers`), its path; else None.
        attr: the module's attribute that follows the active depth (``"num_layers"``), or None.
        tensors: per block, the fqns of the module's tensors that belong to that layer.
        drop: how an extracted sub-network drops a block: ``"identity"`` (``nn.Identity`` in its
            place) or ``"remove"`` (deleted from its ``nn.ModuleList``; for blocks called with more
            than one input, such as ``nn.TransformerEncoderLayer(src, src_mask=...)``).
    """

    name: str
    blocks: list[str]
    n_mandatory: int
    module: str | None = None
    attr: str | None = None
    tensors: list[list[str]] = field(default_factory=list)
    drop: str = "identity"


@dataclass
class MacTerm:
    """Multiply-accumulates of one op per sample at the full size.

    The op's MACs at a sub-network are ``macs * prod(active/size)`` over ``factors``
    (slots, resolved to group names by the plan), or 0 when ``owner``'s block is skipped.
    """

    owner: str
    macs: int
    factors: list[Any]


@dataclass
class Analysis:
    """What the analysis found. Built by :func:`analyze`; turned into a plan by ``elasticize.plan``."""

    tracer: str
    groups: list[GroupInfo]
    tensors: dict[str, dict[str, Any]]
    attrs: dict[str, dict[str, tuple[str, str, int, int]]]
    sites: dict[str, str]
    stages: list[StageInfo]
    mac_terms: list[MacTerm]
    not_elastic: list[tuple[str, str]]
    batch: int


# --------------------------------------------------------------------------- coupling
class Coupling:
    """Union-find over axis slots, with the facts each slot carries."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.fixed: dict[int, str] = {}
        self.unit: dict[int, int] = {}
        self.kind: dict[int, str] = {}
        self.producer: set[int] = set()
        self.tensor_slot: dict[tuple[str, int], int] = {}
        self.chunks: dict[tuple[str, int], int] = {}
        self.attrs: list[tuple[str, str, int, str, int, int]] = []
        self.derived: dict[int, tuple[int, int]] = {}  # slot -> (base slot, chunks): ``chunks`` copies of base
        self.per_unit: dict[tuple[str, int], tuple[int, int]] = {}  # (fqn, axis) -> (slot, channels per entry)

    def new(self, size: int, fixed: str | None = None) -> int:
        s = len(self.parent)
        self.parent.append(s)
        self.size.append(int(size))
        if fixed:
            self.fixed[s] = fixed
        return s

    def find(self, s: int) -> int:
        p = self.parent
        while p[s] != s:
            p[s] = p[p[s]]
            s = p[s]
        return s

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if self.size[ra] != self.size[rb]:
            reason = f"axes of sizes {self.size[ra]} and {self.size[rb]} are joined"
            self.fix(ra, reason)
            self.fix(rb, reason)
        self.parent[rb] = ra
        for d in (self.fixed, self.unit, self.kind):
            if rb in d:
                if d is self.unit and ra in d:
                    d[ra] = math.lcm(d[ra], d.pop(rb))
                else:
                    d.setdefault(ra, d.pop(rb))
        if rb in self.producer:
            self.producer.add(ra)
        return ra

    def fix(self, s: int, reason: str) -> None:
        self.fixed.setdefault(self.find(s), reason)

    def repeated(self, base: int, chunks: int) -> int:
        """A slot of ``chunks * size(base)`` channels laid out as ``chunks`` copies of ``base``'s index space.

        A bidirectional RNN's output (forward and backward hidden states side by side) is
        ``repeated(hidden, 2)``: a consumer's tensor axis joined to it becomes a member of
        ``base``'s group with ``chunks`` chunks, sliced alike in each.
        """
        s = self.new(self.size[self.find(base)] * chunks)
        self.derived[s] = (base, chunks)
        return s

    def resolver(self) -> Callable[[int], tuple[int, int]]:
        """Once the analysis is done: slot -> (group root, chunks), looking through repeated slots.

        Merges repeated slots that were joined (their bases join too) and passes a repeated
        slot's fixed reason and producer mark on to its base.
        """
        first: dict[int, tuple[int, int]] = {}
        for s, (b, k) in self.derived.items():
            r = self.find(s)
            if r not in first:
                first[r] = (b, k)
            elif first[r][1] == k:
                self.union(first[r][0], b)
            else:
                reason = f"axis repeats hidden sizes {first[r][1]} and {k} times"
                self.fix(first[r][0], reason)
                self.fix(b, reason)
        roots = {self.find(s): b_k for s, b_k in self.derived.items()}

        def resolve(s: int) -> tuple[int, int]:
            r, k = self.find(s), 1
            for _ in range(16):
                d = roots.get(r)
                if d is None:
                    break
                r, k = self.find(d[0]), k * d[1]
            return r, k

        producers = {self.find(p) for p in self.producer}
        for r in roots:
            base = resolve(r)[0]
            if r in self.fixed:
                self.fixed.setdefault(base, self.fixed[r])
            if r in producers:
                self.producer.add(base)
        return resolve

    def reason(self, s: int) -> str | None:
        return self.fixed.get(self.find(s))


# --------------------------------------------------------------------------- context for rules
class SiteContext:
    """What a rule sees while the analysis visits one module (a leaf of the trace).

    Slots are integers; a tensor value is a tuple with one slot per axis. A rule joins
    the slots of its inputs with the slots of its tensors and returns its output value.
    """

    def __init__(self, prop: "_Propagator", path: str, module: nn.Module, node: fx.Node) -> None:
        self._p = prop
        self.path = path
        self.module = module
        self.node = node
        self.c = prop.c

    # shapes -------------------------------------------------------------
    @property
    def out_shape(self) -> tuple[int, ...]:
        """Shape of the module's output on the example inputs."""
        return self._p.shape(self.node)

    def in_shape(self, i: int = 0) -> tuple[int, ...]:
        """Shape of the module's ``i``-th positional input on the example inputs."""
        return self._p.shape(self.node.args[i])

    # slots --------------------------------------------------------------
    def tensor(self, name: str) -> tuple[int, ...] | None:
        """Slots of the module's own parameter or buffer ``name`` (a dotted path below it), or None."""
        return self._p.tensor_slots(f"{self.path}.{name}" if self.path else name)

    def couple(self, a: int, b: int) -> int:
        """Put two slots in one coupling group."""
        return self.c.union(a, b)

    def new(self, size: int, fixed: str | None = None) -> int:
        """A fresh slot of ``size``; ``fixed`` gives the reason it may never be sliced."""
        return self.c.new(size, fixed)

    def fix(self, value: Value, reason: str) -> None:
        """Mark every slot of ``value`` as never sliced, with the reason."""
        self._p.fix_value(value, reason)

    def refuse(self, reason: str, *inputs: Value) -> Value:
        """Keep the module whole: fix its inputs, list it as not elastic with ``reason``, return fixed outputs."""
        for v in inputs:
            self.fix(v, reason)
        self._p.not_elastic.append((self.path, reason))
        return self._p.fresh(self.node, reason)

    def producer(self, slot: int, *, unit: int = 1, kind: str = "width") -> None:
        """Mark a slot as an elastic dimension's source (a layer's output channels or its heads)."""
        self.c.producer.add(slot)
        if unit > 1:
            self.c.unit[slot] = math.lcm(self.c.unit.get(slot, 1), unit)
        if kind != "width":
            self.c.kind[slot] = kind

    def attr(self, name: str, slot: int, *, kind: str = "int", mul: int = 1, div: int = 1,
             module: str | None = None) -> None:
        """Declare that attribute ``name`` of the module (or of ``module``, a path below it) follows a slot.

        ``kind="int"`` gives ``active * mul // div``; ``kind="shape"`` gives ``(active * mul // div,)``.
        """
        path = self.path if module is None else (f"{self.path}.{module}" if self.path else module)
        self.c.attrs.append((path, name, slot, kind, mul, div))

    def chunked(self, name: str, axis: int, chunks: int) -> None:
        """Declare that axis ``axis`` of tensor ``name`` is ``chunks`` equal parts sliced alike (fused q/k/v).

        Call it before :meth:`tensor` first reads ``name``: the axis's slot then has
        ``size // chunks`` channels.
        """
        fqn = f"{self.path}.{name}" if self.path else name
        self.c.chunks[(fqn, axis)] = chunks

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
        if n * unit != self.c.size[slot]:
            raise ValueError(f"{fqn} axis {axis} has {n} entries, not {self.c.size[slot]} / {unit}")
        self.c.per_unit[(fqn, axis)] = (slot, unit)

    def repeated(self, slot: int, chunks: int) -> int:
        """A fresh activation slot made of ``chunks`` side-by-side copies of ``slot``'s channels.

        For outputs such as a bidirectional RNN's ``(..., 2 * hidden)``: whatever joins the
        returned slot (the next layer's input columns) is sliced as ``chunks`` chunks of
        ``slot``'s group.
        """
        return self.c.repeated(slot, chunks)

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
        return self._p.linear_like(x, w, b, self.out_shape, self.path)

    def conv(self, x: Value, groups: int, weight: str = "weight", bias: str | None = "bias") -> Value:
        """Convolution over axis 1 (``W``: (out, in/groups, *kernel))."""
        w = self.tensor(weight)
        b = self.tensor(bias) if bias else None
        return self._p.conv_like(x, w, b, groups, self.out_shape, self.path, module=self.path)

    def norm(self, x: Value, axis: int, names: Sequence[str]) -> Value:
        """A norm whose tensors ``names`` are per-channel along ``axis`` of ``x``; output slots = input slots."""
        ax = axis % len(x)
        for n in names:
            t = self.tensor(n)
            if t is not None:
                self.couple(x[ax], t[0])
        return x


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of ``model`` by name: its ``state_dict(keep_vars=True)`` plus its non-persistent
    buffers (timm BEiT's ``k_bias``: outside the state dict and the file, but sliced like the rest)."""
    state = dict(model.state_dict(keep_vars=True))
    for name, b in model.named_buffers():
        state.setdefault(name, b)
    return state


# --------------------------------------------------------------------------- op tables
_ELEMENTWISE = {
    "add", "iadd", "sub", "isub", "rsub", "mul", "imul", "div", "truediv", "itruediv", "floordiv", "pow",
    "maximum", "minimum", "where", "clamp", "clamp_min", "clamp_max", "clip", "lerp", "addcmul", "addcdiv",
    "eq", "ne", "lt", "le", "gt", "ge", "neg", "abs", "exp", "log", "sqrt", "rsqrt", "reciprocal",
    "sin", "cos", "erf", "sign", "square", "nan_to_num", "masked_fill",
    "relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "hardtanh",
    "leaky_relu", "elu", "selu", "celu", "softplus", "mish", "softmax", "log_softmax",
    "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
    "contiguous", "clone", "float", "half", "bfloat16", "double", "to", "type", "type_as", "detach",
    "requires_grad_", "cpu", "cuda", "identity", "native_dropout", "_to_copy", "alias", "lift_fresh_copy",
    "stochastic_depth",  # torchvision.ops (fx-wrapped): scales whole samples, every axis kept
}
#: ops a residual chain may pass through and still count as ``y = x + f(x)``
_CHAIN = {"relu", "relu6", "gelu", "silu", "hardswish", "contiguous", "clone", "dropout", "identity", "to", "float"}
_RESHAPE = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as", "_unsafe_view"}
#: attribute names that hold a width; a reshape to a literal equal to one of them follows it (``_width_attr``)
_WIDTH_ATTRS = ("hidden_dim", "embed_dim", "d_model", "hidden_size", "num_features", "embed_dims", "dim", "width")
#: reshapes that keep the element order, allowed inside a residual chain (see :func:`_is_residual`)
_RESHAPE_CHAIN = _RESHAPE - {"view_as", "reshape_as"}
#: Python arithmetic on sizes read off axes (see ``_Propagator.size_arithmetic``)
_SIZE_ARITHMETIC = {"floordiv", "truediv", "mul", "add", "sub", "mod", "pow", "neg", "ceil", "floor", "sym_float"}
_REDUCE = {"mean", "sum", "amax", "amin", "std", "var", "norm", "logsumexp", "prod", "max", "min"}
_POOL = {
    "avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
    "adaptive_max_pool2d", "adaptive_max_pool3d", "lp_pool2d", "interpolate", "upsample", "pad",
    "max_pool2d_with_indices", "_adaptive_avg_pool2d", "upsample_nearest2d", "upsample_bilinear2d", "constant_pad_nd",
}
_NON_TENSOR = {"size", "dim", "numel", "getattr", "_assert", "sym_size", "_assert_async"}


def canonical(node: fx.Node) -> str:
    """The op name a handler is keyed on: ``operator.add``, ``torch.add``, ``Tensor.add_`` and ``aten.add.Tensor`` all give ``add``."""
    t = node.target
    if node.op == "call_method":
        name = str(t)
    elif isinstance(t, torch._ops.OpOverload):
        name = t._schema.name.split("::")[-1]
    elif isinstance(t, torch._ops.OpOverloadPacket):
        name = t._qualified_op_name.split("::")[-1]
    else:
        name = getattr(t, "__name__", str(t))
    if name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
    if name.endswith("_") and not name.startswith("_") and name not in ("requires_grad_",):
        name = name[:-1]
    return {"matmul_": "matmul", "cat": "cat", "concat": "cat", "concatenate": "cat", "swapaxes": "transpose",
            "sym_size": "size", "gelu_": "gelu"}.get(name, name)


# --------------------------------------------------------------------------- tracer
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


def _stand_in_attrs(model: nn.Module, c: Coupling) -> None:
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


class _Tracer(fx.Tracer):
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


# --------------------------------------------------------------------------- propagation
def _as_tuple(x: Any) -> tuple:
    if isinstance(x, (list, tuple)):
        if len(x) == 1 and isinstance(x[0], (list, tuple)):
            return tuple(x[0])
        return tuple(x)
    return (x,)


class _Propagator:
    def __init__(self, root: nn.Module, graph: fx.Graph, find_rule: Callable, param_of: dict[str, str]) -> None:
        self.root = root
        self.graph = graph
        self.find_rule = find_rule
        self.param_of = param_of  # placeholder name -> fqn (export path)
        self.c = Coupling()
        self.env: dict[fx.Node, Value] = {}
        self.state = model_tensors(root)
        self.persistent = set(root.state_dict(keep_vars=True))
        self.mac_terms: list[MacTerm] = []
        self.sites: dict[str, str] = {}
        self.not_elastic: list[tuple[str, str]] = []
        self.layer_stages: list[StageInfo] = []
        self.bound_attrs: dict[tuple[str, str], int] = {}  # (module, attribute) -> slot, see _width_attr
        self.size_expr: dict[fx.Node, set[int]] = {}  # a size computed from axes -> their slots, see size_arithmetic
        self.batch = 1

    # helpers ------------------------------------------------------------
    def shape(self, node: Any) -> tuple[int, ...]:
        if not isinstance(node, fx.Node):
            return ()
        tm = node.meta.get("tensor_meta")
        if tm is not None and hasattr(tm, "shape"):
            return tuple(int(s) for s in tm.shape)
        v = node.meta.get("val")
        if isinstance(v, torch.Tensor):
            return tuple(int(s) for s in v.shape)
        return ()

    def is_tensor(self, node: Any) -> bool:
        if not isinstance(node, fx.Node):
            return False
        tm = node.meta.get("tensor_meta")
        if tm is not None:
            return hasattr(tm, "shape")
        return isinstance(node.meta.get("val"), torch.Tensor)

    def tensor_slots(self, fqn: str) -> tuple[int, ...] | None:
        t = self.state.get(fqn)
        if t is None:
            return None
        out = []
        for ax, n in enumerate(t.shape):
            key = (fqn, ax)
            s = self.c.tensor_slot.get(key)
            if s is None:
                s = self.c.tensor_slot[key] = self.c.new(n // self.c.chunks.get(key, 1))
            out.append(s)
        return tuple(out)

    def val(self, a: Any) -> Value:
        if isinstance(a, fx.Node):
            return self.env.get(a)
        if isinstance(a, (list, tuple)):
            return [self.val(x) for x in a]
        return None

    def fix_value(self, v: Value, reason: str) -> None:
        if v is None:
            return
        if isinstance(v, tuple):
            for s in v:
                self.c.fix(s, reason)
        elif isinstance(v, list):
            for x in v:
                self.fix_value(x, reason)

    def fresh(self, node: fx.Node, reason: str | None) -> Value:
        meta = node.meta.get("tensor_meta", node.meta.get("val"))
        return self._fresh_from(meta, reason)

    def _fresh_from(self, meta: Any, reason: str | None) -> Value:
        if meta is None:
            return None
        if hasattr(meta, "shape"):
            return tuple(self.c.new(int(n), reason) for n in meta.shape)
        if isinstance(meta, (list, tuple)):
            return [self._fresh_from(m, reason) for m in meta]
        return None

    def unsupported(self, node: fx.Node, what: str) -> Value:
        reason = f"{what} at {node.name}"
        for a in node.all_input_nodes:
            self.fix_value(self.env.get(a), reason)
        return self.fresh(node, reason)

    def add_macs(self, owner: str, macs: int, factors: Sequence[int]) -> None:
        self.mac_terms.append(MacTerm(owner, int(macs), list(factors)))

    # layer patterns -----------------------------------------------------
    def linear_like(self, x: Value, w: tuple | None, b: tuple | None, out_shape: tuple, owner: str) -> Value:
        if not isinstance(x, tuple) or w is None:
            return None
        self.c.union(x[-1], w[1])
        out = x[:-1] + (w[0],)
        if b is not None:
            self.c.union(w[0], b[0])
        self.c.producer.add(w[0])
        positions = math.prod(out_shape[:-1]) if out_shape else 1
        size = self.c.size
        # the leading axes may be elastic too (a token-mixing Linear over (B, C, N), ResMLP / gMLP)
        self.add_macs(owner, positions * size[w[0]] * size[w[1]], [w[0], w[1], *x[:-1]])
        return out

    def conv_like(self, x: Value, w: tuple | None, b: tuple | None, groups: int, out_shape: tuple, owner: str,
                  module: str | None = None) -> Value:
        if not isinstance(x, tuple) or w is None:
            return None
        size = self.c.size
        c_in, c_out = size[x[1]], size[w[0]]
        spatial = tuple(self.c.new(n) for n in out_shape[2:])
        if groups == 1:
            self.c.union(x[1], w[1])
            out_c = w[0]
            self.c.producer.add(w[0])
        elif groups == c_in and groups == c_out and size[w[1]] == 1:  # depthwise
            out_c = self.c.union(x[1], w[0])
            if module is not None:
                self.c.attrs.append((module, "groups", w[0], "int", 1, 1))
                self.c.attrs.append((module, "in_channels", w[0], "int", 1, 1))
        else:
            reason = f"grouped convolution (groups={groups}) in {owner}"
            self.c.fix(x[1], reason)
            self.c.fix(w[0], reason)
            self.c.producer.add(w[0])  # listed in the report as not elastic, with the reason
            out_c = w[0]
        if b is not None:
            self.c.union(w[0], b[0])
        if module is not None:
            self.c.attrs.append((module, "out_channels", w[0], "int", 1, 1))
            if groups == 1:
                self.c.attrs.append((module, "in_channels", w[1], "int", 1, 1))
        positions = math.prod(out_shape[2:]) * out_shape[0] if out_shape else 1
        kernel = math.prod(size[s] for s in w[2:])
        self.add_macs(owner, positions * size[w[0]] * size[w[1]] * kernel, [w[0], w[1]])
        return (x[0], out_c, *spatial)

    # node visitors ------------------------------------------------------
    def run(self) -> None:
        for node in self.graph.nodes:
            try:
                self.env[node] = self.visit(node)
            except Exception as e:  # noqa: BLE001 - an op we misread must not abort the analysis
                self.env[node] = self.unsupported(node, f"analysis error {type(e).__name__}: {e}")

    def visit(self, node: fx.Node) -> Value:
        op = node.op
        if op == "placeholder":
            fqn = self.param_of.get(node.name)
            if fqn is not None:
                return self.tensor_slots(fqn)
            return self.fresh(node, "model input")
        if op == "get_attr":
            slots = self.tensor_slots(str(node.target))
            return slots if slots is not None else self.fresh(node, f"constant tensor {node.target}")
        if op == "output":
            self.fix_value(self.val(node.args[0]), "model output")
            return None
        if op == "call_module":
            return self.visit_module(node)
        return self.visit_op(node)

    def visit_module(self, node: fx.Node) -> Value:
        path = str(node.target)
        module = self.root.get_submodule(path)
        rule = self.find_rule(module)
        if rule is None or path in self.forced:
            reason = self.forced.get(path) or f"no rule for {type(module).__name__}"
            self.not_elastic.append((path, reason))
            if node.meta.get("leaf_macs"):  # kept whole, but counted (and dropped with a skipped block)
                self.add_macs(path, node.meta["leaf_macs"], [])
            return self.unsupported(node, f"{reason} in {path}")
        inputs = [self.val(a) for a in node.args]
        ctx = SiteContext(self, path, module, node)
        out = rule.analyze(ctx, *inputs)
        self.sites[path] = rule.name
        return out

    def size_source(self, a: Any) -> int | None:
        """The slot whose size the non-tensor value ``a`` reads (``x.shape[i]``, ``x.size(i)``), or None."""
        if not isinstance(a, fx.Node) or self.is_tensor(a):
            return None
        name, args = canonical(a), a.args
        if name == "getitem" and isinstance(args[0], fx.Node) and isinstance(args[1], int):
            src, n = args[0], canonical(args[0])
            if not ((n == "getattr" and src.args[1] == "shape") or (n == "size" and len(src.args) == 1)):
                return None
            x, i = self.env.get(src.args[0]), args[1]
        elif name in ("size", "sym_size") and len(args) > 1 and isinstance(args[1], int):
            x, i = self.env.get(args[0]), args[1]
        else:
            return None
        return x[i] if isinstance(x, tuple) and -len(x) <= i < len(x) else None

    def size_arithmetic(self, node: fx.Node, name: str) -> None:
        """Python arithmetic on sizes read off tensor axes (``D // heads``, ``C * H * W``).

        The axes it reads are recorded (``size_expr``). The computed size may reach a reshape,
        which checks it (:meth:`_check_literal_sizes`), or more arithmetic; any other use fixes
        the axes it was read from, since nothing tells how that use would follow a smaller axis.
        """
        src: set[int] = set()
        for a in node.args:
            s = self.size_source(a)
            if s is not None:
                src.add(s)
            elif isinstance(a, fx.Node) and a in self.size_expr:
                src |= self.size_expr[a]
        if not src:
            return
        self.size_expr[node] = src
        for u in node.users:
            if canonical(u) not in _SIZE_ARITHMETIC and canonical(u) not in ("view", "reshape", "_unsafe_view"):
                for s in src:
                    self.c.fix(s, f"its size is read, computed with ({name}) at {node.name} and used by {u.name}")

    def visit_op(self, node: fx.Node) -> Value:
        name = canonical(node)
        if name in _SIZE_ARITHMETIC and not self.is_tensor(node):
            self.size_arithmetic(node, name)
            return None
        if name == "getitem":
            return self.getitem(node)
        if name in _NON_TENSOR or not (self.is_tensor(node) or isinstance(node.meta.get("tensor_meta"), (list, tuple))
                                       or isinstance(node.meta.get("val"), (list, tuple))):
            if name == "getattr" and self.is_tensor(node):
                return self.attr_op(node)
            return None
        h = getattr(self, f"op_{name}", None)
        if h is not None:
            return h(node)
        if name in _ELEMENTWISE:
            return self.elementwise(node)
        if name in _RESHAPE:
            return self.reshape(node)
        if name in _REDUCE:
            return self.reduce(node)
        if name in _POOL:
            return self.same_size(node)
        if node.meta.get("leaf_macs"):  # a wrapped function: its MACs measured, its axes fixed
            self.add_macs(self._op_owner(node), node.meta["leaf_macs"], [])
        return self.unsupported(node, f"unsupported op {name}")

    # generic handlers ---------------------------------------------------
    def broadcast(self, out_shape: Sequence[int], ins: Sequence[tuple[Value, Sequence[int]]]) -> tuple[int, ...]:
        """Slots of an output of ``out_shape`` broadcast from ``ins`` (``(value, shape)`` pairs, right-aligned):
        each output axis joins the inputs' axes of the same size; a fresh slot where none has it."""
        n = len(out_shape)
        out = []
        for i in range(n):
            slot = None
            for v, shp in ins:
                if not isinstance(v, tuple):
                    continue
                j = i - (n - len(shp))
                if j < 0 or shp[j] != out_shape[i]:
                    continue
                slot = v[j] if slot is None else self.c.union(slot, v[j])
            out.append(slot if slot is not None else self.c.new(out_shape[i]))
        return tuple(out)

    def elementwise(self, node: fx.Node) -> Value:
        ins = [(self.env.get(a), self.shape(a)) for a in node.all_input_nodes if self.is_tensor(a)]
        return self.broadcast(self.shape(node), ins)

    def same_size(self, node: fx.Node) -> Value:
        x = self.env.get(node.args[0])
        if not isinstance(x, tuple):
            return self.fresh(node, None)
        in_shape, out_shape = self.shape(node.args[0]), self.shape(node)
        if len(in_shape) != len(out_shape):
            return self.unsupported(node, f"{canonical(node)} changes rank")
        return tuple(x[i] if in_shape[i] == out_shape[i] else self.c.new(out_shape[i]) for i in range(len(out_shape)))

    def reshape(self, node: fx.Node) -> Value:
        x = self.env.get(node.args[0])
        in_shape, out_shape = self.shape(node.args[0]), self.shape(node)
        if not isinstance(x, tuple):
            return self.fresh(node, None)
        out: list[int | None] = [None] * len(out_shape)
        i = j = 0
        while i < len(in_shape) or j < len(out_shape):
            ia, oa = [], []
            pi = pj = 1
            if i < len(in_shape):
                ia.append(i); pi = in_shape[i]; i += 1
            if j < len(out_shape):
                oa.append(j); pj = out_shape[j]; j += 1
            while pi != pj:
                if pi < pj and i < len(in_shape):
                    ia.append(i); pi *= in_shape[i]; i += 1
                elif j < len(out_shape):
                    oa.append(j); pj *= out_shape[j]; j += 1
                else:
                    break
            big_in = [a for a in ia if in_shape[a] != 1]
            big_out = [a for a in oa if out_shape[a] != 1]
            if len(big_in) == 1 and len(big_out) == 1 and in_shape[big_in[0]] == out_shape[big_out[0]]:
                out[big_out[0]] = x[big_in[0]]
            elif big_in or big_out:
                reason = f"{canonical(node)} merges or splits axes at {node.name}"
                for a in big_in:
                    self.c.fix(x[a], reason)
                for a in big_out:
                    out[a] = self.c.new(out_shape[a], reason)
        result = tuple(s if s is not None else self.c.new(out_shape[k]) for k, s in enumerate(out))
        self._check_literal_sizes(node, result)
        return result

    def _width_attr(self, node: fx.Node, size: int) -> tuple[str, str] | None:
        """``(module path, attribute)`` that a literal reshape size most likely came from, or None.

        torchvision's ViT reshapes to ``self.hidden_dim``, which tracing turns into the constant 768.
        When the module whose forward ran the reshape has exactly one int attribute named like a
        width (:data:`_WIDTH_ATTRS`) equal to the literal, that attribute follows the axis's group
        instead of fixing it (and the sub-network's module reads its active size).
        """
        path = self._op_owner(node)
        try:
            module = self.root.get_submodule(path)
        except AttributeError:
            return None
        names = [n for n in _WIDTH_ATTRS if type(vars(module).get(n)) is int and vars(module)[n] == size]
        return (path, names[0]) if len(names) == 1 else None

    def _check_literal_sizes(self, node: fx.Node, out: tuple) -> None:
        name = canonical(node)
        if name not in ("view", "reshape", "_unsafe_view"):
            return
        sizes = node.args[1:] if node.op == "call_method" else node.args[1:2]
        sizes = _as_tuple(sizes)
        if len(sizes) != len(out):
            return
        for k, s in enumerate(sizes):
            if isinstance(s, int) and s != -1 and s != 1:
                bound = self._width_attr(node, s)
                if bound is None:
                    self.c.fix(out[k], f"hard-coded size {s} in {name} at {node.name}")
                elif bound in self.bound_attrs:
                    self.c.union(self.bound_attrs[bound], out[k])
                else:
                    self.bound_attrs[bound] = out[k]
                    self.c.attrs.append((*bound, out[k], "int", 1, 1))
            elif (src := self.size_source(s)) is not None:  # y.reshape(B, T, x.shape[-1]): that axis follows x's
                self.c.union(out[k], src)
            elif isinstance(s, fx.Node) and s in self.size_expr:
                # a computed size: fine where it lands on the axis it was read from (C * 1 * 1 after pooling);
                # elsewhere (D // heads as a head size) it would not follow that axis's slicing
                if any(self.c.find(a) != self.c.find(out[k]) and self.c.size[a] != 1 for a in self.size_expr[s]):
                    reason = f"a size computed from it ({s.name}) is used in {name} at {node.name}"
                    for a in self.size_expr[s]:
                        self.c.fix(a, reason)

    def reduce(self, node: fx.Node) -> Value:
        x = self.env.get(node.args[0])
        in_shape, out_shape = self.shape(node.args[0]), self.shape(node)
        if not isinstance(x, tuple):
            return self.fresh(node, None)
        dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        if dims is None:
            return tuple(self.c.new(n) for n in out_shape)
        dims = {d % len(in_shape) for d in _as_tuple(dims) if isinstance(d, int)}
        keep = [a for a in range(len(in_shape)) if a not in dims]
        if len(out_shape) == len(in_shape):
            return tuple(x[a] if a not in dims else self.c.new(1) for a in range(len(in_shape)))
        if len(out_shape) == len(keep):
            return tuple(x[a] for a in keep)
        return self.unsupported(node, f"{canonical(node)} with unexpected output")

    def op_permute(self, node: fx.Node) -> Value:
        x = self.env.get(node.args[0])
        dims = _as_tuple(node.args[1:] if node.op == "call_method" else node.args[1])
        if "dims" in node.kwargs:
            dims = tuple(node.kwargs["dims"])
        return tuple(x[d % len(x)] for d in dims)

    def op_transpose(self, node: fx.Node) -> Value:
        x = list(self.env.get(node.args[0]))
        d0, d1 = node.args[1] % len(x), node.args[2] % len(x)
        x[d0], x[d1] = x[d1], x[d0]
        return tuple(x)

    def op_t(self, node: fx.Node) -> Value:
        return tuple(reversed(self.env.get(node.args[0])))

    def op_movedim(self, node: fx.Node) -> Value:
        x = list(self.env.get(node.args[0]))
        src, dst = node.args[1] % len(x), node.args[2] % len(x)
        s = x.pop(src)
        x.insert(dst, s)
        return tuple(x)

    def attr_op(self, node: fx.Node) -> Value:
        x = self.env.get(node.args[0])
        if node.args[1] in ("T", "mT") and isinstance(x, tuple):
            return tuple(reversed(x)) if node.args[1] == "T" else x[:-2] + (x[-1], x[-2])
        if node.args[1] in ("data",):
            return x
        return self.unsupported(node, f"tensor attribute {node.args[1]}")

    def op_expand(self, node: fx.Node) -> Value:
        x = self.env.get(node.args[0])
        in_shape, out_shape = self.shape(node.args[0]), self.shape(node)
        off = len(out_shape) - len(in_shape)
        return tuple(x[i - off] if i >= off and in_shape[i - off] == out_shape[i] else self.c.new(out_shape[i])
                     for i in range(len(out_shape)))

    op_expand_as = op_broadcast_to = op_repeat = op_tile = op_expand

    def op_cat(self, node: fx.Node) -> Value:
        tensors = node.args[0]
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        out_shape = self.shape(node)
        dim %= len(out_shape)
        vals = [self.env.get(t) for t in tensors]
        if (len(vals) > 1 and all(isinstance(v, tuple) and len(v) == len(out_shape) for v in vals)
                and len({self.c.find(v[dim]) for v in vals}) == 1):
            # copies of one index space side by side (torchvision's patch merging): sliced alike in each
            return self._join([v[:dim] + v[dim + 1:] for v in vals], out_shape, dim,
                              self.c.repeated(vals[0][dim], len(vals)))
        out = []
        reason = f"concatenated along axis {dim} at {node.name}"
        for a in range(len(out_shape)):
            if a == dim:
                for v in vals:
                    if isinstance(v, tuple):
                        self.c.fix(v[a], reason)
                out.append(self.c.new(out_shape[a], reason))
                continue
            slot = None
            for v in vals:
                if isinstance(v, tuple):
                    slot = v[a] if slot is None else self.c.union(slot, v[a])
            out.append(slot if slot is not None else self.c.new(out_shape[a]))
        return tuple(out)

    def _join(self, others: list[tuple[int, ...]], out_shape: Sequence[int], dim: int, slot: int) -> Value:
        """The output of joining values along ``dim`` into ``slot``: their other axes are one slot each."""
        base = others[0]
        for v in others[1:]:
            base = tuple(self.c.union(p, q) for p, q in zip(base, v))
        return base[:dim] + (slot,) + base[dim:]

    def op__patch_merging_pad(self, node: fx.Node) -> Value:
        """torchvision Swin's fx-wrapped ``_patch_merging_pad``: ``(..., H, W, C)`` -> ``(..., H/2, W/2, 4 C)``,
        the four 2x2 neighbours' channels side by side (each a copy of the input's index space)."""
        x = self.env.get(node.args[0])
        out_shape = self.shape(node)
        if not isinstance(x, tuple) or len(x) != len(out_shape) or out_shape[-1] != 4 * self.shape(node.args[0])[-1]:
            return self.unsupported(node, "unsupported op _patch_merging_pad")
        return x[:-3] + (self.c.new(out_shape[-3]), self.c.new(out_shape[-2]), self.c.repeated(x[-1], 4))

    def op_stack(self, node: fx.Node) -> Value:
        vals = [self.env.get(t) for t in node.args[0]]
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        out_shape = self.shape(node)
        dim %= len(out_shape)
        base = None
        for v in vals:
            if isinstance(v, tuple):
                base = v if base is None else tuple(self.c.union(p, q) for p, q in zip(base, v))
        if base is None:
            return self.fresh(node, None)
        return base[:dim] + (self.c.new(out_shape[dim]),) + base[dim:]

    def _split(self, node: fx.Node, dim: int, removes_axis: bool) -> Value:
        x = self.env.get(node.args[0])
        metas = node.meta.get("tensor_meta", node.meta.get("val"))
        dim %= len(x)
        in_shape = self.shape(node.args[0])
        sizes = {tuple(m.shape)[dim] for m in metas}
        if not removes_axis and len(metas) > 1 and len(sizes) == 1 and len(metas) * sizes.pop() == in_shape[dim]:
            # equal chunks (a gated MLP's x1, x2 = fc1(x).chunk(2, -1)): the axis is that many copies of one
            # index space, sliced alike in each chunk, as the fused q/k/v rows of an attention projection are
            part = self.c.new(in_shape[dim] // len(metas))
            self.c.union(x[dim], self.c.repeated(part, len(metas)))
            return [x[:dim] + (part,) + x[dim + 1:] for _ in metas]
        out = []
        for m in metas:
            shp = tuple(m.shape)
            if removes_axis:
                out.append(x[:dim] + x[dim + 1:])
            elif shp[dim] == in_shape[dim]:
                out.append(x)
            else:
                self.c.fix(x[dim], f"split along axis {dim} at {node.name}")
                out.append(x[:dim] + (self.c.new(shp[dim], "split"),) + x[dim + 1:])
        return out

    def op_unbind(self, node: fx.Node) -> Value:
        return self._split(node, node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0), True)

    def op_chunk(self, node: fx.Node) -> Value:
        return self._split(node, node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0), False)

    def op_split(self, node: fx.Node) -> Value:
        return self._split(node, node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0), False)

    op_split_with_sizes = op_tensor_split = op_split

    def getitem(self, node: fx.Node) -> Value:
        base, idx = node.args[0], node.args[1]
        v = self.env.get(base) if isinstance(base, fx.Node) else None
        if isinstance(v, list):
            return v[idx] if isinstance(idx, int) else None
        if not isinstance(v, tuple) or not self.is_tensor(node):
            return None
        idx = idx if isinstance(idx, tuple) else (idx,)
        if any(isinstance(i, fx.Node) for i in idx):
            return self.unsupported(node, "tensor indexing")
        in_shape, out_shape = self.shape(base), self.shape(node)
        n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
        out: list[int] = []
        a = 0
        for i in idx:
            if i is Ellipsis:
                for _ in range(len(in_shape) - n_real):
                    out.append(v[a]); a += 1
            elif i is None:
                out.append(self.c.new(1))
            elif isinstance(i, int):
                a += 1
            elif isinstance(i, slice):
                k = len(out)
                if k < len(out_shape) and out_shape[k] == in_shape[a]:
                    out.append(v[a])
                else:
                    reason = f"partial slice at {node.name}"
                    self.c.fix(v[a], reason)
                    out.append(self.c.new(out_shape[k] if k < len(out_shape) else 1, reason))
                a += 1
            else:
                return self.unsupported(node, f"index {type(i).__name__}")
        out.extend(v[a:])
        if len(out) != len(out_shape):
            return self.unsupported(node, "indexing")
        return tuple(out)

    # functional layers (inside traced custom modules, and the export path) --
    def _owner(self, node: Any) -> str:
        fqn = self.param_of.get(node.name) if isinstance(node, fx.Node) and node.op == "placeholder" else None
        if fqn is None and isinstance(node, fx.Node) and node.op == "get_attr":
            fqn = str(node.target)
        return fqn.rsplit(".", 1)[0] if fqn and "." in fqn else ""

    @staticmethod
    def _call_args(node: fx.Node, names: Sequence[str]) -> list[Any]:
        """``node``'s arguments in the order of ``names``, given by position or by keyword (None if absent)."""
        return [node.args[i] if i < len(node.args) else node.kwargs.get(n) for i, n in enumerate(names)]

    def op_linear(self, node: fx.Node) -> Value:
        x_node, w_node, b_node = self._call_args(node, ("input", "weight", "bias"))
        x, w = self.env.get(x_node), self.env.get(w_node)
        b = self.env.get(b_node) if isinstance(b_node, fx.Node) else None
        return self.linear_like(x, w, b, self.shape(node), self._owner(w_node))

    def op_conv2d(self, node: fx.Node) -> Value:
        a = self._call_args(node, ("input", "weight", "bias", "stride", "padding", "dilation", "groups"))
        x, w = self.env.get(a[0]), self.env.get(a[1])
        b = self.env.get(a[2]) if isinstance(a[2], fx.Node) else None
        groups = a[6] if a[6] is not None else 1
        owner = self._owner(a[1])
        mod = owner if owner and hasattr(self.root.get_submodule(owner), "groups") else None
        return self.conv_like(x, w, b, groups, self.shape(node), owner, module=mod)

    op_conv1d = op_conv3d = op_conv2d

    def op_batch_norm(self, node: fx.Node) -> Value:
        """``F.batch_norm(x, mean, var, w, b)`` and aten's ``_native_batch_norm_legit*`` (which return a tuple)."""
        x = self.env.get(node.args[0])
        for a in node.args[1:5]:
            v = self.env.get(a) if isinstance(a, fx.Node) else None
            if isinstance(v, tuple) and isinstance(x, tuple):
                self.c.union(x[1], v[0])
        if isinstance(node.meta.get("val"), (list, tuple)):
            return [x, *[self._fresh_from(m, None) for m in node.meta["val"][1:]]]
        return x

    op__native_batch_norm_legit_no_training = op__native_batch_norm_legit = op_batch_norm
    op__native_batch_norm_legit_functional = op_native_batch_norm = op_batch_norm

    def op_layer_norm(self, node: fx.Node) -> Value:
        x = self.env.get(node.args[0])
        shape = _as_tuple(node.args[1])
        if not isinstance(x, tuple):
            return x
        if len(shape) != 1:
            reason = f"layer_norm over {len(shape)} axes at {node.name}"
            for s in x[-len(shape):]:
                self.c.fix(s, reason)
            return x
        owner = ""
        for a in node.args[2:4]:
            v = self.env.get(a) if isinstance(a, fx.Node) else None
            if isinstance(v, tuple):
                self.c.union(x[-1], v[0])
                owner = self._owner(a)
        if owner and hasattr(self.root.get_submodule(owner), "normalized_shape"):
            self.c.attrs.append((owner, "normalized_shape", x[-1], "shape", 1, 1))
        else:
            self.c.fix(x[-1], f"layer_norm with a constant normalized_shape at {node.name}")
        return x

    def op_group_norm(self, node: fx.Node) -> Value:
        x = self.env.get(node.args[0])
        groups = node.args[1]
        if isinstance(x, tuple):
            self.c.unit[self.c.find(x[1])] = math.lcm(self.c.unit.get(self.c.find(x[1]), 1), self.c.size[x[1]] // groups)
            for a in node.args[2:4]:
                v = self.env.get(a) if isinstance(a, fx.Node) else None
                if isinstance(v, tuple):
                    self.c.union(x[1], v[0])
        return x

    def _op_owner(self, node: fx.Node) -> str:
        """The module whose forward ran ``node`` (from the tracer's ``nn_module_stack``), or ``""`` at the root."""
        stack = node.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else ""
        return path if isinstance(path, str) else ""

    def _is_param(self, node: Any) -> bool:
        """Whether ``node`` is one of the model's own tensors (``get_attr``, or an export placeholder for one)."""
        return isinstance(node, fx.Node) and (node.op == "get_attr" or node.name in self.param_of)

    def _batch_axes(self, node: fx.Node, operands: Sequence[fx.Node]) -> tuple[int, ...]:
        """Slots of a matmul-like output's batch axes (all but the last two), broadcast from the operands'."""
        ins = [(v[:-2], self.shape(a)[:-2]) for a in operands if isinstance(v := self.env.get(a), tuple)]
        return self.broadcast(self.shape(node)[:-2], ins)

    def op_matmul(self, node: fx.Node) -> Value:
        """``a @ b``, ``torch.matmul``, ``mm``, ``bmm`` with both operands at least 2-D: ``(..., n, k) @ (..., k, m)``.

        The contracted axes are one coupling group; a 2-D parameter on the right (``x @ W``) produces its
        columns like a linear layer's outputs; MACs ``prod(out) * k`` scale with every elastic axis.
        """
        a, b = node.args[0], node.args[1]
        va, vb = self.env.get(a), self.env.get(b)
        if not (isinstance(va, tuple) and isinstance(vb, tuple) and len(va) >= 2 and len(vb) >= 2):
            return self.unsupported(node, f"{canonical(node)} of a 1-D or untracked operand")
        out_shape = self.shape(node)
        k = self.c.union(va[-1], vb[-2])
        if self._is_param(b) and len(vb) == 2:
            self.c.producer.add(vb[-1])  # x @ W: W's columns are output features, as in a linear layer
        out = (*self._batch_axes(node, (a, b)), va[-2], vb[-1])
        self.add_macs(self._op_owner(node), math.prod(out_shape) * self.c.size[k], [*out, k])
        return out

    op_mm = op_bmm = op_matmul

    def op_einsum(self, node: fx.Node) -> Value:
        """``torch.einsum`` of one or two operands, explicit output, no ellipsis (``"bhid,bhjd->bhij"``).

        Axes that share a letter are one coupling group (an operand's size-1 axis broadcasts and
        joins nothing); a letter of a 2-D parameter that only it and the output carry is produced
        there, like a linear layer's outputs (``"btd,df->btf"``). MACs of two operands: the
        product of every letter's size, scaled by each elastic letter (as ``FlopCounterMode``
        counts the contraction as one batched matmul).
        """
        eq, ops = node.args[0], node.args[1:]
        if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
            ops = tuple(ops[0])
        if not isinstance(eq, str) or "..." in eq or "->" not in eq or not 1 <= len(ops) <= 2:
            return self.unsupported(node, "einsum with an ellipsis, an implicit output or more than two operands")
        lhs, rhs = eq.replace(" ", "").split("->")
        subs = lhs.split(",")
        vals = [self.env.get(o) for o in ops]
        if len(subs) != len(ops) or not all(isinstance(v, tuple) and len(v) == len(sub) for v, sub in zip(vals, subs)):
            return self.unsupported(node, "einsum of an untracked operand")
        letter: dict[str, int] = {}
        for o, v, sub in zip(ops, vals, subs):
            shp = self.shape(o)
            for ch, slot, n in zip(sub, v, shp):
                if n == 1 and any(ch in other for other in subs if other is not sub):
                    continue  # broadcast
                letter[ch] = slot if ch not in letter else self.c.union(letter[ch], slot)
        out_shape = self.shape(node)
        out = tuple(letter.get(ch) if letter.get(ch) is not None else self.c.new(n) for ch, n in zip(rhs, out_shape))
        if len(ops) == 2:
            for o, v, sub, other in ((ops[0], vals[0], subs[0], subs[1]), (ops[1], vals[1], subs[1], subs[0])):
                if self._is_param(o) and len(sub) == 2:
                    for ch, slot in zip(sub, v):
                        if ch in rhs and ch not in other:
                            self.c.producer.add(slot)
            size = self.c.size
            self.add_macs(self._op_owner(node), math.prod(size[s] for s in letter.values()), list(letter.values()))
        return out

    def op_scaled_dot_product_attention(self, node: fx.Node) -> Value:
        """``F.scaled_dot_product_attention(q, k, v)``: q ``(..., L, E)``, k ``(..., S, E)``, v ``(..., S, Ev)``.

        Output ``(..., L, Ev)``; MACs ``prod(batch) * L * S * (E + Ev)`` (the two matmuls), as FlopCounterMode counts.
        """
        q, k, v = node.args[:3]
        vq, vk, vv = (self.env.get(t) for t in (q, k, v))
        if not all(isinstance(t, tuple) and len(t) >= 2 for t in (vq, vk, vv)):
            return self.unsupported(node, "scaled_dot_product_attention of an untracked operand")
        out_shape = self.shape(node)
        e = self.c.union(vq[-1], vk[-1])
        s = self.c.union(vk[-2], vv[-2])
        out = (*self._batch_axes(node, (q, k, v)), vq[-2], vv[-1])
        batch = math.prod(out_shape[:-2])
        size = self.c.size
        owner = self._op_owner(node)
        self.add_macs(owner, batch * size[vq[-2]] * size[s] * size[e], [*out[:-1], s, e])
        self.add_macs(owner, batch * size[vq[-2]] * size[s] * size[vv[-1]], [*out, s])
        return out

    def op_embedding(self, node: fx.Node) -> Value:
        idx, w = self.env.get(node.args[0]), self.env.get(node.args[1])
        if isinstance(w, fx.Node) or not isinstance(idx, tuple):
            return self.fresh(node, None)
        if w is None:  # F.embedding(input, weight) argument order
            return self.fresh(node, None)
        return idx + (w[1],)


# --------------------------------------------------------------------------- residual blocks
def _is_residual(node: Any, x_in: fx.Node, inner: set[fx.Node], depth: int = 0, added: bool = False,
                 norm: Callable[[fx.Node], bool] = lambda n: False) -> bool:
    """Whether ``node`` is ``x_in`` plus branches: a chain of adds (and activations) back to the input.

    Reshapes may sit in the chain (timm's Swin block adds its MLP branch to ``x.reshape(B, -1, C)``
    and reshapes back): reshapes keep the element order, so with the block's output shaped like its
    input (checked by the caller) the chain without its branches is the identity.

    So may the block's own LayerNorm / RMSNorm calls (``norm(node)`` true): a post-norm transformer layer,
    ``norm2(z + ff(z))`` with ``z = norm1(x + attn(x))``, is skipped whole as LayerDrop does
    (Fan et al., ICLR 2020; post-norm BERT layers are dropped so in the transformers adapter).

    The chain may not pass through the output of any other sub-module call (``inner``): a
    container of residual blocks is not itself a residual block.
    """
    if depth > 64 or not isinstance(node, fx.Node):
        return False
    if node is x_in:
        return added
    if node.args and norm(node):
        return _is_residual(node.args[0], x_in, inner, depth + 1, added, norm)
    if node in inner:
        return False
    if node.op in ("call_function", "call_method"):
        name = canonical(node)
        if name in ("add", "iadd"):
            return any(_is_residual(a, x_in, inner, depth + 1, True, norm) for a in node.args[:2])
        if (name in _CHAIN or name in _RESHAPE_CHAIN) and node.args:
            return _is_residual(node.args[0], x_in, inner, depth + 1, added, norm)
    return False


#: norms a post-norm residual chain may pass through (see :func:`_is_residual`)
_LAYER_NORMS = (nn.LayerNorm, nn.RMSNorm)


def _find_stages(root: nn.Module, tracer: _Tracer, prop: _Propagator) -> list[StageInfo]:
    calls = {}
    n_args: dict[str, int] = {}
    for path, args, out in tracer.calls:
        if not path or tracer.call_count.get(path, 0) != 1:
            continue
        x_in = next((a for a in args if isinstance(a, fx.Proxy)), None)
        if x_in is None or not isinstance(out, fx.Proxy):
            continue
        if out.node is x_in.node:  # a no-op module (Identity-like)
            continue
        calls[path] = (x_in.node, out.node)
        n_args[path] = len(args)

    def residual_block(p: str) -> bool:
        x, y = calls[p]
        if not prop.shape(x) or prop.shape(x) != prop.shape(y):
            return False
        # the chain may start at a child's output (an activation module) but not pass through one
        inner = {yy for q, (_, yy) in calls.items() if q.startswith(p + ".") and yy is not y}

        def own_norm(n: fx.Node) -> bool:  # a LayerNorm child of the block, called as a leaf
            return (n.op == "call_module" and str(n.target).rpartition(".")[0] == p
                    and isinstance(root.get_submodule(str(n.target)), _LAYER_NORMS))

        return _is_residual(y, x, inner, norm=own_norm)

    residual = {p for p in calls if residual_block(p)}

    def inside_residual(path: str) -> bool:
        parts = path.split(".")
        return any(".".join(parts[:k]) in residual for k in range(1, len(parts)))

    by_parent: dict[str, list[tuple[int, str]]] = {}
    for p in calls:
        if inside_residual(p):
            continue
        parent, _, name = p.rpartition(".")
        children = list(root.get_submodule(parent)._modules) if parent or name else []
        if name in children:
            by_parent.setdefault(parent, []).append((children.index(name), p))
    stages: list[StageInfo] = []
    for parent, kids in by_parent.items():
        kids.sort()
        segments: list[list[str]] = []
        prev_out = None
        for _, p in kids:
            x, y = calls[p]
            chained = prev_out is not None and x is prev_out
            if p in residual and chained and segments:
                segments[-1].append(p)
            else:
                segments.append([p])
            prev_out = y
        useful = [s for s in segments if any(b in residual for b in s) and len(s) >= 2]
        for seg in useful:
            n_mand = 0
            while n_mand < len(seg) and seg[n_mand] not in residual:
                n_mand += 1
            if any(b not in residual for b in seg[n_mand:]):
                continue
            first, last = seg[0].rpartition(".")[2], seg[-1].rpartition(".")[2]
            name = parent if len(useful) == 1 and len(seg) == len(kids) else f"{parent}[{first}:{last}]"
            # nn.Identity takes one input: a block called with more is deleted from its list instead
            drop = ("remove" if isinstance(root.get_submodule(parent), nn.ModuleList)
                    and any(n_args[b] > 1 for b in seg) else "identity")
            stages.append(StageInfo(name or "<root>", seg, n_mand, drop=drop))
    return stages


# --------------------------------------------------------------------------- entry point
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
    :func:`_is_wrapped_function`), but its multiply-accumulates still belong to the model's count: each one runs once under ``FlopCounterMode`` (FLOPs / 2, for the whole
    example batch), with gradients enabled and the math attention kernel so that PyTorch's fused
    inference paths (``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``) decompose into
    the matmuls the counter sees.
    """

    def __init__(self, gm: fx.GraphModule, leaves: set[str]) -> None:
        super().__init__(gm)
        self.leaves = leaves

    def run_node(self, n: fx.Node) -> Any:
        if not ((n.op == "call_module" and n.target in self.leaves) or _is_wrapped_function(n)):
            return super().run_node(n)
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.utils.flop_counter import FlopCounterMode

        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
            out = super().run_node(n)
        n.meta["leaf_macs"] = fc.get_total_flops() // 2
        return out


def _trace_fx(model: nn.Module, inputs: tuple, find_rule: Callable) -> tuple[_Tracer, fx.GraphModule]:
    tracer = _Tracer(lambda m: find_rule(m) is not None)
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


def analyze(model: nn.Module, example_inputs: tuple, find_rule: Callable[[nn.Module], Any]) -> Analysis:
    """Trace ``model`` on ``example_inputs`` and find everything that can be elastic.

    Args:
        model: the model, in eval mode; it is not changed.
        example_inputs: positional inputs, e.g. ``(x,)`` with ``x`` of shape ``(batch, 3, H, W)``.
        find_rule: maps a module to the rule that handles it as a leaf, or None.

    Returns:
        The :class:`Analysis`.

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
    prop = _Propagator(model, graph, find_rule if how == "fx" else (lambda m: None), param_of)
    prop.forced = dict(tracer.forced_leaves) if tracer else {}
    for n in graph.nodes:
        if n.op == "placeholder" and n.name not in param_of and prop.is_tensor(n):
            shp = prop.shape(n)
            if shp:
                prop.batch = shp[0]
                break
    prop.run()
    _stand_in_attrs(model, prop.c)
    stages = (_find_stages(model, tracer, prop) if tracer is not None else []) + prop.layer_stages
    not_elastic = list(prop.not_elastic)
    if how == "export":
        not_elastic.append(("<model>", f"torch.fx failed ({fx_error}); traced with torch.export, which finds no "
                                       "residual blocks or attention heads"))
    return _collect(prop, how, stages, not_elastic)


def _collect(prop: _Propagator, how: str, stages: list[StageInfo], not_elastic: list[tuple[str, str]]) -> Analysis:
    c = prop.c
    resolve = c.resolver()
    members: dict[int, list[tuple[str, int, int]]] = {}
    axis_of: dict[tuple[str, int], tuple[int, int]] = {}  # (fqn, axis) -> (group root, chunks)
    for (fqn, ax), s in c.tensor_slot.items():
        if (fqn, ax) in c.per_unit:
            continue
        r, k = resolve(s)
        axis_of[(fqn, ax)] = (r, k * c.chunks.get((fqn, ax), 1))
        members.setdefault(r, []).append((fqn, ax, axis_of[(fqn, ax)][1]))
    div_of: dict[tuple[str, int], int] = {}
    for (fqn, ax), (s, unit) in c.per_unit.items():
        r, k = resolve(s)
        axis_of[(fqn, ax)], div_of[(fqn, ax)] = (r, k), unit
        members.setdefault(r, []).append((fqn, ax, k))
    order = {fqn: i for i, fqn in enumerate(prop.state)}
    groups: list[GroupInfo] = []
    name_of: dict[int, str] = {}
    roots = sorted({resolve(s)[0] for s in c.producer}, key=lambda r: min(
        (order.get(f, 1 << 30), ax) for f, ax, _ in members.get(r, [("", 0, 1)])))
    used_names: set[str] = set()
    for r in roots:
        mem = sorted(members.get(r, []), key=lambda m: (order.get(m[0], 1 << 30), m[1]))
        kind = c.kind.get(r, "width")
        owner = next((f.rsplit(".", 1)[0] for f, ax, _ in mem if ax == 0 and f.rsplit(".", 1)[-1].startswith("weight")),
                     mem[0][0] if mem else "?")
        name = f"{owner}:{_GROUP_SUFFIX.get(kind, 'out')}"
        while name in used_names:
            name += "'"
        used_names.add(name)
        reason = c.fixed.get(r)
        if reason is None and not mem:
            reason = "no tensor to slice"
        if reason is not None:
            not_elastic.append((name, reason))
            continue
        unit = c.unit.get(r, 1)
        size = c.size[r]
        if size % unit or size // unit < 2:
            not_elastic.append((name, f"size {size} has fewer than 2 units of {unit}"))
            continue
        groups.append(GroupInfo(name, kind, size, unit, mem))
        name_of[r] = name
    tensors: dict[str, dict[str, Any]] = {}
    params = {n for n, _ in prop.root.named_parameters()}
    for fqn, t in prop.state.items():
        axes = {}
        for ax in range(t.dim()):
            r, k = axis_of.get((fqn, ax), (-1, 1))
            g = name_of.get(r)
            if g is not None:
                axes[str(ax)] = [g, k, div_of[(fqn, ax)]] if (fqn, ax) in div_of else [g, k]
        if fqn in prop.persistent:
            tensors[fqn] = {"shape": list(t.shape), "param": fqn in params, "axes": axes}
        elif axes:  # a non-persistent buffer the plan slices; not in the file
            tensors[fqn] = {"shape": list(t.shape), "param": False, "axes": axes, "persistent": False}
    attrs: dict[str, dict[str, tuple[str, str, int, int]]] = {}
    for module, attr, slot, kind, mul, div in c.attrs:
        r, k = resolve(slot)
        g = name_of.get(r)
        if g is not None:
            attrs.setdefault(module, {})[attr] = (g, kind, mul * k, div)
    for t in prop.mac_terms:
        t.factors = [name_of[r] for r in (resolve(s)[0] for s in t.factors) if r in name_of]
        t.macs = t.macs // max(prop.batch, 1)
    return Analysis(how, groups, tensors, attrs, dict(prop.sites), stages, prop.mac_terms, not_elastic, prop.batch)
