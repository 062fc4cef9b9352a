"""ONNX export of a dense sub-network: ``torch.onnx.export`` (the dynamo exporter), checked by onnxruntime.

The export is always of a *dense* sub-network (:meth:`elasticize.ElasticModel.extract`,
:func:`elasticize.load_subnet`), never of the elastic model: a program traced from the elastic
model at a preset carries every weight of the super-network (19.6 MB against the extracted
sub-network's 4.9 MB in the case issue 21 measured) and, with BatchNorm, reads the live running-statistics buffers that a
later ``set_subnet`` overwrites, so the exported program's output would depend on what the
Python model did after the export. :func:`to_onnx` refuses one.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

__all__ = ["OnnxExport", "to_onnx", "example_inputs"]


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`to_onnx` wrote.

    Attributes:
        path: the ``.onnx`` file.
        dynamic: per graph input, the axes left dynamic (by index), e.g. ``{"input_ids": [0, 1]}``.
        max_abs_diff: the largest absolute difference between onnxruntime's and eager PyTorch's
            outputs on the example input.
    """

    path: Path
    dynamic: dict[str, list[int]]
    max_abs_diff: float


def _refuse_elastic(model: nn.Module) -> None:
    """Raise when ``model`` is (or holds) an elastic model rather than a dense sub-network."""
    from ..elastic import ElasticModel
    from ..modules import is_elastic

    if isinstance(model, ElasticModel) or any(is_elastic(m) for m in model.modules()):
        raise TypeError("export a dense sub-network, not the elastic model: extract it first (dense = "
                        "em.extract('small'), or elasticize.load_subnet(FILE, 'small'); CLI: elasticize extract FILE "
                        "--preset small --format onnx -o m.onnx). The elastic model carries all of the "
                        "super-network's weights and its BatchNorm buffers change with set_subnet")


def _as_args(inputs: Any) -> tuple[tuple, dict[str, Any]]:
    """``(args, kwargs)`` of example inputs given as a tensor, a tuple/list of tensors or a mapping."""
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    raise TypeError(f"example_inputs must be a tensor, a tuple of tensors or a mapping, not {type(inputs).__name__}")


def _trace_input(x: Any) -> Any:
    """``x`` as traced: a batch of 1 is repeated to 2, so the exporter does not fix the batch axis at 1."""
    if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == 1:
        return torch.cat([x, x])
    return x


def _axes(x: Any) -> Any:
    """The axes offered to the exporter as dynamic: the batch, and for integer ids the sequence too.

    ``Dim.AUTO`` lets the exporter keep an axis static where the model fixes its size (a
    linear layer after a flatten, a fixed position table), instead of failing.
    """
    from torch.export import Dim

    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return None
    axes = {0: Dim.AUTO}
    if x.dim() == 2 and not x.dtype.is_floating_point:  # (batch, sequence) token ids or masks
        axes[1] = Dim.AUTO
    return axes


def _leaves(out: Any) -> list[torch.Tensor]:
    """The tensors of a model output, in the order the exported graph returns them."""
    import torch.utils._pytree as pytree

    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _one_line(e: BaseException) -> str:
    """The first informative line of an exporter error (its chain's innermost cause first)."""
    causes = [e]
    while causes[-1].__cause__ is not None and len(causes) < 8:
        causes.append(causes[-1].__cause__)
    for c in reversed(causes):
        for line in str(c).splitlines():
            line = line.strip()
            if line and not line.startswith(("Failed to export the model with torch.export", "#", "[")):
                return f"{type(c).__name__}: {line[:300]}"
    return type(e).__name__


