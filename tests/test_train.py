"""The sorted trainer on real data (scikit-learn digits): strategies, BN recalibration, resume, DDP, selection."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import elasticize
from elasticize.train import SubnetSampler, Trainer, make_strategy, recalibrate_bn, split_batch

sys.path.insert(0, str(Path(__file__).parent))
from toy_models import DigitsResNet, DigitsTransformer, digits  # noqa: E402

DATA = digits()


def _model(seed: int = 0, c: int = 8, **kw) -> elasticize.ElasticModel:
    torch.manual_seed(seed)
    m = DigitsResNet(c=c)
    return elasticize.elasticize(m, **kw)


def _loader(batch_size: int = 64) -> DataLoader:
    x, y, _, _ = DATA
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def _held_out() -> list:
    _, _, x, y = DATA
    return list(DataLoader(TensorDataset(x, y), batch_size=300))


def _task_loss(em, configs, x, y) -> float:
    """Mean cross-entropy of ``configs`` on a fixed batch, BatchNorm on batch statistics (no gradients)."""
    em.train()
    total = 0.0
    with torch.no_grad():
        for c in configs:
            with em.subnet(c):
                total += nn.functional.cross_entropy(em(x), y).item()
    return total / len(configs)


@pytest.mark.parametrize("strategy,options", [
    ("sortednet", {"accumulate": 2}),
    ("sortednet", {"objective": "stochastic-summation"}),
    ("subnetwork-to-go", {}),
    ("sandwich", {"n": 1}),
    ("skip-aware", {}),
    ("full", {}),
])
def test_every_strategy_lowers_its_loss(strategy, options):
    depth_mode = "skippable" if strategy == "skip-aware" else "prefix"
    em = _model(c=16, dims=("width", "depth"), depth_mode=depth_mode)
    tr = Trainer(em, _loader(), optimizer=torch.optim.AdamW(em.parameters(), 3e-3), loss_fn=nn.CrossEntropyLoss(),
                 strategy=strategy, strategy_options=options)
    _, _, xt, yt = DATA
    probe = [c for c in (tr.sampler.largest(), tr.sampler.smallest())
             if strategy != "full" or c == tr.sampler.largest()]
    before = _task_loss(em, probe, xt, yt)
    recs = tr.train_steps(30)
    after = _task_loss(em, probe, xt, yt)
    assert after < 0.8 * before, (before, after)
    labels = {k for r in recs for k in r["losses"]}
    expected = {"sortednet": {"sampled"}, "subnetwork-to-go": {"full", "random"}, "sandwich": {"max", "min", "rand1"},
                "skip-aware": {"super", "base"}, "full": {"full"}}[strategy]
    assert expected <= labels


def test_sandwich_trains_a_pytorch_transformer_into_good_subnetworks():
    """nn.TransformerEncoder (residual width with its heads, FFN widths, depth) on digits: after the same
    300 updates, the sandwich rule's sub-networks beat truncations of a full-only run by far."""
    x, y, xt, yt = DATA
    acc = {}
    for strategy in ("full", "sandwich"):
        torch.manual_seed(0)
        em = elasticize.elasticize(DigitsTransformer(), x[:2])
        loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
        Trainer(em, loader, optimizer=torch.optim.AdamW(em.parameters(), 3e-3), loss_fn=nn.CrossEntropyLoss(),
                strategy=strategy).train_steps(300)
        em.eval()
        with torch.no_grad():
            for p in em.presets:
                with em.subnet(p):
                    acc[strategy, p] = (em(xt).argmax(1) == yt).float().mean().item()
    assert em.macs("tiny") < 0.05 * em.macs("full") and em.plan.group("inp:out").unit == 8
    assert acc["full", "full"] > 0.85 and acc["sandwich", "full"] > 0.85
    assert acc["sandwich", "medium"] > acc["full", "medium"] + 0.2, acc
    assert acc["sandwich", "tiny"] > acc["full", "tiny"] + 0.3, acc


