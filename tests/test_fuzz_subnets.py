"""Seeded fuzzing of sub-network configurations: 1,000 over a CNN, a Hugging Face encoder and an LSTM.

About half are valid (random choices per group and stage, partial dicts, ratios): each runs, and
its extraction computes the same. The rest are corrupt (unknown names, values off the choices,
wrong types, non-finite ratios, huge integers, junk nesting): each raises one clear
KeyError/ValueError/TypeError, and the model is left exactly as it was, at full size.
"""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import pytest
import torch

import elasticize

sys.path.insert(0, str(Path(__file__).parent))
from conftest import max_diff, tol  # noqa: E402

N_PER_MODEL = 334  # 3 models: 1,002 configurations


def _cnn():
    from toy_models import DigitsResNet

    torch.manual_seed(0)
    m = DigitsResNet(c=8).eval()
    x = m.example_inputs()
    return elasticize.elasticize(m, x), x


def _bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    m = BertModel(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                             intermediate_size=64, max_position_embeddings=40)).eval()
    x = (torch.randint(0, 99, (2, 10), generator=torch.Generator().manual_seed(0)),)
    return elasticize.elasticize(m, x), x


def _lstm():
    from rnn_models import TokenTagger

    torch.manual_seed(0)
    m = TokenTagger().eval()
    x = m.example_inputs()
    return elasticize.elasticize(m, x), x


def _out(y):
    y = y[0] if isinstance(y, (tuple, list)) else y
    return getattr(y, "last_hidden_state", y)


def _valid(rng: random.Random, em) -> object:
    dims = em.space.dimensions
    kind = rng.random()
    if kind < 0.15:
        return rng.choice(list(em.presets))
    if kind < 0.3:  # one ratio per dimension
        return {d: rng.choice([0.0, 0.25, 0.5, 0.75, 1.0, rng.random()]) for d in rng.sample(list(dims), k=len(dims))
                if dims[d]}
    cfg: dict = {}
    for d, table in dims.items():
        picked = {name: rng.choice(ch) for name, ch in table.items() if rng.random() < 0.8}
        if picked:
            cfg[d] = picked
    return cfg


def _corrupt(rng: random.Random, em) -> object:
    dims = {d: t for d, t in em.space.dimensions.items() if t}
    d = rng.choice(list(dims))
    name = rng.choice(list(dims[d]))
    choices = dims[d][name]
    off = [v for v in (-16, -1, 0, choices[0] + 1, choices[0] * 2, 10 ** 30) if v not in choices]
    between = [v for v in range(1, choices[0]) if v not in choices]
    cases = [
        lambda: {"depht": 0.5},                                    # unknown dimension
        lambda: {d: {name + "_nope": choices[-1]}},                # unknown group or stage
        lambda: {d: {name: rng.choice(off)}},                      # outside the choices
        lambda: {d: {name: rng.choice(between or off)}},           # between the choices
        lambda: {d: {name: str(choices[-1])}},                     # wrong types
        lambda: {d: {name: float(choices[-1])}},
        lambda: {d: {name: True}},
        lambda: {d: {name: None}},
        lambda: {d: {name: [choices[-1]]}},
        lambda: {d: {name: {"x": 1}}},
        lambda: {d: rng.choice([1.5, -0.1, math.nan, math.inf, -math.inf])},  # ratios outside [0, 1]
        lambda: {d: "half"},
        lambda: {d: [0.5]},
        lambda: rng.choice([[0.5], 0.5, 3, b"full", ("full",)]),  # not a preset name or a dict
        lambda: "no-such-preset",
        lambda: {"width": {}, d: {name: rng.choice(off)}, "heads": 7},
    ]
    return rng.choice(cases)()


@pytest.mark.parametrize("build", [_cnn, _bert, _lstm], ids=["cnn", "bert", "lstm"])
def test_fuzzed_configurations(build):
    em, x = build()
    rng = random.Random({"_cnn": 0, "_bert": 1, "_lstm": 2}[build.__name__])
    with torch.no_grad():
        full = _out(em(*x))
    valid = corrupt = 0
    for i in range(N_PER_MODEL):
        if i % 2 == 0:
            cfg = _valid(rng, em)
            resolved = em.set_subnet(cfg)
            with torch.no_grad():
                y = _out(em(*x))
                dense = em.extract(resolved)
                assert max_diff(_out(dense(*x)), y) <= tol(y), (i, cfg)
            valid += 1
            em.set_subnet(None)
        else:
            cfg = _corrupt(rng, em)
            for call in (em.set_subnet, em.extract, em.macs):
                with pytest.raises((KeyError, ValueError, TypeError)) as err:
                    call(cfg)
                msg = err.value.args[0] if err.value.args else ""
                assert isinstance(msg, str) and msg and "\n" not in msg, (i, cfg, msg)
            assert em.active == em.space.full(), (i, cfg)
            with torch.no_grad():
                assert torch.equal(_out(em(*x)), full), (i, cfg)
            corrupt += 1
    assert valid >= N_PER_MODEL // 2 and corrupt >= N_PER_MODEL // 2 - 1
