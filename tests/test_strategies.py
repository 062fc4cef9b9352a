"""The strategy registry: ``@register_strategy`` is loud, and a registered strategy is one :func:`make_strategy` and
one ``Trainer(strategy=...)`` away (its command-line use is in test_train_cli.py)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import elasticize
from elasticize.train import STRATEGIES, Pass, Strategy, StrategyOption, Trainer, make_strategy, register_strategy
from elasticize.train.state import read_state_info
from elasticize.train.strategies import SortedNet, strategy_cli_options

sys.path.insert(0, str(Path(__file__).parent))
from toy_models import DigitsResNet, digits  # noqa: E402


class LargestTwice(Strategy):
    """The largest sub-network ``k`` times per step (a strategy of this test)."""

    cli_options = (StrategyOption("--test-passes", "k", "passes of the largest sub-network per step."),)

    def __init__(self, *, k: int = 1) -> None:
        self.k = int(k)

    def passes(self, sampler):
        return [Pass(sampler.largest(), f"max{i}") for i in range(self.k)]

    def options(self):
        return {"k": self.k}


@contextlib.contextmanager
def registered(name: str, cls: type[Strategy]):
    """``cls`` registered as ``name`` meanwhile."""
    register_strategy(name)(cls)
    try:
        yield cls
    finally:
        del STRATEGIES[name]


def test_builtin_strategies_are_registered_in_order():
    assert list(STRATEGIES) == ["sortednet", "subnetwork-to-go", "sandwich", "skip-aware", "full"]
    assert all(cls.name == name for name, cls in STRATEGIES.items())
    flags = {opt.flag: names for opt, names in strategy_cli_options()}
    assert flags == {"--accumulate": ("sortednet",), "--objective": ("sortednet",), "--full-weight": ("subnetwork-to-go",),
                     "--n-random": ("sandwich",)}


def test_a_duplicate_name_raises_and_replaces_nothing():
    before = dict(STRATEGIES)
    with pytest.raises(ValueError, match="'sortednet' is already registered"):
        @register_strategy("sortednet")
        class Mine(Strategy):
            def passes(self, sampler):
                return []
    with registered("test-twice", LargestTwice):
        with pytest.raises(ValueError, match="'test-twice' is already registered"):
            register_strategy("test-twice")(type("Other", (LargestTwice,), {}))
        with pytest.raises(ValueError, match="already registered as strategy 'test-twice'"):
            register_strategy("test-again")(LargestTwice)
    assert STRATEGIES == before and SortedNet.name == "sortednet"


def test_registration_refuses_what_is_not_a_strategy_or_clashes():
    before = dict(STRATEGIES)
    with pytest.raises(TypeError, match="needs a subclass of elasticize.train.strategies.Strategy"):
        register_strategy("test-object")(object)
    with pytest.raises(ValueError, match="non-empty string"):
        register_strategy("")(type("Nameless", (LargestTwice,), {}))
    clash = type("Clash", (LargestTwice,), {"cli_options": (StrategyOption("--n-random", "k", "a clash."),)})
    with pytest.raises(ValueError, match="--n-random is strategy 'sandwich''s with key 'n'"):
        register_strategy("test-clash")(clash)
    bad = type("Bad", (LargestTwice,), {"cli_options": (StrategyOption("n_random", "k", "no dashes."),)})
    with pytest.raises(ValueError, match="a flag like '--n-random'"):
        register_strategy("test-bad")(bad)
    assert STRATEGIES == before


def test_an_unknown_name_lists_the_registered_ones():
    with pytest.raises(KeyError, match=r"no strategy 'nope' is registered; known strategies: \['full', 'sandwich'"):
        make_strategy("nope")
    with registered("test-twice", LargestTwice):
        with pytest.raises(KeyError, match="'test-twice'"):
            make_strategy("nope")
        with pytest.raises(TypeError, match=r"strategy 'test-twice' takes no option 'n' \(its options: k\)"):
            make_strategy("test-twice", n=2)
    with pytest.raises(KeyError, match="no strategy 'test-twice'"):
        make_strategy("test-twice")


def test_a_shared_flag_is_one_option_of_both_strategies():
    shared = type("Shared", (LargestTwice,), {"cli_options": (StrategyOption("--n-random", "n", "other help."),)})
    with registered("test-shared", shared):
        flags = {opt.flag: (opt.help, names) for opt, names in strategy_cli_options()}
        assert flags["--n-random"] == ("random sub-networks between largest and smallest.", ("sandwich", "test-shared"))


def test_a_registered_strategy_trains_by_name_and_is_saved_in_the_state(tmp_path):
    x, y, _, _ = digits()
    torch.manual_seed(0)
    em = elasticize.elasticize(DigitsResNet(c=8), dims=("width",))
    loader = DataLoader(TensorDataset(x[:128], y[:128]), batch_size=32)
    with registered("test-twice", LargestTwice):
        assert isinstance(make_strategy("test-twice", k=2), LargestTwice)
        tr = Trainer(em, loader, optimizer=torch.optim.AdamW(em.parameters(), 1e-3),
                     loss_fn=torch.nn.CrossEntropyLoss(), strategy="test-twice", strategy_options={"k": 2})
        rec = tr.train_steps(2, state_path=str(tmp_path / "state.safetensors"))
        assert all(set(r["losses"]) == {"max0", "max1"} for r in rec)
        assert read_state_info(tmp_path / "state.safetensors")["strategy"] == {"name": "test-twice",
                                                                                "options": {"k": 2}}


def test_subnetwork_to_go_full_weight_scales_the_full_pass_only():
    em = elasticize.elasticize(DigitsResNet(c=8), (torch.zeros(1, 1, 8, 8),))
    from elasticize.train import SubnetSampler

    s = make_strategy("subnetwork-to-go", full_weight=3)
    full, rand = s.passes(SubnetSampler(em.space, seed=0))
    assert (full.label, full.weight, rand.weight) == ("full", 3.0, 1.0)
    assert s.options() == {"full_weight": 3.0}
    assert make_strategy("subnetwork-to-go").options() == {}  # the paper's loss: states saved before still resume
    assert ("--full-weight", "full_weight", ("subnetwork-to-go",)) in [(o.flag, o.key, n) for o, n in strategy_cli_options()]
    for bad in (0, -1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="full_weight"):
            make_strategy("subnetwork-to-go", full_weight=bad)
