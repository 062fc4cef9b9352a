"""Trainer state for resume: weights, optimizer state, step, data position and RNG states.

One ``.safetensors`` file: tensors ``model.<name>`` (the super-network's state dict, with
the trained BatchNorm statistics), ``optim.<param index>.<key>`` (optimizer state tensors),
``rng.sampler`` (the sub-network sampler's generator) and the random states of
:func:`rng_state` (uint8) twice: ``rng.<name>`` as they were when the state was saved and
``rng.epoch.<name>`` as they were when the current epoch's data iterator was made (a resumed
run makes it again from them, so a shuffle draws the same order); the header metadata key
``"elasticize.train"`` holds JSON: ``format_version``, ``plan_sha256`` (fingerprint of the
model's plan: a state only resumes the model it was saved from), ``step``, ``epoch``,
``batch_in_epoch``, ``strategy`` (name and options), ``sampler`` (seed, per), ``rng`` (the
JSON halves of the random states, ``now`` and ``epoch``), the optimizer's ``param_groups``
and non-tensor state. Written atomically; no pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .._files import atomic_write, check_output
from ..elastic import ElasticModel

__all__ = ["plan_fingerprint", "write_state", "read_state", "read_state_info", "check_state_info", "STATE_KEY",
           "rng_state", "set_rng_state", "data_generators", "read_state_parts"]

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
                rng: dict[str, torch.Tensor], *, inputs: tuple = (), model_state: Mapping[str, torch.Tensor] | None = None,
                optim_state: Mapping[str, Any] | None = None) -> Path:
    """Write the trainer state atomically (replacing an older state file at ``path``).

    The file keeps the mode of the one it replaces; a new one gets ``0o666 & ~umask``.

    Args:
        path: the state file.
        em: the super-network (its ``model.state_dict()`` with the trained BatchNorm statistics).
        optimizer: its state and ``param_groups`` are stored.
        meta: the trainer's JSON fields (step, data position, strategy...).
        rng: random-state tensors by name.
        inputs: files ``path`` must not be.
        model_state: the model's state to store instead of ``em``'s own (FSDP's gathered full
            state: :func:`elasticize.train.fsdp.full_model_state`).
        optim_state: the optimizer's ``state_dict()`` to store instead of ``optimizer``'s own
            (:func:`elasticize.train.fsdp.full_optimizer_state`).

    Raises:
        ValueError: ``path`` is one of ``inputs``.
        FileExistsError: ``path`` is a folder.
        FileNotFoundError: its folder does not exist.
        PermissionError: its folder cannot be written in.
        TypeError: the optimizer's ``param_groups`` are not JSON-native.
        OSError: writing failed; the older state file stays as it was.
    """
    check_output(path, overwrite=True, inputs=inputs)
    if model_state is None:
        with em.trained_bn_stats():
            model_state = em.model.state_dict()
    tensors = {f"model.{k}": v.detach().contiguous().cpu().clone() for k, v in model_state.items()}
    opt = optimizer.state_dict() if optim_state is None else optim_state
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
    info, model_state, optim_state, rng = read_state_parts(path, em, optimizer)
    em.set_bn_stats({})
    em.model.load_state_dict(model_state, strict=True)
    optimizer.load_state_dict(optim_state)
    return info, rng


def read_state_parts(path: str | os.PathLike, em: ElasticModel, optimizer: torch.optim.Optimizer
                     ) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any], dict[str, torch.Tensor]]:
    """A state written by :func:`write_state`, checked against ``em`` and ``optimizer`` but not loaded.

    Returns:
        (the JSON metadata, the model's state dict, the optimizer's ``state_dict()`` (parameters
        by index), the RNG state tensors by name).

    Raises:
        FileNotFoundError, ValueError: as :func:`read_state`.
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
    rng = {k[len("rng."):]: v for k, v in tensors.items() if k.startswith("rng.")}
    return info, model_state, {"state": state, "param_groups": groups}, rng


# ---------------------------------------------------------------------- random states

#: Where a loader keeps the ``torch.Generator`` it draws its order from (see :func:`data_generators`).
_GENERATOR_PATHS = ("generator", "sampler.generator", "batch_sampler.generator", "batch_sampler.sampler.generator")


