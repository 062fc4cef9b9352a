"""Core benchmark: timm ResNet-50 on CPU, batch 4, 224x224, all ratios measured in one run.

Prints: conversion seconds; latency of the elastic model at the largest sub-network over the
original; sub-network switch time; extracted smallest preset over the elastic model at that
preset; bytes and seconds of load_subnet(smallest) over a full load.

    python benchmarks/bench_core.py [--model resnet50] [--threads 2] [--batch 4]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import tempfile
import time

import timm
import torch

import _results
import elasticize


def latency(fn, x, reps: int) -> float:
    """Median seconds of ``fn(x)`` over ``reps`` runs, after 3 warm-up runs."""
    with torch.inference_mode():
        for _ in range(3):
            fn(x)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn(x)
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def paired(fa, fb, x, rounds: int, reps: int) -> tuple[float, float]:
    """Medians of a and b, measured in alternating rounds so that drift hits both alike."""
    a, b = [], []
    for _ in range(rounds):
        a.append(latency(fa, x, reps))
        b.append(latency(fb, x, reps))
    return statistics.median(a), statistics.median(b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=5)
    _results.add_argument(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.threads} threads; timm {args.model}, batch {args.batch}, 224x224, fp32")

    model = timm.create_model(args.model, pretrained=False).eval()
    original = copy.deepcopy(model)
    x = torch.randn(args.batch, 3, 224, 224)

    t0 = time.perf_counter()
    em = elasticize.elasticize(model, x[:1], recipe={"adapter": "timm", "name": args.model, "kwargs": {}})
    convert_s = time.perf_counter() - t0
    em.eval()

    t_orig, t_el = paired(original, em, x, args.rounds, args.reps)

    names = list(em.presets)
    n_switch = 2000
    t0 = time.perf_counter()
    for i in range(n_switch):
        em.set_subnet(names[i % len(names)])
    switch_s = (time.perf_counter() - t0) / n_switch
    cfg_t0 = time.perf_counter()
    for i in range(200):
        em.set_subnet({"width": 0.5 if i % 2 else 1.0})
    switch_cfg_s = (time.perf_counter() - cfg_t0) / 200

    smallest = names[-1]
    dense = em.extract(smallest).eval()
    em.set_subnet(smallest)
    t_sub_el, t_sub_dense = paired(em, dense, x, args.rounds, args.reps)
    em.set_subnet("full")

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.safetensors")
        elasticize.save(em, path)
        manifest = elasticize.read_manifest(path)
        full_bytes = manifest["presets"]["full"]["bytes"]
        sub_bytes = manifest["presets"][smallest]["bytes"]
        loads, subs = [], []
        for _ in range(5):
            t0 = time.perf_counter()
            elasticize.load(path)
            loads.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            elasticize.load_subnet(path, smallest)
            subs.append(time.perf_counter() - t0)
        t_load, t_sub = statistics.median(loads), statistics.median(subs)
        file_bytes = os.path.getsize(path)

    print(f"conversion                                  {convert_s:8.3f} s")
    print(f"largest sub-network / original latency      {t_el / t_orig:8.3f}x  ({t_el * 1e3:.1f} ms vs {t_orig * 1e3:.1f} ms)")
    print(f"switch time (preset name)                   {switch_s * 1e3:8.4f} ms")
    print(f"switch time (config dict, validated)        {switch_cfg_s * 1e3:8.4f} ms")
    print(f"extracted {smallest} / elastic at {smallest} latency  {t_sub_dense / t_sub_el:8.3f}x  "
          f"({t_sub_dense * 1e3:.1f} ms vs {t_sub_el * 1e3:.1f} ms; {100 * em.macs(smallest) / em.macs():.1f}% of full MACs)")
    print(f"load_subnet({smallest}) / full load: bytes  {sub_bytes / full_bytes:8.3f}  ({sub_bytes:,} of {full_bytes:,}; "
          f"file {file_bytes:,})")
    print(f"load_subnet({smallest}) / full load: time   {t_sub / t_load:8.3f}  ({t_sub:.3f} s vs {t_load:.3f} s)")
    ratio = t_sub / t_load
    rows = [
        ["conversion (`elasticize(model)`, including the run of the smallest sub-network that checks it)",
         f"{convert_s:.2f} s", "NVIDIA ModelOpt 0.47 AutoNAS measured 0.91 s"],
        ["largest sub-network / original latency",
         f"{t_el / t_orig:.3f}x ({t_el * 1e3:.1f} ms vs {t_orig * 1e3:.1f} ms)", "<= 1.03 (ModelOpt: 1.08x)"],
        ["sub-network switch, preset name", f"{switch_s * 1e3:.3f} ms", "<= 0.5 ms (ModelOpt: 2.5 ms)"],
        ["sub-network switch, validated config dict", f"{switch_cfg_s * 1e3:.3f} ms", ""],
        [f"extracted `{smallest}` / elastic at `{smallest}` latency",
         f"{t_sub_dense / t_sub_el:.3f}x ({t_sub_dense * 1e3:.1f} ms vs {t_sub_el * 1e3:.1f} ms; "
         f"{100 * em.macs(smallest) / em.macs():.1f}% of full MACs)", "<= 1.0"],
        [f'`load_subnet("{smallest}")` / full `load`, bytes read',
         f"{sub_bytes / full_bytes:.3f} ({sub_bytes / 1e6:.1f} MB of {full_bytes / 1e6:.1f} MB)", "<= 0.4"],
        [f'`load_subnet("{smallest}")` / full `load`, seconds', f"{ratio:.2f} ({t_sub:.3f} s vs {t_load:.3f} s)",
         "<= 0.4" + ("" if ratio <= 0.4 else " (not met)")],
    ]
    _results.write(__file__, [_results.table(["measure", "result", "target"], rows,
                                             title=f"timm {args.model} (random weights), CPU, batch {args.batch}, "
                                                   "224x224, fp32")],
                   dest=args.results, machine_text=_results.machine(args.threads))


if __name__ == "__main__":
    main()
