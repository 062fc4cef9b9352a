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


def test_stdlib_sentences_are_real_text():
    s = ex.stdlib_sentences()
    assert len(s) > 500 and len(set(s)) == len(s)
    assert all(6 <= len(t.split()) <= 22 for t in s[:50])
