"""Elastic nn.LSTM / nn.GRU / nn.RNN hidden size and depth (num_layers): identity at full size, extraction,
packed input, MACs, save/load, CLI."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import elasticize
from elasticize.plan import Axis
from conftest import max_diff
from elasticize.cli import main
from rnn_models import TokenTagger

CASES = [(kind, bi, bf) for kind in ("lstm", "gru", "rnn") for bi in (True, False) for bf in (True, False)]


def _convert(**kw):
    torch.manual_seed(0)
    m = TokenTagger(**kw).eval()
    x = m.example_inputs()[0]
    with torch.no_grad():
        ref = m(x)
    return m, x, ref, elasticize.elasticize(m, x)


@pytest.mark.parametrize("kind,bi,bf", CASES, ids=lambda v: str(v))
def test_full_equals_original_and_extraction_equals_elastic(kind, bi, bf):
    m, x, ref, em = _convert(kind=kind, bidirectional=bi, batch_first=bf)
    x = torch.randint(0, 50, (3, 13))
    original = TokenTagger(kind=kind, bidirectional=bi, batch_first=bf).eval()
    original.load_state_dict(em.model.state_dict())  # the importance-sorted weights, in a plain model
    with torch.no_grad():
        assert max_diff(em(x), original(x)) <= 1e-5
        assert "rnn:out" in em.space.width and len(em.presets) >= 3
        for p in em.presets:
            with em.subnet(p):
                y = em(x)
            dense = em.extract(p).eval()
            assert type(dense.rnn) is type(original.rnn)
            h, k = em.resolve(p)["width"]["rnn:out"], em.resolve(p)["depth"]["rnn"]
            assert dense.rnn.hidden_size == h and dense.rnn.num_layers == k
            assert dense.rnn.weight_hh_l0.shape == (h * {"lstm": 4, "gru": 3}.get(kind, 1), h)
            assert hasattr(dense.rnn, "weight_ih_l1") == (k == 2)
            assert dense.head.in_features == h * (2 if bi else 1)
            assert max_diff(dense(x), y) <= 1e-5, p


def test_sorting_is_function_preserving_and_shares_one_order_across_gates():
    torch.manual_seed(0)
    m = TokenTagger().eval()
    x = m.example_inputs()[0]
    with torch.no_grad():
        ref = m(x)
    before = m.rnn.weight_hh_l0.detach().clone()
    em = elasticize.elasticize(m, x)
    with torch.no_grad():
        assert max_diff(em(x), ref) <= 1e-5
    after = m.rnn.weight_hh_l0.detach()
    assert not torch.equal(before, after)  # the units were permuted
    h = m.rnn.hidden_size
    # recover the permutation from the first gate's rows; every gate's rows follow it, and the columns too
    perm = [next(j for j in range(h) if torch.equal(after[i, :].sort().values, before[j, :].sort().values))
            for i in range(h)]
    for g in range(4):
        assert torch.equal(after[g * h:(g + 1) * h], before[g * h:(g + 1) * h][perm][:, perm])
    info = em.plan.tensors["head.weight"].axes[1]
    assert info == Axis("rnn:out", 2)  # the head reads both directions: two chunks of the hidden group
    assert em.plan.tensors["rnn.weight_ih_l1"].axes == {0: Axis("rnn:out", 4), 1: Axis("rnn:out", 2)}


def test_packed_sequences():
    m, _, _, em = _convert()
    torch.manual_seed(1)
    lengths = torch.tensor([9, 6, 3])
    tokens = torch.randint(0, 50, (3, 9))
    x = m.emb(tokens).detach()
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    plain = nn.LSTM(16, 24, num_layers=2, bidirectional=True, batch_first=True).eval()
    plain.load_state_dict({k: v for k, v in em.model.rnn.state_dict().items()})
    with torch.no_grad():
        y0, (h0, c0) = plain(packed)
        y1, (h1, c1) = em.model.rnn(packed)
        assert max_diff(pad_packed_sequence(y0, batch_first=True)[0], pad_packed_sequence(y1, batch_first=True)[0]) <= 1e-5
        assert max_diff(h0, h1) <= 1e-5 and max_diff(c0, c1) <= 1e-5
        for p in ("medium", "tiny"):
            with em.subnet(p):  # the embedding width is elastic too: the LSTM reads its first features
                packed = pack_padded_sequence(em.model.emb(tokens), lengths, batch_first=True, enforce_sorted=False)
                ys, (hs, cs) = em.model.rnn(packed)
            dense = em.extract(p).rnn
            yd, (hd, cd) = dense(packed)
            assert hs.shape[-1] == dense.hidden_size < 24
            assert max_diff(pad_packed_sequence(ys)[0], pad_packed_sequence(yd)[0]) <= 1e-5
            assert max_diff(hs, hd) <= 1e-5 and max_diff(cs, cd) <= 1e-5


def test_macs_count_every_gate_of_every_active_layer_and_direction():
    m, x, _, em = _convert(layers=3)
    seq = x.shape[1]
    assert em.space.depth == {"rnn": [3, 2, 1]}
    seen = set()
    for h in em.space.width["rnn:out"]:
        for k in (1, 2, 3):
            cfg = {"width": {"rnn:out": h}, "depth": {"rnn": k}}
            e = em.resolve(cfg)["width"]["emb.weight:out"]
            lstm = seq * 2 * (4 * h * (e + h) + (k - 1) * 4 * h * (2 * h + h))
            assert em.macs(cfg) == lstm + seq * 2 * h * 7, cfg
            dense = em.extract(cfg)
            assert em.params(cfg) == sum(t.numel() for t in dense.parameters()), cfg
            seen.add(em.macs(cfg))
    assert len(seen) == 12


def _layers(em, k, *, hidden=24, layers=2):
    """A plain nn.LSTM of the first ``k`` layers of the elastic model's (full-width) LSTM: an independent reference."""
    plain = nn.LSTM(16, hidden, num_layers=k, bidirectional=True, batch_first=True).eval()
    plain.load_state_dict({n: t for n, t in em.model.rnn.state_dict().items() if int(n.split("_l")[1][0]) < k})
    return plain


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_depth_runs_the_first_layers_and_extracts_to_a_shallower_rnn(packed):
    m, _, _, em = _convert(layers=3)
    torch.manual_seed(2)
    lengths = torch.tensor([9, 4, 6])
    x = m.emb(torch.randint(0, 50, (3, 9))).detach()

    def inp(z):
        return pack_padded_sequence(z, lengths, batch_first=True, enforce_sorted=False) if packed else z

    def out(y):
        return pad_packed_sequence(y, batch_first=True)[0] if packed else y

    with torch.no_grad():
        for k in (1, 2):
            with em.subnet({"depth": {"rnn": k}}):
                assert em.model.rnn.num_layers == k
                y, (h, c) = em.model.rnn(inp(x))
            y0, (h0, c0) = _layers(em, k)(inp(x))
            assert out(y).shape[-1] == 48 and h.shape[0] == c.shape[0] == 2 * k  # features kept, k * D state rows
            assert max_diff(out(y), out(y0)) <= 1e-5 and max_diff(h, h0) <= 1e-5 and max_diff(c, c0) <= 1e-5
            for width in em.space.width["rnn:out"]:  # depth combined with the elastic hidden size
                cfg = {"depth": {"rnn": k}, "width": {"rnn:out": width, "emb.weight:out": 16}}
                with em.subnet(cfg):
                    ys, (hs, cs) = em.model.rnn(inp(x))
                dense = em.extract(cfg).rnn
                assert type(dense) is nn.LSTM and (dense.num_layers, dense.hidden_size) == (k, width)
                assert len(dense.state_dict()) == 8 * k
                yd, (hd, cd) = dense(inp(x))
                assert max_diff(out(ys), out(yd)) <= 1e-5 and max_diff(hs, hd) <= 1e-5 and max_diff(cs, cd) <= 1e-5