def test_sampler_is_eq1_and_resumable():
    em = _model(dims=("width", "depth"))
    s = SubnetSampler(em.space, seed=3)
    first = [s.sample() for _ in range(5)]
    state = s.state_dict()
    nxt = [s.sample() for _ in range(5)]
    s2 = SubnetSampler(em.space, seed=99)
    s2.load_state_dict(state)
    assert [s2.sample() for _ in range(5)] == nxt
    # one index per dimension: every width group is at the same choice index
    for cfg in first + nxt:
        idx = {em.space.width[g].index(v) for g, v in cfg["width"].items()}
        assert len(idx) == 1
    # a distribution that puts all mass on one choice
    s3 = SubnetSampler(em.space, distribution={"width": [0, 0, 1, 0]})
    assert {tuple(s3.sample()["width"].values()) for _ in range(10)} == {tuple(s3.at({"width": 2})["width"].values())}
    with pytest.raises(ValueError, match="non-negative"):
        SubnetSampler(em.space, distribution={"width": [1, 2]})
    with pytest.raises(KeyError, match="strategies"):
        make_strategy("slimmable")


def test_batches_tensor_tuple_mapping():
    x, y = torch.zeros(2, 3), torch.ones(2)
    assert split_batch(x) == ((x,), {}, None)
    assert split_batch((x, y))[2] is y
    args, kwargs, target = split_batch({"input_ids": x, "attention_mask": x, "labels": y})
    assert args == () and set(kwargs) == {"input_ids", "attention_mask"} and target is y
    with pytest.raises(TypeError, match="a batch must be"):
        split_batch("text")


def test_hidden_distillation_pools_like_sentence_embeddings():
    from elasticize.train import hidden_distillation, masked_hidden, mean_pooled
    from elasticize.train.trainer import METRICS

    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": mask}
    out_s, out_t = {"last_hidden_state": torch.randn(2, 4, 8)}, {"last_hidden_state": torch.randn(2, 4, 8)}
    s, t = masked_hidden(out_s, batch), masked_hidden(out_t, batch)
    assert s[0, 3].abs().sum() == 0 and s[1, 2:].abs().sum() == 0  # padding zeroed
    ref = nn.functional.cosine_similarity(mean_pooled(out_s, batch), mean_pooled(out_t, batch), dim=-1)
    assert torch.allclose(METRICS["cosine"](s, None, t), ref, atol=1e-6)
    assert hidden_distillation(t, t).item() == pytest.approx(0.0, abs=1e-6)
    assert hidden_distillation(s, t).item() > (1 - ref).mean().item()  # the token term adds to the sentence term
    with pytest.raises(ValueError, match="masked_hidden"):
        hidden_distillation(s.sum(1), t.sum(1))


def test_bn_recalibration_changes_only_bn_statistics(tmp_path):
    em = _model(dims=("width",))
    tr = Trainer(em, _loader(), optimizer=torch.optim.SGD(em.parameters(), 0.05), loss_fn=nn.CrossEntropyLoss())
    tr.train_steps(5)
    before = {k: v.clone() for k, v in em.model.state_dict().items()}
    stats = recalibrate_bn(em, _loader(), num_batches=3)
    assert set(stats) == set(em.presets)
    with em.trained_bn_stats():
        after = em.model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)  # trained values untouched
    em.set_subnet("medium")
    live = em.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], live[k])}
    assert changed and all(k.endswith(("running_mean", "running_var")) for k in changed)
    # presets get different statistics, sliced to their width
    mean_key = "stage1.0.bn1.running_mean"  # its input channels depend on the width
    assert stats["tiny"][mean_key].shape[0] < stats["full"][mean_key].shape[0]
    assert not torch.allclose(stats["full"][mean_key][:2], stats["tiny"][mean_key][:2])
    # the file keeps each preset's statistics; load, load_subnet and extract use them
    path = tmp_path / "m.safetensors"
    elasticize.save(em, path)
    assert elasticize.read_manifest(path)["format_version"] == 2
    em2 = elasticize.load(path, model=DigitsResNet(c=8))
    _, _, xt, _ = DATA
    em.eval()
    for p in em.presets:
        with torch.no_grad(), em.subnet(p), em2.subnet(p):
            ref = em(xt[:16])
            assert torch.allclose(em2(xt[:16]), ref, atol=1e-5)
            assert torch.allclose(em.extract(p).eval()(xt[:16]), ref, atol=1e-5)
            sub = elasticize.load_subnet(path, p, model=DigitsResNet(c=8))
            assert torch.allclose(sub(xt[:16]), ref, atol=1e-5)
    # without calibrated statistics the file stays format 1
    em.set_bn_stats({})
    elasticize.save(em, tmp_path / "plain.safetensors")
    assert elasticize.read_manifest(tmp_path / "plain.safetensors")["format_version"] == 1


