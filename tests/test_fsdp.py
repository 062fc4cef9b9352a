"""FSDP2 training (``Trainer(parallel="fsdp")``) on 2 gloo processes: a tiny Llama super-network
(width, heads and depth) ends with the weights one process reaches over the same global batches,
both processes draw the same sub-networks, sliced views see the full parameters, and a run
resumed from a state saved under FSDP ends where the uninterrupted one did."""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import elasticize

STEPS, STOP = 10, 5
BATCH, TOKENS = 8, 8  # global batch (4 per process), tokens per sample


def _base():
    import transformers as T

    torch.manual_seed(0)
    cfg = T.LlamaConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=64, vocab_size=256, max_position_embeddings=64)
    return T.LlamaForCausalLM(cfg).eval()


def _llama() -> elasticize.ElasticModel:
    return elasticize.elasticize(_base())


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Global batches of byte-level next-token prediction on real English text (this package's docstrings)."""
    import elasticize.train.trainer as mod

    text = "".join(inspect.getdoc(f) or "" for f in vars(mod).values() if callable(f)).encode()
    ids = torch.tensor(list(text[: STEPS * BATCH * (TOKENS + 1)]), dtype=torch.int64).view(STEPS, BATCH, TOKENS + 1)
    return [(b[:, :-1].contiguous(), b[:, 1:].contiguous()) for b in ids]


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(out.flatten(0, 1), y.flatten())


def _trainer(data, parallel: str = "ddp"):
    from elasticize.train import Trainer

    em = _llama()
    opt = torch.optim.AdamW(em.parameters(), lr=3e-3)
    return Trainer(em, data, optimizer=opt, loss_fn=_loss, strategy="sortednet", seed=3, parallel=parallel,
                   distill=False)


def _weights(tr) -> dict[str, torch.Tensor]:
    from elasticize.train.fsdp import full_model_state

    return full_model_state(tr.em) if tr.parallel == "fsdp" else {k: v.clone() for k, v in tr.em.model.state_dict().items()}


def _worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        mine = [(x[rank::world], y[rank::world]) for x, y in _batches()]
        tr = _trainer(mine, "fsdp")
        seen = {}  # a sliced view in forward sees the full (unsharded) parameter, not this process's shard
        proj = tr.em.model.model.layers[0].mlp.down_proj

        def look(m, args):
            seen.setdefault("shape", tuple(m._parameters["weight"].shape))

        h = proj.register_forward_pre_hook(look)
        recs = tr.train_steps(STOP, state_path=f"{out}/state.safetensors")
        h.remove()
        recs += tr.train_steps(STEPS - STOP)
        tr.save(f"{out}/trained.safetensors")
        straight = _weights(tr)
        resumed = _trainer(mine, "fsdp")
        resumed.load_state(f"{out}/state.safetensors")
        resumed.train_steps(STEPS - resumed.step)
        again = _weights(resumed)
        if rank == 0:
            save_file({k: v.contiguous() for k, v in straight.items()}, f"{out}/fsdp.safetensors")
            save_file({k: v.contiguous() for k, v in again.items()}, f"{out}/resumed.safetensors")
        local = sum(p.to_local().numel() for p in tr.em.parameters())
        Path(f"{out}/rank{rank}.json").write_text(json.dumps({
            "configs": [r["configs"] for r in recs], "seen": seen["shape"], "local": local,
            "units": tr.units}))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    import torch.multiprocessing as mp

    d = tmp_path_factory.mktemp("fsdp")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(2, f"file://{d}/rendezvous", str(d)), nprocs=2, join=True)
    return d


def test_fsdp_equals_one_process_over_the_same_global_batches(fsdp_run):
    tr = _trainer(_batches())
    recs = tr.train_steps(STEPS)
    single = tr.em.model.state_dict()
    fsdp = load_file(str(fsdp_run / "fsdp.safetensors"))
    assert fsdp.keys() == single.keys()
    worst = max(float((fsdp[k] - single[k]).abs().max()) for k in single)
    assert worst <= 1e-5, worst
    before = _llama().model.state_dict()
    assert any(not torch.equal(before[k], single[k]) for k in single)  # it trained
    c0 = json.loads((fsdp_run / "rank0.json").read_text())["configs"]
    assert c0 == [r["configs"] for r in recs]  # the same draws as the one process too


def test_both_ranks_draw_the_same_subnetworks_and_shard(fsdp_run):
    r0, r1 = (json.loads((fsdp_run / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["configs"] == r1["configs"] and len(r0["configs"]) == STEPS
    assert len({json.dumps(c, sort_keys=True) for step in r0["configs"] for c in step}) > 2  # not all one draw
    assert r0["units"] == [f"model.layers.{i}" for i in range(4)]
    full = sum(p.numel() for p in _llama().parameters())
    assert r0["local"] + r1["local"] == full and max(r0["local"], r1["local"]) <= full // 2 + 64
    assert r0["seen"] == [32, 64]  # down_proj's full weight is there when its forward runs


def test_fsdp_resume_equals_uninterrupted_and_file_loads(fsdp_run):
    a, b = (load_file(str(fsdp_run / f"{n}.safetensors")) for n in ("fsdp", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    em = elasticize.load(fsdp_run / "trained.safetensors", model=_base())
    got = em.model.state_dict()
    assert all(torch.equal(got[k], a[k]) for k in a)
    assert set(elasticize.read_manifest(fsdp_run / "trained.safetensors")["presets"]) == set(em.presets)
