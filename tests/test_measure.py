"""elasticize eval / ElasticModel.evaluate, bias compensation, measured budget picks and the solver."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner

import elasticize
from elasticize.batches import forward_batch
from elasticize.calibration import consumer_means
from elasticize.cli import main
from elasticize.train.losses import mean_pooled
from toy_models import DigitsResNet, digits

from conftest import scratch_dir  # noqa: E402


def digit_batches(n: int = 4, size: int = 32):
    """Labelled batches of real scikit-learn digits, ``(x (batch, 1, 8, 8), y (batch,))``: the eval ``--data`` function."""
    x, y, _, _ = digits()
    return [(x[i * size:(i + 1) * size], y[i * size:(i + 1) * size]) for i in range(n)]


def _bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    m = BertModel(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=48, max_position_embeddings=40)).eval()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 99, (8, 12), generator=g),
                "attention_mask": torch.ones(8, 12, dtype=torch.long)} for _ in range(4)]
    return m, batches


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """A digits CNN file, and the same file measured by `elasticize eval` (candidates, a budget pick, CSV/JSON/PNG)."""
    with scratch_dir(tmp_path_factory, "measure") as d:
        model = d / "digits.safetensors"
        res = CliRunner().invoke(main, ["convert", "toy_models:DigitsResNet", "--kwarg", "c=8", "--kwarg", "blocks=1",
                                        "--no-pretrained",
                                        "-o", str(model)])
        assert res.exit_code == 0, res.output
        out = d / "measured.safetensors"
        args = ["eval", "--trust-remote-code", str(model), "--data", "test_measure:digit_batches", "-o", str(out),
                "--candidates", "3", "--min-time", "0.01", "--budgets", "50%", "--refine-rounds", "1", "--csv", str(d / "r.csv"), "--json", str(d / "r.json"),
                "--plot", str(d / "pareto.png")]
        res = CliRunner().invoke(main, args, catch_exceptions=False)
        assert res.exit_code == 0, res.output
        yield d, model, out


def test_eval_writes_table_csv_json_png_and_manifest(measured):
    d, model, out = measured
    record = json.loads((d / "r.json").read_text())
    assert record["metric"] == "accuracy" and record["device"] == "cpu" and record["batch_size"] == 1
    names = {r["name"] for r in record["results"]}
    assert {"full", "budget-50"} <= names and None in names
    assert all(r["latency_s"] > 0 and r["peak_bytes"] > 0 for r in record["results"])
    lines = (d / "r.csv").read_text().splitlines()
    assert lines[0].split(",")[:4] == ["name", "macs", "params", "accuracy"] and len(lines) == len(record["results"]) + 1
    assert (d / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    em = elasticize.load(out, trust_remote_code=True)
    assert em.measurements["cpu/bs1"]["results"] == record["results"]
    assert "measurements" not in elasticize.checkpoint.read_manifest(model)  # the input is untouched
    budget = em.macs("budget-50")
    assert budget <= 0.5 * em.macs(None)


def test_measurements_per_device_round_trip(measured, tmp_path):
    _, _, out = measured
    em = elasticize.load(out, trust_remote_code=True)
    other = dict(em.measurements["cpu/bs1"], device="cuda", batch_size=8)
    em.measurements["cuda/bs8"] = other
    path = elasticize.save(em, tmp_path / "two.safetensors")
    back = elasticize.load(path, trust_remote_code=True)
    assert set(back.measurements) == {"cpu/bs1", "cuda/bs8"} and back.measurements["cuda/bs8"] == other
    bad = dict(other, results=[dict(other["results"][0], macs=1)])
    em.measurements["cuda/bs8"] = bad
    path = elasticize.save(em, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="macs"):
        elasticize.load(path, trust_remote_code=True)


def test_budget_picks_never_worse_than_best_measured_preset(measured):
    _, _, out = measured
    em = elasticize.load(out, trust_remote_code=True)
    rows = em.measurements["cpu/bs1"]["results"]
    lo, hi = min(r["macs"] for r in rows), em.macs(None)
    for i in range(10):
        budget = int(lo + (hi - lo) * i / 9)
        name, cfg = em.select(max_macs=budget, with_name=True)
        got = next(r["accuracy"] for r in rows if em.resolve(r["config"]) == cfg)
        presets = [r["accuracy"] for r in rows if r["name"] and r["macs"] <= budget]
        assert em.macs(cfg) <= budget and got >= max(presets, default=0.0)
        assert name == next((r["name"] for r in rows if em.resolve(r["config"]) == cfg), None)


def test_extract_measured_file_and_unmeasured_warning(measured, tmp_path):
    _, model, out = measured
    res = CliRunner().invoke(main, ["extract", "--trust-remote-code", str(model), "--max-macs", "50%",
                                                    "-o", str(tmp_path / "a.safetensors")])
    assert res.exit_code == 0 and "elasticize eval" in res.stderr
    res = CliRunner().invoke(main, ["extract", "--trust-remote-code", str(out), "--max-macs", "50%",
                                                    "-o", str(tmp_path / "b.safetensors")])
    assert res.exit_code == 0 and "elasticize eval" not in res.stderr, res.stderr
    # a latency share is of the full network's latency in eval's record (not of training metrics)
    res = CliRunner().invoke(main, ["extract", "--trust-remote-code", str(out), "--max-latency", "100%",
                                    "-o", str(tmp_path / "c.safetensors")])
    assert res.exit_code == 0 and "measurement cpu/bs1" in res.output, res.output
    res = CliRunner().invoke(main, ["extract", "--trust-remote-code", str(model), "--max-latency", "50%",
                                    "-o", str(tmp_path / "d.safetensors")])
    assert res.exit_code == 1 and "elasticize eval" in res.output and not (tmp_path / "d.safetensors").exists()


def test_bad_data_is_one_line_and_writes_nothing(measured, tmp_path):
    _, model, _ = measured
    out = tmp_path / "m.safetensors"
    for data in (str(tmp_path / "missing"), "no_such_module_xyz:batches"):
        res = CliRunner().invoke(main, ["eval", "--trust-remote-code", str(model), "--data", data, "-o", str(out),
                                        "--csv", str(tmp_path / "r.csv")])
        assert res.exit_code == 1 and res.output.count("\n") == 1 and "Error" in res.output, res.output
        assert not list(tmp_path.iterdir())


def test_bias_compensation_identity_at_full_and_reduces_error():
    m, batches = _bert()
    em = elasticize.elasticize(m, (batches[0]["input_ids"][:1],))
    x = batches[0]
    with torch.no_grad():
        full = em(**x).last_hidden_state
        truncated = {n: em.extract(n)(**x).last_hidden_state for n in ("large", "medium")}
    means, skipped = consumer_means(em.model, em.plan, batches, forward_batch)
    assert len(means) == 4 and not skipped  # attention.output.dense and output.dense of each layer
    em.set_compensation(means)
    with torch.no_grad():
        assert torch.equal(em(**x).last_hidden_state, full)
        for n, t in truncated.items():
            em.set_subnet(n)
            comp = em(**x).last_hidden_state
            assert (comp - full).pow(2).mean() < 0.8 * (t - full).pow(2).mean()
            assert torch.allclose(em.extract(n)(**x).last_hidden_state, comp, atol=1e-5)
    em.set_subnet(None)
    assert torch.equal(dict(em.model.named_parameters())["encoder.layer.0.output.dense.bias"],
                       m.encoder.layer[0].output.dense.bias)


def test_compensation_file_round_trip_and_load_subnet(tmp_path):
    from transformers import BertModel

    m, batches = _bert()
    em = elasticize.elasticize(m, (batches[0]["input_ids"][:1],))
    plain = elasticize.save(em, tmp_path / "plain.safetensors")
    manifest = elasticize.checkpoint.read_manifest(plain)
    assert manifest["format_version"] <= 3 and "bias_compensation" not in manifest  # data-free: as before
    rec = elasticize.evaluate(em, batches[2:], calibration=batches[:2], metric="cosine", output_fn=mean_pooled, latency=False)
    assert rec["calibration"].endswith("bias compensation") and em.compensation.presets
    path = elasticize.save(em, tmp_path / "comp.safetensors")
    x = batches[0]
    with torch.no_grad():
        em.set_subnet("medium")
        want = em(**x).last_hidden_state
        dense = elasticize.load_subnet(path, "medium", model=BertModel(copy.deepcopy(m.config)))
        assert torch.allclose(dense(**x).last_hidden_state, want, atol=1e-5)
        back = elasticize.load(path, model=BertModel(copy.deepcopy(m.config)))
        back.set_subnet("medium")
        assert torch.allclose(back(**x).last_hidden_state, want, atol=1e-5)
        back.add_preset("mine", {"width": 0.25})  # kept consistent: the new preset is compensated too
        assert "mine" in back.compensation.presets


def test_solver_pick_within_budget_and_nested():
    from elasticize.measure.evaluate import _Scorer, _score_with_compensation
    from elasticize.measure.solver import sensitivities, solve, solve_checked
    from elasticize.train.evaluation import METRICS

    m, batches = _bert()
    em = elasticize.elasticize(m, (batches[0]["input_ids"][:1],))
    score = _score_with_compensation(em, _Scorer(em, batches[:2], METRICS["cosine"], mean_pooled, torch.device("cpu")),
                                     False)
    sens = sensitivities(em, score)
    assert set(sens["drops"]) == {f"{d}/{n}" for d, t in em.space.dimensions.items() for n, c in t.items()
                                  if len(c) > 1}
    for share in (0.3, 0.5, 0.8):
        cfg, pred = solve(em, sens, max_macs=share * em.macs(None))
        assert em.macs(cfg) <= share * em.macs(None) and pred <= sens["base"] + 1e-9
        assert em.resolve(cfg) == cfg
    with pytest.raises(ValueError, match="no sub-network within"):
        solve(em, sens, max_macs=10)
    # checked by measuring: never worse, measured, than the best predicted pick or the uniform extras
    picks = solve(em, sens, max_macs=0.4 * em.macs(None), every_depth=True)
    assert [p[1] for p in picks] == sorted((p[1] for p in picks), reverse=True) and len(picks) > 1
    uniform = [c for c in em.space.candidates() if em.macs(c) <= 0.4 * em.macs(None)][:2]
    cfg, got = solve_checked(em, sens, score, max_macs=0.4 * em.macs(None), extra=uniform)
    assert em.macs(cfg) <= 0.4 * em.macs(None) and got == score(cfg)
    assert got >= max(score(c) for c in [picks[0][0], *uniform])


def test_refine_moves_an_over_budget_start_within_and_never_loses():
    """The local step: from a uniform sub-network just over the budget, re-linearised picks are within it,
    and a start within it is never measured worse after refining."""
    from elasticize.measure.evaluate import _Scorer, _score_with_compensation
    from elasticize.measure.solver import refine, sensitivities, solve_checked
    from elasticize.train.evaluation import METRICS

    m, batches = _bert()
    em = elasticize.elasticize(m, (batches[0]["input_ids"][:1],))
    score = _score_with_compensation(em, _Scorer(em, batches[:2], METRICS["cosine"], mean_pooled, torch.device("cpu")),
                                     False)
    budget = 0.4 * em.macs(None)
    over = [c for c in em.space.candidates() if em.macs(c) > budget][-1]
    cfg, got = refine(em, score, over, max_macs=budget)
    assert em.macs(cfg) <= budget and got == score(cfg) and em.resolve(cfg) == cfg
    within = [c for c in em.space.candidates() if em.macs(c) <= budget][0]
    cfg2, got2 = refine(em, score, within, max_macs=budget, rounds=2)
    assert em.macs(cfg2) <= budget and got2 >= score(within)
    # solve_checked refines its best measured pick: never worse than without refining
    sens = sensitivities(em, score)
    plain = solve_checked(em, sens, score, max_macs=budget, refine_rounds=0)
    refined = solve_checked(em, sens, score, max_macs=budget)
    assert refined[1] >= plain[1] and em.macs(refined[0]) <= budget
    with pytest.raises(ValueError, match="give max_macs"):
        refine(em, score, over)


def test_training_recomputes_stale_bias_compensation():
    """After training, a calibrated model's compensation means are taken afresh (the trainer's
    recalibration), so each preset's compensated biases fit the trained weights."""
    from elasticize.train import Trainer, mean_pooled as pooled

    m, batches = _bert()
    em = elasticize.elasticize(m, (batches[0]["input_ids"][:1],))
    em.calibrate_compensation(batches)
    before = {k: v.clone() for k, v in em.compensation.means.items()}
    tr = Trainer(em, batches, optimizer=torch.optim.AdamW(em.parameters(), lr=1e-2), distill=copy.deepcopy(m),
                 output_fn=pooled, calibration_batches=4)
    tr.train_steps(4)
    assert all(torch.equal(before[k], v) for k, v in em.compensation.means.items())  # training alone leaves them
    tr.recalibrate()
    fresh, _ = consumer_means(em.model, em.plan, batches, forward_batch)
    assert any(not torch.allclose(before[k], v) for k, v in em.compensation.means.items())
    for k, v in em.compensation.means.items():
        assert torch.allclose(v, fresh[k], atol=1e-6), k