def test_resume_equals_uninterrupted(tmp_path):
    def run(steps, state=None, resume=None):
        em = _model(seed=1, dims=("width", "depth"))
        opt = torch.optim.Adam(em.parameters(), 1e-2)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 8)  # its position must resume too
        tr = Trainer(em, _loader(batch_size=128), optimizer=opt, loss_fn=nn.CrossEntropyLoss(), strategy="sortednet",
                     strategy_options={"accumulate": 2}, seed=5, scheduler=sched)
        if resume:
            tr.load_state(resume)
        tr.train_steps(steps, state_path=state)
        return em, tr

    full, _ = run(8)  # 8 steps x 2 micro-batches: crosses the 9-batch epoch boundary
    state = tmp_path / "state.safetensors"
    run(5, state=str(state))
    resumed, tr = run(3, resume=str(state))
    assert tr.step == 8
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit for bit (tests/test_resume.py: in a new process)
    # a state from another super-network is refused
    other = _model(dims=("width",))
    tr2 = Trainer(other, _loader(), optimizer=torch.optim.Adam(other.parameters()), loss_fn=nn.CrossEntropyLoss(),
                  strategy="sortednet", strategy_options={"accumulate": 2})
    with pytest.raises(ValueError, match="different super-network"):
        tr2.load_state(str(state))


def test_measured_presets_select_by_budget(tmp_path):
    em = _model(dims=("width",))
    tr = Trainer(em, _loader(), optimizer=torch.optim.AdamW(em.parameters(), 3e-3), loss_fn=nn.CrossEntropyLoss())
    tr.train_steps(20)
    res = tr.evaluate(_held_out(), metric="accuracy", latency=True)
    assert set(res) == set(em.presets) and all(0 <= r["accuracy"] <= 1 and r["latency_s"] > 0 for r in res.values())
    budget = em.macs("large") - 1
    best = max((n for n in em.presets if em.macs(n) <= budget), key=lambda n: res[n]["accuracy"])
    assert em.select(max_macs=budget, metric="accuracy") == em.resolve(best)
    slowest_ok = max(r["latency_s"] for r in res.values())
    assert em.select(max_latency_s=slowest_ok, metric="accuracy") == em.resolve(max(res, key=lambda n: res[n]["accuracy"]))
    with pytest.raises(ValueError, match="measured"):
        em.select(max_macs=1, metric="accuracy")
    path = tr.save(str(tmp_path / "m.safetensors"))
    m = elasticize.read_manifest(path)
    assert m["presets"]["tiny"]["metrics"]["accuracy"] == pytest.approx(res["tiny"]["accuracy"])


def test_named_preset_is_calibrated_measured_saved_and_partially_loadable(tmp_path):
    em = _model(dims=("width", "depth"))
    tr = Trainer(em, _loader(), optimizer=torch.optim.AdamW(em.parameters(), 3e-3), loss_fn=nn.CrossEntropyLoss())
    tr.train_steps(10)
    cfg = next(c for c in em.space.candidates() if c not in em.presets.values())
    em.add_preset("mine", cfg)
    macs = [em.macs(n) for n in em.presets]
    assert macs == sorted(macs, reverse=True)  # kept sorted by MACs
    with pytest.raises(ValueError, match="exists"):
        em.add_preset("mine", None)
    with pytest.raises(ValueError, match="exists"):
        em.add_preset("full", "tiny", replace=True)
    res = tr.evaluate(_held_out(), metric="accuracy")
    assert "mine" in res and "mine" in em.bn_stats  # recalibrated for the new preset too
    path = tr.save(str(tmp_path / "m.safetensors"))
    back = elasticize.load(path, model=DigitsResNet(c=8))
    assert back.resolve("mine") == em.resolve("mine") and back.metrics["mine"] == em.metrics["mine"]
    x = _held_out()[0][0][:16]
    with torch.no_grad(), em.subnet("mine"), back.subnet("mine"):
        ref, got = em(x), back(x)
        part = elasticize.load_subnet(path, "mine", model=DigitsResNet(c=8)).eval()(x)
    assert torch.allclose(got, ref, atol=1e-5) and torch.allclose(part, ref, atol=1e-5)


