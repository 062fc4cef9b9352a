"""Search space: validation of sub-networks, budgets, nesting."""

from __future__ import annotations

import re

import pytest
import torch

import elasticize
import toy_models as toys


@pytest.fixture(scope="module")
def em():
    torch.manual_seed(0)
    return elasticize.elasticize(toys.ToyCNN())


def test_outside_the_search_space_is_refused_with_the_choices(em):
    with pytest.raises(ValueError, match=r"outside the search space; choose one of \[16, 12, 8, 4\]"):
        em.set_subnet({"width": {"stem.0:out": 5}})
    with pytest.raises(KeyError, match="unknown width entry 'nope'; known"):
        em.set_subnet({"width": {"nope": 4}})
    with pytest.raises(KeyError, match="no preset 'huge'; presets"):
        em.set_subnet("huge")
    with pytest.raises(KeyError, match="unknown dimension 'colour'"):
        em.set_subnet({"colour": 1})
    with pytest.raises(ValueError, match="must be in"):
        em.set_subnet({"width": 1.5})
    with pytest.raises(ValueError, match="choose one of \\[3, 2, 1\\]"):
        em.set_subnet({"depth": {"stage": 0}})
    assert em.active == em.space.full()  # a refused sub-network changes nothing


def test_ratio_shorthand_and_partial_configs(em):
    cfg = em.resolve({"width": 0.5})
    assert set(cfg["width"].values()) == {8}
    part = em.resolve({"depth": {"stage": 1}})
    assert part["depth"] == {"stage": 1} and part["width"] == em.space.full()["width"]


def test_select_by_budget_is_the_largest_nested_subnetwork_under_it(em):
    full = em.macs()
    cands = em.space.candidates()
    macs = [em.macs(c) for c in cands]
    assert macs == sorted(macs, reverse=True)
    for budget in (full, full // 2, full // 5):
        cfg = em.select(max_macs=budget)
        assert em.macs(cfg) <= budget
        assert all(m <= em.macs(cfg) for m in macs if m <= budget)
    p = em.select(max_params=em.params() // 3)
    assert em.params(p) <= em.params() // 3
    with pytest.raises(ValueError, match="no sub-network meets"):
        em.select(max_macs=1)
    with pytest.raises(ValueError, match="give max_macs"):
        em.select()


def test_nested_subnetworks_share_prefixes(em):
    x = torch.randn(2, 1, 8, 8)
    em.eval()
    with torch.no_grad(), em.subnet({"width": 0.5}):
        w_half = em.model.stage[0].conv1.weight.clone()
    with torch.no_grad(), em.subnet({"width": 0.25}):
        w_quarter = em.model.stage[0].conv1.weight.clone()
    assert torch.equal(w_half[: w_quarter.shape[0], : w_quarter.shape[1]], w_quarter)
    assert em(x).shape == (2, 10)


@pytest.mark.parametrize("text, kind, amount, share", [
    ("50M", "macs", 50e6, False), ("1.2G", "macs", 1.2e9, False), ("2.5e9", "macs", 2.5e9, False),
    ("750k", "params", 750e3, False), ("40%", "macs", 0.4, True), (" 100 % ", "params", 1.0, True),
    ("5ms", "latency", 5e-3, False), ("0.005s", "latency", 5e-3, False), ("800us", "latency", 800e-6, False),
    ("0.01", "latency", 0.01, False), (3e8, "macs", 3e8, False),
])
def test_budget_grammar(text, kind, amount, share):
    from elasticize.space import parse_budget

    b = parse_budget(text, kind=kind)
    assert b.share == share and b.amount == pytest.approx(amount, rel=1e-12)
    assert b.resolve(200.0) == pytest.approx(amount * 200.0 if share else amount)


@pytest.mark.parametrize("text, kind, message", [
    ("inf", "macs", "is not a macs budget"), ("nan", "params", "is not a params budget"),
    ("-5M", "macs", "is not a macs budget"), ("0", "macs", "positive, finite"), ("0%", "macs", "(0, 100]%"),
    ("101%", "params", "(0, 100]%"), ("5ms", "macs", "is not a macs budget"), ("50M", "latency", "latency budget"),
    ("9" * 5000, "macs", "positive, finite"), ("fifty", "macs", "write e.g. 50M"),
])
def test_budget_grammar_refuses_with_examples(text, kind, message):
    from elasticize.space import parse_budget

    with pytest.raises(ValueError, match=re.escape(message)):
        parse_budget(text, kind=kind)
