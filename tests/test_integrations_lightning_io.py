"""elasticize.integrations.lightning_io: Lightning checkpoints as safetensors + JSON, resumed with ckpt_path="last"."""

from __future__ import annotations

import pytest
import torch

pl = pytest.importorskip("pytorch_lightning")

from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO  # noqa: E402
from toy_models import digits  # noqa: E402

from elasticize.integrations.checkpoint_dict import load_checkpoint_dict  # noqa: E402
from elasticize.integrations.lightning import SafetensorsCheckpointIO  # noqa: E402


class Digits(pl.LightningModule):
    def __init__(self, width: int = 16, extra=None):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, width), torch.nn.ReLU(),
                                       torch.nn.Linear(width, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2, betas=(0.8, 0.95))
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _loader():
    x, y, _, _ = digits()
    # 4 steps an epoch, in order: a run resumed at step 4 sees the batches the uninterrupted run sees
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:32], y[:32]), batch_size=8)


def _fit(root, max_steps, ckpt_path=None, module=None, **ckpt):
    torch.manual_seed(0)
    module = module or Digits()
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(root), plugins=[SafetensorsCheckpointIO()],
                         callbacks=[pl.callbacks.ModelCheckpoint(dirpath=str(root / "ckpt"), **ckpt)])
    trainer.fit(module, _loader(), ckpt_path=ckpt_path)
    return module, trainer


def test_resume_from_last_equals_the_uninterrupted_run(tmp_path):
    full, _ = _fit(tmp_path / "full", 6, every_n_train_steps=2, save_last=True)
    _fit(tmp_path / "b", 4, every_n_train_steps=2, save_last=True, save_top_k=1)
    names = sorted(p.name for p in (tmp_path / "b" / "ckpt").iterdir())
    assert names == ["epoch=0-step=4.ckpt", "last.ckpt"]  # step=2 removed through remove_checkpoint
    state = load_checkpoint_dict(tmp_path / "b" / "ckpt" / "last.ckpt")
    assert state["global_step"] == 4 and state["hyper_parameters"] == {"width": 16, "extra": None}
    assert state["optimizer_states"][0]["param_groups"][0]["betas"] == (0.8, 0.95)
    assert state["lr_schedulers"][0]["last_epoch"] == 4
    resumed, trainer = _fit(tmp_path / "b", 6, ckpt_path="last", every_n_train_steps=2, save_last=True)
    assert trainer.global_step == 6
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-2 * 0.25)
    for (k, v), w in zip(resumed.state_dict().items(), full.state_dict().values()):
        assert torch.allclose(v, w, atol=1e-6), k


def test_an_object_in_the_hyper_parameters_is_refused_and_no_checkpoint_written(tmp_path):
    with pytest.raises(TypeError, match=r"hyper_parameters.extra is of type object, .*without pickle.*save_hyperparameters\(ignore"):
        _fit(tmp_path, 2, module=Digits(extra=object()), every_n_train_steps=2)
    assert list((tmp_path / "ckpt").glob("*")) == []  # no checkpoint, no temporary file (hidden names too)


def test_a_lightning_pickle_checkpoint_is_refused_unread(tmp_path, monkeypatch):
    _, trainer = _fit(tmp_path, 2, every_n_train_steps=2)
    (ours,) = (tmp_path / "ckpt").glob("*.ckpt")
    theirs = tmp_path / "torch.ckpt"
    TorchCheckpointIO().save_checkpoint(load_checkpoint_dict(ours), theirs)  # the same checkpoint as Lightning pickles it

    def refuse(*a, **k):
        raise AssertionError("unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    io = SafetensorsCheckpointIO()
    with pytest.raises(ValueError, match="not a safetensors checkpoint: it is a zip archive.*never unpickles"):
        io.load_checkpoint(theirs)
    with pytest.raises(TypeError, match="storage_options"):
        io.save_checkpoint({}, tmp_path / "x.ckpt", storage_options={"a": 1})
    assert io.load_checkpoint(ours, map_location="cpu")["global_step"] == 2
    io.remove_checkpoint(ours)
    io.remove_checkpoint(ours)  # a missing file is nothing to remove, as in TorchCheckpointIO
    assert not ours.exists()
