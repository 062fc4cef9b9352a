"""Every registered rule passes the shared conformance checker (``elasticize.testing``) on its zoo model:
identity at full size, extraction equal at every preset, save -> load and load_subnet exact, MACs equal
to FlopCounterMode's. A rule registered without a zoo model fails here, so coverage cannot drift."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from elasticize.rules import registered_rules
from elasticize.testing import ConformanceError, check_conformance, check_rule, zoo

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import examples.user_rule  # noqa: E402,F401  (registers the user rule "scaled_linear")

BUILTIN = sorted(registered_rules())


@zoo.zoo_model("scaled_linear")
def _user_mlp():
    from examples.user_rule import TinyMLP

    return TinyMLP(), (torch.randn(4, 16, generator=torch.Generator().manual_seed(0)),)


@pytest.mark.parametrize("rule", BUILTIN)
def test_every_registered_rule_conforms(rule, tmp_path):
    assert rule in zoo.registered(), f"rule {rule!r} has no tiny model in elasticize.testing.zoo"
    model, inputs = zoo.build(rule)
    rep = check_rule(rule, model, inputs, folder=tmp_path, **zoo.CHECK_OPTIONS.get(rule, {}))
    assert len(rep.presets) >= 2 and len({m for m, _ in rep.macs.values()}) >= 2  # the rule made something smaller
    assert list(tmp_path.iterdir()) == []


def test_the_checker_catches_broken_invariants(monkeypatch):
    """Wrong MACs and an extraction that computes something else are each reported, by name."""
    import elasticize.model

    model, inputs = zoo.build("batchnorm")
    macs = elasticize.model.ElasticModel.macs
    monkeypatch.setattr(elasticize.model.ElasticModel, "macs", lambda self, s=None: macs(self, s) + 1)
    with pytest.raises(ConformanceError, match="MACs of 'full': the plan says"):
        check_conformance(model, inputs)
    monkeypatch.undo()
    extract = elasticize.model.ElasticModel.extract

    def perturbed(self, s=None):
        dense = extract(self, s)
        with torch.no_grad():
            dense.head.bias.add_(1.0)
        return dense

    monkeypatch.setattr(elasticize.model.ElasticModel, "extract", perturbed)
    with pytest.raises(ConformanceError, match=r"extract\('full'\) vs the elastic model"):
        check_conformance(model, inputs)


def test_check_rule_refuses_a_rule_that_made_nothing_elastic():
    model, inputs = zoo.build("linear")
    with pytest.raises(ConformanceError, match="made no module"):
        check_rule("groupnorm", model, inputs)
    with pytest.raises(KeyError, match="no rule named"):
        check_rule("no_such_rule", model, inputs)
