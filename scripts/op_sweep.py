"""The op sweep behind the audited op table (issue 19, part 3): which ops the analysis meets in real models.

It traces a representative set of models the way the analysis does (:func:`elasticize.graph.tracing.trace`,
``torch.fx`` with the rule-handled modules as leaves, else ``torch.export``), collects the canonical name
(:func:`elasticize.graph.ops.canonical`) of every ``call_function`` / ``call_method`` node, adds every public
function of ``torch.nn.functional``, and writes ``elasticize/graph/ops/audit.json``: op -> the sources it
was seen in. The docs' op table is generated from that file and the handler registry, and
``tests/test_ops.py`` checks the registry has a row (handled or fixed with its reason) for every op in it.

    python scripts/op_sweep.py [--out elasticize/graph/ops/audit.json]   # several minutes on 2 cores

The models: every timm and torchvision row of ``benchmarks/bench_coverage.py`` (at a small input where
the model accepts one), every family of ``benchmarks/bench_hf_coverage.py`` (tiny configs), and the RNN
and TAC models of the tests (``tests/rnn_models.py``, :mod:`elasticize.tac`). Random weights throughout.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "tests")]

from elasticize.graph.ops import canonical  # noqa: E402
from elasticize.graph.tracing import trace  # noqa: E402
from elasticize.rules import find_rule  # noqa: E402

#: helpers of torch.nn.functional that are not ops
_NOT_OPS = {"Optional", "assert_int_or_pair", "boolean_dispatch", "handle_torch_function", "has_torch_function",
            "has_torch_function_unary", "has_torch_function_variadic"}


def functional_ops() -> list[str]:
    """Canonical names of every public function of ``torch.nn.functional`` (``relu_`` is ``relu``)."""
    names = set()
    for n in dir(F):
        f = getattr(F, n)
        if n.startswith("_") or n in _NOT_OPS or inspect.isclass(f) or inspect.ismodule(f) or not callable(f):
            continue
        names.add(n[:-1] if n.endswith("_") else n)
    return sorted(names)


def graph_ops(model: torch.nn.Module, inputs: tuple) -> set[str]:
    """Canonical names of the ops the analysis's trace of ``model`` holds."""
    t = trace(model.eval(), inputs, find_rule)
    return {canonical(n) for n in t.graph.nodes if n.op in ("call_function", "call_method")}


def _vision(spec: str) -> tuple[torch.nn.Module, tuple]:
    from elasticize.adapters import get_adapter, resolve_spec

    family, name = resolve_spec(spec)
    a = get_adapter(family)
    model = a.build(name, pretrained=False, kwargs={}).eval()
    x = a.example_inputs(model)[0]
    return model, (x[:1],)


def _hf(model_type: str) -> tuple[torch.nn.Module, tuple]:
    from bench_hf_coverage import tiny

    model = tiny(model_type)
    model.config.use_cache = False  # a decoder's cache object does not trace
    return model, (torch.randint(3, 128, (1, 8)),)


def _rnn(name: str) -> tuple[torch.nn.Module, tuple]:
    import rnn_models

    from elasticize.tac import linear_to_tac

    if name == "tac":
        net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU(),
                                  torch.nn.Linear(16, 5))
        linear_to_tac(net, ["2"], num_modules=3)
        return net, (torch.randn(4, 3, 8),)
    m = getattr(rnn_models, name)()
    return m, m.example_inputs()


def sources() -> dict[str, list[tuple[str, object]]]:
    from bench_coverage import MODELS
    from bench_hf_coverage import FAMILIES

    return {"timm": [(s, lambda s=s: _vision(s)) for s in MODELS if s.startswith("timm:")],
            "torchvision": [(s, lambda s=s: _vision(s)) for s in MODELS if s.startswith("torchvision:")],
            "transformers": [(f, lambda f=f: _hf(f)) for f in FAMILIES],
            "rnn/tac": [(n, lambda n=n: _rnn(n)) for n in ("TokenTagger", "ResRNNStack", "NestedLSTMStack", "tac")]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "elasticize" / "graph" / "ops" / "audit.json"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    seen: dict[str, set[str]] = {n: {"torch.nn.functional"} for n in functional_ops()}
    models, failed = {}, {}
    for source, entries in sources().items():
        for name, build in entries:
            t0 = time.perf_counter()
            try:
                model, inputs = build()
                ops = graph_ops(model, inputs)
            except Exception as e:  # noqa: BLE001 - a model that does not build or trace is listed, not fatal
                failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                print(f"{name}: FAILED {failed[name]}", flush=True)
                continue
            models.setdefault(source, []).append(name)
            for o in ops:
                seen.setdefault(o, set()).add(source)
            print(f"{name}: {len(ops)} ops, {time.perf_counter() - t0:.1f} s", flush=True)
    out = {"about": "written by scripts/op_sweep.py: op -> the sources it was seen in (see that script)",
           "torch": torch.__version__, "models": models, "failed": failed,
           "ops": {k: sorted(v) for k, v in sorted(seen.items())}}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"{len(seen)} ops -> {args.out}")


if __name__ == "__main__":
    main()