def test_latency_budget_picks_a_timed_subnetwork(monkeypatch):
    """A measured-latency budget (``--budgets 5ms`` on the command line; here a share of the full network's):
    the pick timed within it when it was chosen, and is smaller than the full network; a budget below the
    smallest sub-network's time is a clear error."""
    import importlib

    from elasticize.cli.eval import _budgets
    from elasticize.measure.solver import solve_latency
    from elasticize.space import parse_budget

    ev = importlib.import_module("elasticize.measure.evaluate")  # the module (the package exports the function)
    torch.manual_seed(0)
    # wide enough at 32x32 that compute, not per-call overhead, sets the latency
    data = [(torch.nn.functional.interpolate(x, size=32), y) for x, y in digit_batches(5, size=16)]
    em = elasticize.elasticize(DigitsResNet(c=32, blocks=1).eval(), (data[0][0][:1],), dims=("width",))
    timed, real = [], ev._latency

    def spy(dense, batch, threads, min_time):
        timed.append(real(dense, batch, threads, min_time))
        return timed[-1]

    monkeypatch.setattr(ev, "_latency", spy)
    record = elasticize.evaluate(em, data[3:], calibration=data[:3], budgets=[parse_budget("60%", kind="latency")],
                                 min_time=0.005, batch_size=16, refine_rounds=1)
    assert "budget-60-latency" in em.presets and em.macs("budget-60-latency") < em.macs(None)
    assert any(r["name"] == "budget-60-latency" and "latency_s" in r for r in record["results"])
    assert len(timed) > 5  # the full network, the smallest, the bisection's picks and the final check were timed
    with pytest.raises(ValueError, match="smallest sub-network takes"):  # before any sensitivity is used
        solve_latency(em, {}, lambda cfg: 0.0, lambda cfg: 2e-3, 1e-3)
    kinds = [b.kind for b in _budgets(None, None, "25%, 5ms,1.2G,800us")]
    assert kinds == ["macs", "latency", "macs", "latency"]
