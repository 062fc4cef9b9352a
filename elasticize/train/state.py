"""Trainer state for resume: weights, optimizer state, step, data position and RNG states.

One ``.safetensors`` file: tensors ``model.<name>`` (the super-network's state dict, with
the trained BatchNorm statistics), ``optim.<param index>.<key>`` (optimizer state tensors),
``rng.sampler`` and ``rng.torch`` (generator states, uint8); the header metadata key
``"elasticize.train"`` holds JSON: ``format_version``, ``plan_sha256`` (fingerprint of the
model's plan: a state only resumes the model it was saved from), ``step``, ``epoch``,
``batch_in_epoch``, ``strategy`` (name and options), ``sampler`` (seed, per), the optimizer's
``param_groups`` and non-tensor state. Written atomically; no pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .._files import atomic_write, check_output
from ..model import ElasticModel

__all__ = ["plan_fingerprint", "write_state", "read_state", "read_state_info", "check_state_info", "STATE_KEY"]

STATE_KEY = "elasticize.train"
STATE_VERSION = 1


def plan_fingerprint(plan_json: dict[str, Any]) -> str:
    """sha256 of the plan's canonical JSON."""
    return hashlib.sha256(json.dumps(plan_json, sort_keys=True).encode()).hexdigest()


def read_state_info(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata of a trainer state file, without reading its tensors.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a readable safetensors file, or not a trainer state (e.g. a model file).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such trainer state file: {p}")
    try:
        with safe_open(str(p), framework="pt") as f:
            raw = (f.metadata() or {}).get(STATE_KEY)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{p} is not a readable safetensors file ({e})") from e
    if raw is None:
        raise ValueError(f"{p} is not an elasticize trainer state (no {STATE_KEY!r} metadata; a model file?); give "
                         "the file written by Trainer.save_state or `elasticize train --state FILE`")
    return json.loads(raw)


def write_state(path: str | os.PathLike, em: ElasticModel, optimizer: torch.optim.Optimizer, meta: dict[str, Any],
                rng: dict[str, torch.Tensor], *, inputs: tuple = ()) -> Path:
    """Write the trainer state atomically (replacing an older state file at ``path``).

    The file keeps the mode of the one it replaces; a new one gets ``0o666 & ~umask``.

    Raises:
        ValueError: ``path`` is one of ``inputs``.
        FileExistsError: ``path`` is a folder.
        FileNotFoundError: its folder does not exist.
        PermissionError: its folder cannot be written in.
        TypeError: the optimizer's ``param_groups`` are not JSON-native.
        OSError: writing failed; the older state file stays as it was.
    """
    check_output(path, overwrite=True, inputs=inputs)
    with em.trained_bn_stats():
        tensors = {f"model.{k}": v.detach().contiguous().cpu().clone() for k, v in em.model.state_dict().items()}
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in opt["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{idx}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[k] = v
    for k, v in rng.items():
        tensors[f"rng.{k}"] = v.contiguous().cpu()
    try:
        groups = json.loads(json.dumps(opt["param_groups"]))
    except TypeError as e:
        raise TypeError(f"the optimizer's param_groups are not JSON-native ({e}); use plain numbers for settings") from e
    info = dict(meta, format_version=STATE_VERSION, plan_sha256=plan_fingerprint(em.plan.to_json()),
                optimizer={"param_groups": groups, "scalars": scalars})
    # shared storage (tied weights) must be stored once: safetensors refuses aliases
    seen: dict[int, str] = {}
    for k in list(tensors):
        ptr = tensors[k].untyped_storage().data_ptr()
        if ptr in seen and tensors[k].numel():
            tensors[k] = tensors[k].clone()
        seen[ptr] = k
    metadata = {STATE_KEY: json.dumps(info)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), overwrite=True, inputs=inputs)


def check_state_info(path: str | os.PathLike, info: dict[str, Any], em: ElasticModel) -> None:
    """Check that the metadata ``info`` of the state file ``path`` can resume ``em``.

    Raises:
        ValueError: a newer state format, or a state saved from another model (plan fingerprint differs).
    """
    if int(info.get("format_version", 0)) > STATE_VERSION:
        raise ValueError(f"{path} was written by a newer elasticize (state format {info['format_version']}); upgrade")
    if info.get("plan_sha256") != plan_fingerprint(em.plan.to_json()):
        raise ValueError(f"{path} was saved from a different super-network (its plan differs); resume with the model "
                         "it was saved from")


def read_state(path: str | os.PathLike, em: ElasticModel, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Load a state written by :func:`write_state` into ``em`` and ``optimizer``.

    Returns:
        (the JSON metadata, the RNG state tensors by name).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a trainer state file, a newer format, or a state saved from another
            model (plan fingerprint differs) or for another optimizer (parameter count differs).
    """
    p = Path(path)
    info = read_state_info(p)
    check_state_info(p, info, em)
    tensors = load_file(str(p))
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    groups = info["optimizer"]["param_groups"]
    n_params = sum(len(g["params"]) for g in groups)
    if n_params != sum(len(g["params"]) for g in optimizer.param_groups):
        raise ValueError(f"{p} holds optimizer state for {n_params} parameters; this optimizer has "
                         f"{sum(len(g['params']) for g in optimizer.param_groups)}")
    state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, key = k.split(".", 2)
            state.setdefault(int(idx), {})[key] = v
    for idx, st in info["optimizer"]["scalars"].items():
        state.setdefault(int(idx), {}).update(st)
    em.set_bn_stats({})
    em.model.load_state_dict(model_state, strict=True)
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    rng = {k[len("rng."):]: v for k, v in tensors.items() if k.startswith("rng.")}
    return info, rng