def test_initial_state_with_all_layers_is_cut_to_the_active_ones():
    m, _, _, em = _convert(kind="gru", layers=3)
    x = torch.randn(2, 5, 16)
    h0 = torch.randn(6, 2, 24)
    plain = nn.GRU(16, 24, num_layers=2, bidirectional=True, batch_first=True).eval()
    plain.load_state_dict({n: t for n, t in em.model.rnn.state_dict().items() if int(n.split("_l")[1][0]) < 2})
    with torch.no_grad(), em.subnet({"depth": {"rnn": 2}}):
        y, h = em.model.rnn(x, h0)
        y0, h_ref = plain(x, h0[:4])
    assert h.shape == (4, 2, 24) and max_diff(y, y0) <= 1e-5 and max_diff(h, h_ref) <= 1e-5


def test_depth_only_keeps_the_hidden_size_and_a_single_layer_rnn_has_no_depth():
    torch.manual_seed(0)
    m = TokenTagger(kind="rnn").eval()
    em = elasticize.elasticize(m, m.example_inputs()[0], dims=("depth",))
    assert em.space.width == {} and em.space.depth == {"rnn": [2, 1]}
    x = torch.randint(0, 50, (2, 6))
    with torch.no_grad(), em.subnet({"depth": {"rnn": 1}}):
        y = em(x)
    dense = em.extract({"depth": {"rnn": 1}})
    assert (dense.rnn.num_layers, dense.rnn.hidden_size) == (1, 24) and max_diff(dense(x), y) <= 1e-5
    one = TokenTagger(layers=1).eval()
    assert elasticize.elasticize(one, one.example_inputs()[0]).space.depth == {}