def _ddp_worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.utils.data.distributed import DistributedSampler

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        em = _model(seed=rank, dims=("width", "depth"))  # different init per rank: DDP broadcasts rank 0's
        x, y, _, _ = DATA
        ds = TensorDataset(x, y)
        loader = DataLoader(ds, batch_size=32, sampler=DistributedSampler(ds, world, rank, shuffle=True, seed=0))
        tr = Trainer(em, loader, optimizer=torch.optim.SGD(em.parameters(), 0.05, momentum=0.9),
                     loss_fn=nn.CrossEntropyLoss(), strategy="sortednet", strategy_options={"accumulate": 2},
                     seed=1000 + rank)  # rank 0's seed wins
        recs = tr.train_steps(6)
        save_file({k: v.contiguous() for k, v in em.model.state_dict().items()}, f"{out}/rank{rank}.safetensors")
        Path(f"{out}/rank{rank}.json").write_text(json.dumps([r["configs"] for r in recs]))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_ranks_sample_alike_and_end_alike(tmp_path):
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    init = f"file://{tmp_path}/rendezvous"
    mp.spawn(_ddp_worker, args=(2, init, str(tmp_path)), nprocs=2, join=True)
    c0, c1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert c0 == c1 and len({json.dumps(c) for step in c0 for c in step}) > 1  # same, and not all the same
    w0, w1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    single = _model(seed=0, dims=("width", "depth")).model.state_dict()
    assert not torch.equal(single["fc.weight"], w0["fc.weight"])  # it trained


def test_sampler_draws_tac_modules_with_depth_one_index_for_all_blocks():
    from rnn_models import ResRNNStack

    torch.manual_seed(0)
    m = ResRNNStack(depth=3, modules=4).eval()
    em = elasticize.elasticize(m, dims=("modules", "depth"), sort=None)
    s = SubnetSampler(em.space, seed=0)
    assert (s.levels["depth"], s.levels["modules"]) == (3, 4)
    cfgs = [s.sample() for _ in range(40)]
    assert all(len(set(c["modules"].values())) == 1 for c in cfgs)  # the same w in every block (one draw)
    assert {next(iter(c["modules"].values())) for c in cfgs} == {1, 2, 3, 4}
    assert s.smallest()["modules"] == {g: 1 for g in em.space.modules}


def test_max_grad_norm_clips_each_update():
    x, y, _, _ = DATA
    steps = {}
    for clip in (None, 0.01):
        em = _model(dims=("width",))
        before = [p.detach().clone() for p in em.parameters()]
        opt = torch.optim.SGD(em.parameters(), lr=1.0)
        tr = Trainer(em, [(x[:64], y[:64])], optimizer=opt, loss_fn=nn.CrossEntropyLoss(), strategy="full",
                     max_grad_norm=clip)
        tr.train_steps(1)
        steps[clip] = torch.cat([(p.detach() - b).flatten() for p, b in zip(em.parameters(), before)]).norm().item()
    assert steps[0.01] <= 0.01 + 1e-6 < steps[None]
    with pytest.raises(ValueError, match="max_grad_norm"):
        Trainer(em, [(x[:64], y[:64])], optimizer=opt, loss_fn=nn.CrossEntropyLoss(), max_grad_norm=0)


