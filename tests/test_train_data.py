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
