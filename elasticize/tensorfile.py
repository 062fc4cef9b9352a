"""Tensors to and from plain safetensors files: tied tensors stored once, aligned reads, strict loading.

Shared by the model files (:mod:`elasticize.checkpoint`) and conversion from a weights file
(:func:`elasticize.convert`), so conversion does not import the checkpoint layer above it. Writing
a file atomically (temporary name, umask mode, never the input) is :mod:`elasticize._files`'
:func:`~elasticize._files.atomic_write`. No pickle anywhere.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
from safetensors.torch import load_file
from torch import nn

__all__ = ["dedupe", "aligned", "load_strict", "load_weights_file", "name_summary", "TORCH_DTYPES", "tensor_bytes",
           "write_ordered"]


def dedupe(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Contiguous CPU tensors for safetensors; tensors that share storage (tied weights) are stored once.

    Returns:
        (name -> tensor to store, alias name -> the stored name it equals).
    """
    out: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for name, t in state.items():
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype) \
            if t.device.type != "meta" else (name,)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        out[name] = t.contiguous().cpu()
    return out, aliases


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` in memory aligned to 64 bytes (a copy only when it is not).

    Tensors read from a file sit at the file's byte offsets; kernels pick other SIMD paths
    for misaligned data and round differently (~1e-6), which would break the promise that
    a loaded model computes bit for bit what was saved.
    """
    return t if t.data_ptr() % 64 == 0 else t.clone()


def name_summary(groups: Iterable[tuple[str, Sequence[str]]], *, quote: bool = False) -> str:
    """``"missing 2 (a, b); unexpected 1 (c)"``: each non-empty group's count and first three names,
    for the one-line errors that list what does not fit."""
    def show(x: str) -> str:
        return repr(x)[:80] if quote else x

    return "; ".join(f"{label} {len(v)} ({', '.join(show(x) for x in v[:3])}{', ...' if len(v) > 3 else ''})"
                     for label, v in groups if v)


def load_strict(model: nn.Module, tensors: dict[str, torch.Tensor], *, assign: bool, what: str) -> None:
    """``model.load_state_dict(tensors, strict=True, assign=assign)``, naming what does not fit.

    Raises:
        ValueError: tensors missing, unexpected, or of another shape or dtype than the model's
            (the first three of each are named, with ``what``, e.g. the file's path).
    """
    state = model.state_dict()
    missing = [k for k in state if k not in tensors]
    unexpected = [k for k in tensors if k not in state]
    shapes = [f"{k} {tensors[k].dtype} {list(tensors[k].shape)} vs {state[k].dtype} {list(state[k].shape)}"
              for k in state if k in tensors and (tensors[k].shape != state[k].shape or tensors[k].dtype != state[k].dtype)]
    if missing or unexpected or shapes:
        summary = name_summary((("missing", missing), ("unexpected", unexpected),
                                ("mis-shaped or of another dtype", shapes)))
        raise ValueError(f"{what} does not fit the model: {summary}. Pass the architecture it was made "
                         "from (same constructor arguments) as model=")
    model.load_state_dict(tensors, strict=True, assign=assign)


def load_weights_file(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a plain ``.safetensors`` state dict into ``model`` (strict).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a safetensors file (pickled ``.pt``/``.pth`` files are refused: elasticize
            never unpickles), or its tensors do not fit the model.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such weights file: {p}")
    try:
        tensors = load_file(str(p))
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{p} is not a safetensors file ({e}). elasticize never unpickles .pt/.pth files; convert "
                         "them once (PyTorch's weights-only loader, then safetensors.torch.save_file)") from e
    load_strict(model, tensors, assign=False, what=str(p))


#: safetensors dtype name -> torch dtype (the dtypes torch has).
TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
                "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "C64": torch.complex64}
_ST_DTYPES = {v: k for k, v in TORCH_DTYPES.items()}


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The little-endian bytes of ``t`` in row-major order, as safetensors stores them."""
    t = t.detach().contiguous().cpu().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def write_ordered(tensors: Sequence[tuple[str, torch.Tensor]], path: str | os.PathLike,
                  metadata: Mapping[str, str]) -> None:
    """Write a safetensors file whose data holds ``tensors`` in the given order.

    ``safetensors.torch.save_file`` orders the data by dtype, then name; the nested layout
    (:mod:`elasticize.fileformat.layout`) needs its own order (each preset a byte prefix), so this
    writes the same format (8-byte little-endian header length, JSON header padded with spaces to
    8 bytes, then the data) in that order. safetensors' own reader accepts any order.

    Raises:
        TypeError: a tensor of a dtype safetensors has no name for.
    """
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    end = 0
    for name, t in tensors:
        if t.dtype not in _ST_DTYPES:
            raise TypeError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [end, end + n]}
        end += n

    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        for _, t in tensors:
            fh.write(tensor_bytes(t))