def test_always_trains_named_presets_every_step(tmp_path):
    _, _, xt, yt = DATA
    losses = {}
    for always in ((), ("tiny",)):
        em = _model(seed=2, dims=("width", "depth"))
        tr = Trainer(em, _loader(), optimizer=torch.optim.AdamW(em.parameters(), 3e-3), loss_fn=nn.CrossEntropyLoss(),
                     strategy="subnetwork-to-go", seed=3, always=always)
        recs = tr.train_steps(20, state_path=str(tmp_path / f"s{len(always)}.safetensors"))
        losses[always] = _task_loss(em, [em.resolve("tiny")], xt, yt)
    assert all(r["configs"][-1] == em.resolve("tiny") and "tiny" in r["losses"] for r in recs)
    tr = Trainer(em, _loader(), optimizer=torch.optim.AdamW(em.parameters(), 1e-4), loss_fn=nn.CrossEntropyLoss(),
                 strategy="subnetwork-to-go", always=["full"])  # named like the strategy's own "full" pass
    rec = tr.train_steps(1)[0]
    assert {"full", "full (always)"} <= set(rec["losses"]) and rec["configs"][0] == rec["configs"][-1]
    assert losses[("tiny",)] < losses[()], losses
    with pytest.raises(KeyError, match="preset"):
        Trainer(em, _loader(), optimizer=torch.optim.AdamW(em.parameters()), loss_fn=nn.CrossEntropyLoss(),
                always=["no-such-preset"])
    before = {k: v.clone() for k, v in em.model.state_dict().items()}
    with pytest.raises(ValueError, match="always"):  # a state trained with always=tiny, resumed without
        tr2 = Trainer(em, _loader(), optimizer=torch.optim.AdamW(em.parameters()), loss_fn=nn.CrossEntropyLoss(),
                      strategy="subnetwork-to-go")
        tr2.load_state(str(tmp_path / "s1.safetensors"))
    opt = torch.optim.AdamW(em.parameters())
    with pytest.raises(ValueError, match="without a learning-rate scheduler"):  # saved with none, resumed with one
        Trainer(em, _loader(), optimizer=opt, loss_fn=nn.CrossEntropyLoss(), strategy="subnetwork-to-go",
                always=["tiny"], scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(opt, 20)
                ).load_state(str(tmp_path / "s1.safetensors"))
    assert all(torch.equal(before[k], v) for k, v in em.model.state_dict().items())


def test_length_grouped_batches_cut_padding():
    from elasticize.train.data import length_grouped_batches

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from docstrings import stdlib_sentences

    lengths = [len(s.split()) for s in stdlib_sentences(every_sentence=True, modules="all")][:3000]
    groups = length_grouped_batches(lengths, 32, seed=1)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert groups == length_grouped_batches(lengths, 32, seed=1) != length_grouped_batches(lengths, 32, seed=2)
    padded = sum(max(lengths[i] for i in g) * len(g) for g in groups)
    random_order = [list(range(i, min(i + 32, len(lengths)))) for i in range(0, len(lengths), 32)]
    assert padded < 0.8 * sum(max(lengths[i] for i in g) * len(g) for g in random_order)
    with pytest.raises(ValueError, match="batch_size"):
        length_grouped_batches(lengths, 0)


def test_package_sentences_parse_docstrings_without_importing(tmp_path, monkeypatch):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from docstrings import package_sentences

    pkg = tmp_path / "unimported_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('"""A package whose import would fail loudly.\n\nSee ``f(x)`` and {x}."""\n'
                                     'raise RuntimeError("imported")\n')
    (pkg / "mod.py").write_text('def f():\n    """Return the answer to the question.\n\n    >>> f() == 42\n    """\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    got = package_sentences(("unimported_pkg", "no_such_package_here"))
    assert sorted(got) == ["A package whose import would fail loudly.", "Return the answer to the question."]
    assert "unimported_pkg" not in sys.modules
    assert package_sentences(("unimported_pkg",), exclude={got[0]}) == [got[1]]
    real = package_sentences(("click",))  # a dependency of elasticize: real docstrings
    assert len(real) > 300 and real == package_sentences(("click",)) != package_sentences(("click",), seed=1)
    assert all(s[0].isupper() and s[-1] in ".!?" and ">>>" not in s for s in real)


def test_amp_on_cpu_trains_in_bf16_and_measures_in_fp32():
    x, y, xt, yt = DATA
    seen = []

    def output_fn(out, batch):
        seen.append(out.dtype)
        return out

    em = _model(dims=("width",))
    tr = Trainer(em, [(x[:64], y[:64])], optimizer=torch.optim.AdamW(em.parameters(), 1e-3),
                 loss_fn=nn.CrossEntropyLoss(), strategy="full", amp=True, output_fn=output_fn)
    tr.train_steps(1)
    assert seen == [torch.bfloat16]
    tr.measure([(xt[:32], yt[:32])], None, metric="accuracy")
    assert seen[1:] == [torch.float32]
