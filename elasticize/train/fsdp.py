"""FSDP2 for the sorted trainer: shard the super-network's blocks, and gather it back for files.

``Trainer(..., parallel="fsdp")`` under ``torchrun`` calls :func:`shard`: every depth-stage
block of the plan (a transformer layer, a residual block), else every element of the model's
``nn.ModuleList`` s, becomes one :func:`torch.distributed.fsdp.fully_shard` unit, then the
model itself (the root: embeddings, head, the rest). Each process then holds ``1/N`` of every
parameter, its gradient and its optimizer state (PyTorch FSDP2; Zhao et al., "PyTorch FSDP",
VLDB 2023, for the algorithm).

Why elasticity works on sharded parameters: FSDP2 all-gathers a unit's parameters in the
unit's forward pre-hook and registers the full tensors on its modules until the forward ends,
so the sliced views of :mod:`elasticize.modules` (taken in ``forward`` through ``__getattr__``)
slice the full parameter; the backward reduce-scatters the full-size gradient (zero outside the
slice). A skipped block returns its input from ``forward``, but its hooks still run (they are
``nn.Module.__call__``'s), so every process all-gathers the same units in the same order: the
trainer draws the same sub-network on every process (the sampler's seed is rank 0's, and
:func:`check_same_configs` verifies it at every step), so the collectives always match. A
skipped block's all-gather is spent communication, not a deadlock.

Files: :func:`full_model_state` and :func:`full_optimizer_state` gather the unsharded state
(``get_model_state_dict(..., StateDictOptions(full_state_dict=True, cpu_offload=True))``) into
process 0's CPU memory; the trained super-network and the trainer state are then the same one
safetensors file each as without FSDP (a state saved under FSDP resumes in one process, and the
reverse); :func:`load_full_state` puts a state back into the shards. No pickle anywhere.
Sharded (per-rank) resume states are not written yet: ``torch.distributed.checkpoint``'s
``HuggingFaceStorageWriter(save_distributed=True)`` writes per-rank safetensors with JSON
sharding metadata (its default ``FileSystemWriter`` pickles ``.metadata``), but it takes
tensors only and writes in place; see the training guide.

On CUDA with ``amp`` the units get a :class:`~torch.distributed.fsdp.MixedPrecisionPolicy` of
bf16 parameters and fp32 gradient reduction (untested here: the test machine has no GPU).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..elastic import ElasticModel

__all__ = ["shard_units", "shard", "full_model_state", "full_optimizer_state", "load_full_state",
           "check_same_configs", "full_state_dict_of"]


def shard_units(em: ElasticModel) -> list[str]:
    """The module names (in ``em.model``) :func:`shard` makes FSDP units of, before the root.

    The blocks of the plan's depth stages (``plan.stages[*].blocks``) when it has any; else
    every element of every ``nn.ModuleList`` in the model (a transformer's layers); else none
    (the root alone is sharded).
    """
    blocks = [b for st in em.plan.stages for b in st.blocks]
    if blocks:
        return blocks
    return [f"{name}.{i}" if name else str(i) for name, m in em.model.named_modules()
            if isinstance(m, nn.ModuleList) for i in range(len(m))]


def shard(em: ElasticModel, optimizer: torch.optim.Optimizer, *, mixed_precision: bool = False) -> list[str]:
    """Shard ``em.model`` with FSDP2 over the default process group, in place; returns the units.

    The optimizer was made over the unsharded parameters; FSDP2 replaces them by sharded
    ``DTensor`` parameters, so the optimizer's groups are pointed at the new ones (same order,
    matched by name). Call it on every process, before the first step.

    Args:
        em: the super-network (on its training device).
        optimizer: over ``em.parameters()``, with no state yet.
        mixed_precision: bf16 parameters in forward and backward, fp32 gradient reduction
            (``MixedPrecisionPolicy``; for CUDA, untested here).

    Returns:
        The names of the units sharded before the root (:func:`shard_units`).

    FSDP2 reads its sharded parameters back from the modules (``getattr``) at its lazy
    initialisation, after ``module.to(...)`` and after ``load_state_dict``; an elastic module
    gives the active sub-network's slice there, so the initialisation runs here at the full
    sub-network, and ``em.to(...)`` after sharding must run at the full sub-network too.

    Raises:
        ValueError: no process group (start under ``torchrun``), an optimizer that already has
            state (build the trainer before loading any), or one over parameters not in ``em``.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("parallel='fsdp' shards the model across the processes of a torch.distributed job; start "
                         "the script under torchrun (or call init_process_group first), or drop --fsdp")
    if optimizer.state:
        raise ValueError("the optimizer has state already; give the trainer a fresh optimizer (resume with "
                         "load_state after building the trainer)")
    name_of = {id(p): n for n, p in em.model.named_parameters()}
    group_names = []
    for g in optimizer.param_groups:
        missing = [p for p in g["params"] if id(p) not in name_of]
        if missing:
            raise ValueError(f"the optimizer holds {len(missing)} parameters that are not the model's; make it "
                             "over em.parameters()")
        group_names.append([name_of[id(p)] for p in g["params"]])
    kw: dict[str, Any] = {}
    if mixed_precision:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    units = shard_units(em)
    modules = [em.model.get_submodule(name) for name in units] + [em.model]
    for m in modules:
        fully_shard(m, **kw)
    # FSDP2 takes its sharded parameters back with getattr(module, name) at its lazy init (and after
    # _apply or load_state_dict), and an elastic module's getattr gives the active sub-network's
    # slice: initialise now, at the full sub-network (unshard runs the lazy init; a collective)
    with em.subnet(None):
        for m in modules:
            m.unshard()
            m.reshard()
    params = dict(em.model.named_parameters())
    for g, names in zip(optimizer.param_groups, group_names):
        g["params"] = [params[n] for n in names]
    return units