def data_generators(data: Any) -> dict[str, torch.Generator]:
    """The ``torch.Generator`` objects a data loader draws from, by attribute path.

    Looks at ``data.generator`` (``DataLoader(generator=...)``, which also seeds its iterators),
    ``data.sampler.generator`` (e.g. ``RandomSampler(generator=...)``), ``data.batch_sampler.generator``
    and ``data.batch_sampler.sampler.generator``; a generator found under two paths is listed
    under the first. Anything else (a list of batches) has none.
    """
    out: dict[str, torch.Generator] = {}
    seen: set[int] = set()
    for path in _GENERATOR_PATHS:
        obj = data
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, torch.Generator) and id(obj) not in seen:
            seen.add(id(obj))
            out[path] = obj
    return out


def rng_state(generators: Mapping[str, torch.Generator] | None = None
              ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every random state that exact resume restores, as uint8 tensors and JSON (no pickle).

    Args:
        generators: named generators of the data (:func:`data_generators`).

    Returns:
        (tensors, JSON). Tensors: ``torch`` (the CPU generator), ``cuda.<device index>`` (each
        CUDA device's, when this process has initialised CUDA), ``python`` (the words of
        ``random``'s Mersenne Twister, int64 bytes), ``numpy`` (``numpy.random``'s key, uint32
        bytes, when NumPy is imported), ``loader.<path>`` (each of ``generators``). JSON: the
        rest of the Python and NumPy states.
    """
    tensors: dict[str, torch.Tensor] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    version, words, gauss = random.getstate()
    tensors["python"] = torch.tensor(words, dtype=torch.int64).view(torch.uint8)
    info: dict[str, Any] = {"python": {"version": version, "gauss_next": gauss}}
    np = sys.modules.get("numpy")
    if np is not None:
        kind, key, pos, has_gauss, cached = np.random.get_state()
        tensors["numpy"] = torch.from_numpy(np.ascontiguousarray(key, dtype=np.uint32).view(np.uint8).copy())
        info["numpy"] = {"kind": str(kind), "pos": int(pos), "has_gauss": int(has_gauss),
                         "cached_gaussian": float(cached)}
    for name, g in (generators or {}).items():
        tensors[f"loader.{name}"] = g.get_state()
    return tensors, info


def set_rng_state(tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any],
                  generators: Mapping[str, torch.Generator] | None = None) -> list[str]:
    """Restore random states from :func:`rng_state`'s output.

    A state that lacks an entry (a state saved without CUDA or NumPy, or by an older
    elasticize) leaves that generator as it is; CUDA states of devices this process does not
    have are skipped.

    Args:
        tensors: :func:`rng_state`'s tensors, as read back from the file.
        info: :func:`rng_state`'s JSON part.
        generators: the data's named generators (:func:`data_generators`).

    Returns:
        The loader generator paths found in only one of ``tensors`` and ``generators`` (their
        draws cannot be restored), sorted.
    """
    if "torch" in tensors:
        torch.set_rng_state(tensors["torch"].to(torch.uint8).cpu())
    cuda = sorted((int(k.split(".", 1)[1]), v) for k, v in tensors.items() if k.startswith("cuda."))
    if cuda and torch.cuda.is_available():
        for i, s in cuda:
            if i < torch.cuda.device_count():
                torch.cuda.set_rng_state(s.to(torch.uint8).cpu(), i)
    if "python" in tensors:
        p = info.get("python") or {}
        words = tuple(tensors["python"].cpu().clone().view(torch.int64).tolist())
        random.setstate((int(p.get("version", 3)), words, p.get("gauss_next")))
    if "numpy" in tensors and info.get("numpy"):
        import numpy as np

        n = info["numpy"]
        key = np.frombuffer(tensors["numpy"].cpu().numpy().tobytes(), dtype=np.uint32)
        np.random.set_state((n["kind"], key, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    gens = generators or {}
    saved = {k[len("loader."):] for k in tensors if k.startswith("loader.")}
    for name in saved & set(gens):
        gens[name].set_state(tensors[f"loader.{name}"].to(torch.uint8).cpu())
    return sorted(saved ^ set(gens))
