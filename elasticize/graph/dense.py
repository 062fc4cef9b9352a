"""Dense stages: depth where blocks concatenate instead of add.

In a dense block (DenseNet, Huang et al., CVPR 2017) layer *k*'s output is one segment of every
later layer's input and of the block's output. Two shapes are found:

* **dense layers**: children of one ``nn.ModuleDict`` / ``nn.ModuleList`` (torchvision's
  ``_DenseBlock``), each called once, whose output is used only by concatenations along the
  channel axis (axis 1). A skipped layer returns its first input cut to 0 channels, so every
  concatenation that read it loses that segment; extraction deletes the layer from its container.
* **concatenation chains**: a block whose output is ``cat([x, f(x)], 1)`` of its own input ``x``
  (``y = cat([x, f(x)])``); a skipped block returns ``x`` (its ``f(x)`` segment disappears from every
  consumer downstream); extraction puts ``nn.Identity`` in its place.

Consecutive such blocks of one parent are a stage with prefix depth (SortedNet, arXiv 2309.00255:
the first ``d`` layers of each block). The segments a block's skip removes are its *outputs*; the
analysis turns their slots into group names and keeps the stage only when each of those groups is
elastic and read outside the block only as a segment of a concatenation
(:func:`elasticize.graph.analysis._dense_outputs`).
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx
from torch import nn

from .ops import canonical
from .propagator import Propagator
from .results import StageInfo
from .tracing import Tracer

__all__ = ["find_dense_stages"]


def _cat_dim(node: Any) -> int | None:
    """The axis a ``cat`` node joins along (non-negative), or None for any other node."""
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method") or canonical(node) != "cat":
        return None
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    n = len(node.meta["tensor_meta"].shape) if hasattr(node.meta.get("tensor_meta"), "shape") else 0
    return dim % n if isinstance(dim, int) and n else None


def _tensor_args(args: Any) -> list[fx.Node]:
    """The fx nodes among a call's inputs, lists flattened, in order."""
    out: list[fx.Node] = []
    for a in args:
        if isinstance(a, fx.Proxy):
            out.append(a.node)
        elif isinstance(a, (list, tuple)):
            out.extend(_tensor_args(a))
    return out


def find_dense_stages(root: nn.Module, tracer: Tracer, prop: Propagator) -> list[tuple[StageInfo, list[fx.Node]]]:
    """The dense stages among the modules ``tracer`` saw called, each with the node per block whose axis-1
    channels the block's skip removes (the dense layer's output, or the chain block's ``f(x)``)."""
    found: dict[str, tuple[str, fx.Node, fx.Node | None]] = {}  # path -> (kind, removed node, block output)
    for path, args, out in tracer.calls:
        if not path or tracer.call_count.get(path, 0) != 1 or not isinstance(out, fx.Proxy):
            continue
        ins, y = _tensor_args(args), out.node
        shp = prop.shape(y)
        if not ins or len(shp) < 2 or any(prop.shape(x)[:1] + prop.shape(x)[2:] != shp[:1] + shp[2:] for x in ins[:1]):
            continue
        if _cat_dim(y) == 1 and len(y.args[0]) == 2 and ins[0] in y.args[0] and len(ins) == 1:
            z = next(a for a in y.args[0] if a is not ins[0])
            if isinstance(z, fx.Node) and all(_cat_dim(u) == 1 for u in z.users):
                found[path] = ("chain", z, y)
        elif y.users and all(_cat_dim(u) == 1 for u in y.users):
            found[path] = ("layer", y, None)
    by_parent: dict[str, list[tuple[int, str]]] = {}
    for p in found:
        parent, _, name = p.rpartition(".")
        children = list(root.get_submodule(parent)._modules)
        if name in children and not any(p.startswith(q + ".") for q in found):
            by_parent.setdefault(parent, []).append((children.index(name), p))
    stages: list[tuple[StageInfo, list[fx.Node]]] = []
    for parent, kids in by_parent.items():
        container = root.get_submodule(parent)
        runs: list[list[str]] = []
        prev: tuple[int, str] | None = None
        for i, p in sorted(kids):
            kind = found[p][0]
            chained = prev is not None and prev[0] == i - 1 and found[prev[1]][0] == kind and (
                kind == "layer" or _tensor_args([a for q, a, _ in tracer.calls if q == p][0])[0] is found[prev[1]][2])
            if chained:
                runs[-1].append(p)
            else:
                runs.append([p])
            prev = (i, p)
        for run in runs:
            kind = found[run[0]][0]
            if len(run) < 2 or (kind == "layer" and not isinstance(container, (nn.ModuleDict, nn.ModuleList))):
                continue
            first, last = run[0].rpartition(".")[2], run[-1].rpartition(".")[2]
            name = parent if len(run) == len(container._modules) else f"{parent}[{first}:{last}]"
            st = StageInfo(name or "<root>", run, 0, drop="remove" if kind == "layer" else "identity",
                           skip_empty=kind == "layer")
            stages.append((st, [found[b][1] for b in run]))
    return stages