@pytest.mark.filterwarnings("ignore:LSTM with projections")
def test_proj_size_is_refused_with_the_reason():
    torch.manual_seed(0)
    m = TokenTagger(proj_size=8, hidden=24).eval()
    with pytest.raises(ValueError, match="proj_size=8 > 0 is not supported"):
        elasticize.elasticize(m)


def test_save_load_round_trip(tmp_path):
    m, x, _, em = _convert(kind="gru", layers=3)
    path = tmp_path / "gru.safetensors"
    elasticize.save(em, path)
    em2 = elasticize.load(path, model=TokenTagger(kind="gru", layers=3))
    assert em2.space.depth == {"rnn": [3, 2, 1]}
    cfgs = [*em.presets, {"depth": {"rnn": 2}, "width": 0.5}]
    with torch.no_grad():
        for p in cfgs:
            with em.subnet(p), em2.subnet(p):
                assert max_diff(em(x), em2(x)) == 0.0, p
        for p in ("tiny", cfgs[-1]):
            dense = elasticize.load_subnet(path, p, model=TokenTagger(kind="gru", layers=3))
            assert dense.rnn.num_layers == em.resolve(p)["depth"]["rnn"] < 3
            with em.subnet(p):
                assert max_diff(dense(x), em(x)) <= 1e-5


def test_cli_converts_embedding_lstm_head_by_import_path(tmp_path):
    out = tmp_path / "tagger.safetensors"
    res = CliRunner().invoke(main, ["convert", "rnn_models:TokenTagger", "--no-pretrained", "--kwarg", "hidden=32",
                                    "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "rnn:out" in res.output and "tiny" in res.output
    em = elasticize.load(out, trust_remote_code=True)
    assert em.space.depth == {"rnn": [2, 1]}  # the 2-layer LSTM's num_layers is a depth stage
    x = torch.randint(0, 50, (2, 5))
    for args, (h, k) in [(["--preset", "tiny"], (8, 1)),
                         (["--config", '{"depth": {"rnn": 1}, "width": {"rnn:out": 32}}'], (32, 1))]:
        sub = tmp_path / "sub.safetensors"
        sub.unlink(missing_ok=True)
        res = CliRunner().invoke(main, ["extract", str(out), *args, "-o", str(sub), "--trust-remote-code"])
        assert res.exit_code == 0, res.output
        dense = elasticize.load_subnet(sub, trust_remote_code=True)
        assert isinstance(dense.rnn, nn.LSTM) and (dense.rnn.hidden_size, dense.rnn.num_layers) == (h, k)
        with torch.no_grad(), em.subnet(elasticize.read_manifest(sub)["config"]):
            assert max_diff(dense(x), em(x)) <= 1e-5
    assert em.macs("tiny") < 0.1 * em.macs("full")
    assert em.macs({"depth": {"rnn": 1}}) < 0.6 * em.macs("full")


def test_rnn_layers_inside_skippable_residual_blocks():
    from rnn_models import NestedLSTMStack

    torch.manual_seed(0)
    m = NestedLSTMStack().eval()
    em = elasticize.elasticize(m, dims=("depth",))
    assert em.space.depth == {"blocks": [3, 2, 1], **{f"blocks.{i}.rnn": [2, 1] for i in range(3)}}
    x = torch.randn(3, 7, 6)
    full = em.macs(None)
    one_block = em.macs({"depth": {"blocks": 1}})
    shallow = em.macs({"depth": {"blocks.1.rnn": 1}})
    # a dropped block's LSTM layers count nothing, whatever its own depth says
    assert em.macs({"depth": {"blocks": 1, "blocks.1.rnn": 1, "blocks.2.rnn": 1}}) == one_block < shallow < full
    for cfg in ({"depth": {"blocks": 2, "blocks.0.rnn": 1, "blocks.1.rnn": 1}},
                {"depth": {"blocks": 1, "blocks.1.rnn": 1}}):
        with torch.no_grad(), em.subnet(cfg):
            y = em(x)
        dense = em.extract(cfg)
        assert em.params(cfg) == sum(t.numel() for t in dense.parameters())
        assert dense.blocks[0].rnn.num_layers == cfg["depth"].get("blocks.0.rnn", 2)
        with torch.no_grad():
            assert max_diff(dense(x), y) <= 1e-5, cfg