def full_model_state(em: ElasticModel) -> dict[str, torch.Tensor]:
    """The unsharded ``em.model.state_dict()`` with the trained BatchNorm statistics, on CPU.

    A collective: every process calls it; process 0 gets the tensors, the others an empty dict.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    with em.trained_bn_stats():
        return get_model_state_dict(em.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(em: ElasticModel, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The unsharded optimizer state in ``optimizer.state_dict()``'s form (parameters by index).

    A collective (see :func:`full_model_state`): each sharded state tensor (Adam's moments) is
    all-gathered (``DTensor.full_tensor``), in parameter order, which is the same on every
    process because every process trained the same sub-networks (the same parameters have
    state). ``get_optimizer_state_dict`` is not used: it refuses an optimizer in which some
    parameters have no state yet (blocks no drawn sub-network has used). Process 0 gets
    ``{"state", "param_groups"}`` on CPU, the others an empty dict.
    """
    from torch.distributed.tensor import DTensor

    sd = optimizer.state_dict()
    state = {}
    for idx in sorted(sd["state"]):
        state[idx] = {k: (v.full_tensor().cpu() if isinstance(v, DTensor) else v) for k, v in sd["state"][idx].items()}
    return {"state": state, "param_groups": sd["param_groups"]} if dist.get_rank() == 0 else {}


def load_full_state(em: ElasticModel, optimizer: torch.optim.Optimizer, model_state: Mapping[str, torch.Tensor],
                    optim_state: Mapping[str, Any]) -> None:
    """Put full (unsharded) states, as :func:`full_model_state` and :func:`full_optimizer_state`
    give them, into the sharded ``em.model`` and ``optimizer``; every process passes them whole
    and keeps its own shard of each (no communication for the optimizer state).

    Raises:
        RuntimeError: a model state whose names or shapes are not the model's.
        ValueError: an optimizer state of another parameter count (see ``Optimizer.load_state_dict``).
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    def shard_like(v: Any, p: torch.Tensor) -> Any:
        if isinstance(p, DTensor) and isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(p.shape):
            return distribute_tensor(v.to(p.device, p.dtype), p.device_mesh, p.placements, src_data_rank=None)
        return v

    own = dict(em.model.state_dict())
    if own.keys() != model_state.keys():
        raise RuntimeError(f"the model state does not match the model: missing {sorted(own.keys() - model_state.keys())[:3]}, "
                           f"unexpected {sorted(model_state.keys() - own.keys())[:3]}")
    with torch.no_grad():
        for k, t in own.items():
            v = shard_like(model_state[k], t)
            (t.to_local() if isinstance(t, DTensor) else t).copy_(v.to_local() if isinstance(v, DTensor) else v)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {int(i): {k: shard_like(v, params[int(i)]) for k, v in st.items()} for i, st in optim_state["state"].items()}
    optimizer.load_state_dict({"state": state, "param_groups": optim_state["param_groups"]})


@contextlib.contextmanager
def full_state_dict_of(em: ElasticModel, state: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Inside, ``em.model.state_dict()`` returns ``state`` (the gathered full state) instead of
    the shards, so :func:`elasticize.save` writes the one unsharded file (process 0 only)."""
    def hook(module: nn.Module, sd: dict[str, Any], prefix: str, local: Any) -> None:
        sd.clear()
        sd.update(state)

    handle = em.model.register_state_dict_post_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def check_same_configs(configs: Sequence[Mapping[str, Any]], step: int, device: torch.device) -> None:
    """Raise unless every process trained the same sub-networks this step (one all-reduce of two
    integers on ``device``: a digest and its negation, whose maxima give the largest and smallest).

    Raises:
        RuntimeError: the processes drew different sub-networks (their samplers' seeds or
            states differ), which would desynchronise FSDP's collectives.
    """
    digest = hashlib.sha256(json.dumps([dict(c) for c in configs], sort_keys=True).encode()).digest()
    h = int.from_bytes(digest[:7], "little")
    t = torch.tensor([h, -h], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if int(t[0]) != -int(t[1]):
        raise RuntimeError(f"step {step}: the processes trained different sub-networks; every process must build "
                           "the trainer with the same seed, strategy and search space")
