"""The BSRNN example's model: depth x width sub-networks, extraction, MAC range (no espeak-ng needed)."""

from __future__ import annotations

import pytest
import torch

import elasticize
from conftest import max_diff
from examples import bsrnn_separation as ex


def test_bsrnn_depth_and_tac_width_are_elastic_and_extract_exactly():
    torch.manual_seed(0)
    model = ex.BSRNN(features=8, hidden=8, depth=4, modules=4).eval()
    x = torch.randn(2, 2000)
    with torch.no_grad():
        ref = model(x)
    em = elasticize.elasticize(model, x[:1], dims=("depth", "modules"), sort=None)
    assert em.space.depth == {"layers": [4, 3, 2, 1]} and len(em.space.modules) == 4
    with torch.no_grad():
        assert max_diff(em(x), ref) <= 1e-5
        for d, w in ((3, 2), (1, 1)):
            cfg = ex.subnet(em, d, w)
            with em.subnet(cfg):
                y = em(x)
            assert max_diff(em.extract(cfg)(x), y) <= 1e-5


def test_default_bsrnn_covers_a_20x_mac_range():
    em = ex.build()
    assert em.macs(None) / em.macs(ex.subnet(em, 1, 1)) >= 20


def test_si_sdr_is_scale_invariant_and_peaks_at_the_reference():
    ref = torch.sin(torch.linspace(0, 60, 800))[None]
    noisy = ref + 0.1 * torch.cos(torch.linspace(0, 170, 800))[None]
    assert ex.si_sdr(3 * ref, ref).item() > 60
    assert abs(ex.si_sdr(2 * noisy, ref).item() - ex.si_sdr(noisy, ref).item()) < 1e-3
    assert ex.si_sdr(noisy, ref).item() < ex.si_sdr(ref, ref).item()


def test_missing_espeak_ng_says_how_to_install(monkeypatch):
    monkeypatch.setattr(ex.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="apt-get install -y espeak-ng"):
        ex.synthesize("Hello there.", ex.TARGET_VOICE)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_speakable_sentences_are_prose_from_every_stdlib_module():
    s = ex.speakable_sentences()
    assert len(s) > 1000 and len(set(s)) == len(s)  # far more than the 400 the corpus reads
    assert all(6 <= len(t.split()) <= 22 and ex._SPEAKABLE.fullmatch(t) for t in s)
    assert s == ex.speakable_sentences()  # a fixed order: the held-out split is reproducible


def test_the_sorted_trainer_runs_subnetwork_to_go_with_the_joint_loss():
    """Plumbing only (no espeak-ng): deterministic test tones stand in for speech."""
    from elasticize.train import Trainer

    t = torch.linspace(0, 1, 2000)
    ref = torch.stack([torch.sin(2 * torch.pi * f * t) * torch.exp(-3 * t) for f in (220.0, 330.0, 440.0, 550.0)])
    mix = ref + 0.5 * torch.stack([torch.sin(2 * torch.pi * f * t) for f in (1300.0, 1700.0, 2100.0, 2500.0)])
    torch.manual_seed(0)
    em = ex.build(depth=3, modules=4, features=8, hidden=8)
    steps = 12
    tr = ex.make_trainer(em, ex.loader(mix, ref, 2), steps, lr=1e-2)
    assert isinstance(tr, Trainer) and tr.strategy.name == "subnetwork-to-go" and tr.max_grad_norm == 5.0
    batch = [(mix, ref)]
    before = tr.measure(batch, None, metric=ex.si_sdr_metric)
    recs = tr.train_steps(steps)
    assert all(set(r["losses"]) == {"full", "random"} for r in recs)
    drawn = {(r["configs"][1]["depth"]["layers"], *set(r["configs"][1]["modules"].values())) for r in recs}
    assert len(drawn) > 3  # the random sub-network varies over depth and width
    assert tr.optimizer.param_groups[0]["lr"] < 1e-3  # the cosine schedule ran to the end
    assert tr.measure(batch, None, metric=ex.si_sdr_metric) > before
    loss = ex.SeparationLoss(256, 64)
    assert loss(ref, ref).item() == 0.0 and loss(mix, ref).item() > 0.1
