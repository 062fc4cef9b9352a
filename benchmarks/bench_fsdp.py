"""FSDP2 against DDP: each process's parameter + optimizer-state bytes, and the step-time ratio.

Two gloo processes on CPU train a small Llama super-network (width, heads and depth elastic;
``transformers.LlamaConfig`` with random weights) with the sorted trainer, once with
``parallel="ddp"`` and once with ``parallel="fsdp"``, on the same byte-level batches of this
package's docstrings. Bytes are what each process holds: its parameters (its shards under
FSDP) plus its AdamW state (two moments per parameter element), after the steps. The target
under FSDP is about ``1/N`` of DDP's. Step times are medians over the steps after the first; the
ratio is FSDP's over DDP's, from this one run (on CPU with gloo, FSDP's all-gathers make it slower;
the point is memory).

    OMP_NUM_THREADS=1 python benchmarks/bench_fsdp.py
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

import _results

WORLD = 2


def _model(hidden: int, layers: int):
    import transformers as T

    import elasticize

    torch.manual_seed(0)
    cfg = T.LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=hidden * 2, vocab_size=256, max_position_embeddings=128)
    return elasticize.elasticize(T.LlamaForCausalLM(cfg))


def _batches(rank: int, steps: int, batch: int, tokens: int) -> list:
    import elasticize.train.trainer as mod

    text = "".join(inspect.getdoc(f) or "" for f in vars(mod).values() if callable(f)).encode() * 50
    n = steps * batch * (tokens + 1)
    ids = torch.tensor(list(text[:n]), dtype=torch.int64).view(steps, batch, tokens + 1)
    return [(b[rank::WORLD, :-1].contiguous(), b[rank::WORLD, 1:].contiguous()) for b in ids]


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def _worker(rank: int, init: str, out: str, args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from elasticize.train import Trainer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        res = {}
        for parallel in ("ddp", "fsdp"):
            em = _model(args.hidden, args.layers)
            opt = torch.optim.AdamW(em.parameters(), 1e-3)
            tr = Trainer(em, _batches(rank, args.steps, args.batch, args.tokens), optimizer=opt, distill=False,
                         loss_fn=lambda o, y: torch.nn.functional.cross_entropy(o.flatten(0, 1), y.flatten()),
                         strategy="sortednet", parallel=parallel)
            recs = tr.train_steps(args.steps)
            params = sum(_local_bytes(p) for p in em.parameters())
            state = sum(_local_bytes(v) for st in opt.state.values() for v in st.values()
                        if isinstance(v, torch.Tensor) and v.dim() > 0)
            res[parallel] = {"params": params, "optim": state,
                             "step_s": statistics.median(r["seconds"] for r in recs[1:])}
        Path(out, f"rank{rank}.json").write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8, help="global batch (split over the processes)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--quick", action="store_true")
    _results.add_argument(ap)
    args = ap.parse_args()
    if args.quick:
        args.hidden, args.layers, args.steps = 32, 2, 3
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(f"file://{d}/rendezvous", d, args), nprocs=WORLD, join=True)
        ranks = [json.loads(Path(d, f"rank{r}.json").read_text()) for r in range(WORLD)]
    rows = []
    for r, res in enumerate(ranks):
        ddp, fsdp = res["ddp"], res["fsdp"]
        total = {k: v["params"] + v["optim"] for k, v in res.items()}
        rows.append([r, f"{ddp['params'] / 1e6:.3f}", f"{fsdp['params'] / 1e6:.3f}", f"{ddp['optim'] / 1e6:.3f}",
                     f"{fsdp['optim'] / 1e6:.3f}", f"{total['fsdp'] / total['ddp']:.2f}x",
                     f"{fsdp['step_s'] / ddp['step_s']:.2f}x"])
        print(f"rank {r}: params+optimizer {total['ddp'] / 1e6:.3f} MB (DDP) -> {total['fsdp'] / 1e6:.3f} MB (FSDP), "
              f"{total['fsdp'] / total['ddp']:.2f}x (target {1 / WORLD:.2f}x); step time FSDP/DDP "
              f"{fsdp['step_s'] / ddp['step_s']:.2f}x")
    t = _results.table(["rank", "DDP params MB", "FSDP params MB", "DDP AdamW state MB", "FSDP AdamW state MB",
                        "FSDP/DDP bytes", "FSDP/DDP step time"], rows,
                       title=f"Llama super-network, hidden {args.hidden}, {args.layers} layers, {WORLD} gloo processes",
                       notes="bytes each process holds after training (its shards under FSDP); step time: median "
                             "seconds per step, gloo on CPU")
    path = _results.write(__file__, [t], dest=args.results, quick=args.quick,
                          machine_text=_results.machine(threads=1) + f", {WORLD} processes")
    if path:
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