def _export(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
    """``torch.onnx.export(..., dynamo=True)`` with dynamic axes; its ``ONNXProgram``.

    Raises:
        ValueError: the exporter failed (one line naming its error).
    """
    targs = tuple(_trace_input(a) for a in args)
    tkwargs = {k: _trace_input(v) for k, v in kwargs.items()}
    shapes: Any = {k: _axes(v) for k, v in tkwargs.items()} if tkwargs else tuple(_axes(a) for a in targs)
    log = logging.getLogger("torch")
    level = log.level
    try:
        log.setLevel(logging.ERROR)  # a failed attempt logs whole graphs; the error below says what failed
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's own notes; the onnxruntime check below is the judge
            return torch.onnx.export(model, targs, kwargs=tkwargs or None, dynamo=True, dynamic_shapes=shapes,
                                     verbose=False)
    except Exception as e:  # noqa: BLE001 - torch.export raises many types; each becomes one line
        raise ValueError(f"torch.onnx.export (dynamo) cannot export {type(model).__name__}: {_one_line(e)}; make the "
                         "forward traceable by torch.export (no data-dependent Python control flow), see "
                         "https://pytorch.org/docs/stable/export.html") from e
    finally:
        log.setLevel(level)


def _run_onnx(path: str, args: tuple, kwargs: dict[str, Any]) -> tuple[list[torch.Tensor], dict[str, list[int]]]:
    """onnxruntime's outputs of the file at ``path`` on the inputs, and the dynamic axes of its inputs."""
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    given = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
    names = [i.name for i in sess.get_inputs()]
    if len(names) != len(given):
        raise ValueError(f"the exported graph takes {len(names)} inputs ({names}), the example gives {len(given)}")
    feed = {n: t.detach().cpu().numpy() for n, t in zip(names, given)}
    dynamic = {i.name: [a for a, d in enumerate(i.shape) if not isinstance(d, int)] for i in sess.get_inputs()}
    return [torch.from_numpy(o) for o in sess.run(None, feed)], dynamic


def to_onnx(model: nn.Module, example_inputs: Any, path: str | os.PathLike, *, atol: float = 1e-4,
            overwrite: bool = False) -> OnnxExport:
    """Export a dense sub-network to ONNX and check onnxruntime against eager PyTorch before keeping the file.

    ``torch.onnx.export(model, ..., dynamo=True)`` with the batch axis of every input dynamic, and
    the sequence axis too for 2-D integer inputs (token ids): each offered as ``Dim.AUTO``, so an
    axis the model fixes stays static (:attr:`OnnxExport.dynamic` says which became dynamic). An
    example batch of 1 is traced as 2 (the exporter would fix an axis of size 1). The model is
    exported in eval mode (BatchNorm reads its running statistics) and put back in its mode after.
    The file is written to a temporary file in the same folder, run by onnxruntime on
    ``example_inputs`` and compared with ``model(example_inputs)``; only then is it renamed into
    place (:func:`elasticize._files.atomic_write`): a failed export or check leaves no file.
    Weights are stored inside the one ``.onnx`` file (protobuf caps it at 2 GiB).

    Args:
        model: a dense sub-network (:meth:`elasticize.ElasticModel.extract`, :func:`elasticize.load_subnet`).
        example_inputs: a tensor, a tuple of tensors (``model(*example_inputs)``) or a mapping
            (``model(**example_inputs)``), e.g. ``(batch, channels, height, width)`` images or
            ``(batch, sequence)`` token ids.
        path: the ``.onnx`` file to write.
        atol: the largest absolute difference allowed between onnxruntime and eager outputs, scaled
            by ``max(1, max |eager output|)``.
        overwrite: replace an existing file (never an input).

    Returns:
        The :class:`OnnxExport`.

    Raises:
        TypeError: ``model`` is an :class:`~elasticize.ElasticModel` or holds elastic modules
            (extract a dense sub-network first), or ``example_inputs`` is of another type.
        ValueError: the dynamo exporter failed (its error in one line), or onnxruntime's outputs
            differ from eager PyTorch's by more than ``atol`` (or in number or shape).
        ImportError: onnx, onnxscript or onnxruntime is not installed (``pip install 'elasticize[onnx]'``).
        FileExistsError, FileNotFoundError, PermissionError: see :func:`elasticize._files.check_output`.
    """
    from .._files import atomic_write, check_output

    _refuse_elastic(model)
    args, kwargs = _as_args(example_inputs)
    check_output(path, kind="file", overwrite=overwrite)
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ImportError(f"ONNX export needs onnx, onnxscript and onnxruntime ({e}); pip install 'elasticize[onnx]'") \
            from None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref = _leaves(model(*args, **kwargs))
        program = _export(model, args, kwargs)
    finally:
        model.train(was_training)
    found: dict[str, Any] = {}

    def write(tmp: str) -> None:
        program.save(tmp, external_data=False)
        got, found["dynamic"] = _run_onnx(tmp, args, kwargs)
        found["diff"] = _compare(got, ref, atol)

    out = atomic_write(path, write, overwrite=overwrite)
    return OnnxExport(out, found["dynamic"], found["diff"])


def _compare(got: Sequence[torch.Tensor], ref: Sequence[torch.Tensor], atol: float) -> float:
    """The largest absolute difference of onnxruntime's outputs ``got`` from eager's ``ref``.

    Raises:
        ValueError: a different number or shape of outputs, or a difference above ``atol``.
    """
    if len(got) != len(ref):
        raise ValueError(f"onnxruntime returns {len(got)} outputs, eager PyTorch {len(ref)}; the export is not kept")
    worst = 0.0
    for i, (g, r) in enumerate(zip(got, ref)):
        r = r.detach().cpu()
        if list(g.shape) != list(r.shape):
            raise ValueError(f"output {i}: onnxruntime gives shape {list(g.shape)}, eager PyTorch {list(r.shape)}; "
                             "the export is not kept")
        if not r.is_floating_point():
            diff = float((g.to(r.dtype) != r).any())
            tol = 0.0
        else:
            diff = (g.double() - r.double()).abs().max().item() if r.numel() else 0.0
            tol = atol * max(1.0, r.abs().max().item() if r.numel() else 0.0)
        if not diff <= tol:
            raise ValueError(f"output {i}: onnxruntime differs from eager PyTorch by {diff:.3g} (allowed {tol:.3g}); "
                             "the export is not kept")
        worst = max(worst, diff)
    return worst


def example_inputs(model: nn.Module, *, recipe: Mapping[str, Any] | None = None,
                   input_shapes: Sequence[Sequence[int]] = ()) -> tuple[torch.Tensor, ...]:
    """Example inputs for exporting ``model``, a dense sub-network of a file.

    The family adapter's (``recipe["adapter"]``: a transformers model's token ids or pixels, a
    timm model's image) when it has them, else the file's example input shapes: token ids in
    ``[0, num_embeddings)`` when the model's first layer with weights is an ``nn.Embedding``,
    else ``torch.randn`` (seeded).

    Args:
        model: the dense sub-network.
        recipe: its file's recipe (``{"adapter", ...}``), or None.
        input_shapes: its file's example input shapes, e.g. ``[[1, 3, 224, 224]]``.

    Returns:
        The inputs, ``model(*inputs)``.

    Raises:
        ValueError: neither the adapter nor the shapes give an input.
    """
    from ..adapters import get_adapter

    if recipe and recipe.get("adapter"):
        try:
            return tuple(get_adapter(recipe["adapter"]).example_inputs(model))
        except (ValueError, KeyError, AttributeError, TypeError):
            pass
    if not input_shapes:
        raise ValueError(f"the file records no example input shape for {type(model).__name__}; export in Python with "
                         "elasticize.deploy.to_onnx(dense, example_inputs, path)")
    g = torch.Generator().manual_seed(0)
    first = next((m for m in model.modules() if next(m.parameters(recurse=False), None) is not None), None)
    if isinstance(first, nn.Embedding):
        return tuple(torch.randint(0, first.num_embeddings, tuple(s), generator=g) for s in input_shapes)
    return tuple(torch.randn(*s, generator=g) for s in input_shapes)
