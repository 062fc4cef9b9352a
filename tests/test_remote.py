"""Remote partial loading (HTTP range requests from a loopback server) and the nested byte layout."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import elasticize
from elasticize.checkpoint import read_manifest
from elasticize.cli import main
from elasticize.fileformat.source import coalesce
from elasticize.testing.http import RangeServer
from conftest import scratch_dir


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with scratch_dir(tmp_path_factory, "remote") as d, RangeServer(d) as srv:
        yield srv


def _llama():
    import transformers as T
    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=8,
                                            num_key_value_heads=2, head_dim=8, intermediate_size=48, vocab_size=100,
                                            max_position_embeddings=64, attn_implementation="eager")).eval()


def _lstm():
    from rnn_models import TokenTagger
    torch.manual_seed(0)
    return TokenTagger().eval()


def _models():
    """name -> (elastic model, function that builds its base model, or None: rebuilt from the recipe)."""
    torch.manual_seed(0)
    llama, lstm = _llama(), _lstm()
    return {"cnn": (elasticize.convert("test_resnet.r160_in1k", pretrained=False), None),
            "llama": (elasticize.elasticize(llama, torch.randint(2, 100, (1, 12))), _llama),
            "lstm": (elasticize.elasticize(lstm, lstm.example_inputs()[0]), _lstm)}


@pytest.fixture(scope="module")
def saved(server):
    out = {}
    for name, (em, base) in _models().items():
        for layout in ("default", "nested"):
            elasticize.save(em, server.root / f"{name}.{layout}.safetensors", layout=layout)
        out[name] = (em, base)
    return out


def _state(m):
    return {k: v for k, v in m.state_dict().items()}


def _same(a, b):
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def _served(server, fn):
    server.reset()
    out = fn()
    return out, server.requests, server.served


@pytest.mark.parametrize("name", ["cnn", "llama"])
def test_remote_load_subnet_equals_local_and_reads_only_its_bytes(server, saved, name):
    em, base = saved[name]
    kw = lambda: {"model": base()} if base else {}  # noqa: E731
    local = server.root / f"{name}.default.safetensors"
    manifest = read_manifest(local)
    header = 8 + int.from_bytes(local.read_bytes()[:8], "little")
    assert read_manifest(f"{server.url}/{name}.default.safetensors") == manifest
    nested = read_manifest(server.root / f"{name}.nested.safetensors")["layout"]
    for preset, entry in manifest["presets"].items():
        ref = elasticize.load_subnet(local, preset, **kw())
        got, requests, served = _served(server, lambda: elasticize.load_subnet(
            f"{server.url}/{name}.default.safetensors", preset, **kw()))
        _same(got, ref)
        assert served <= header + 1.05 * entry["bytes"], (preset, served, entry["bytes"])
        got, requests, served = _served(server, lambda: elasticize.load_subnet(
            f"{server.url}/{name}.nested.safetensors", preset, **kw()))
        _same(got, ref)
        nheader = 8 + int.from_bytes((server.root / f"{name}.nested.safetensors").read_bytes()[:8], "little")
        if preset in nested["chain"]:  # the length, the header, then one range: the preset's prefix
            assert (requests, served) == (3, nheader + nested["prefix_bytes"][nested["chain"].index(preset)])
    assert len(nested["chain"]) >= 3


def test_remote_errors_are_one_line_and_write_nothing(server, saved, tmp_path):
    out = tmp_path / "sub.safetensors"
    for url, err, words in ((f"{server.url}/missing.safetensors", FileNotFoundError, "404"),
                            (f"{server.url}/norange/cnn.default.safetensors", ValueError, "Range"),
                            (f"{server.url}/trunc/cnn.default.safetensors", ValueError, "cut short")):
        with pytest.raises(err, match=words):
            elasticize.load_subnet(url, "tiny")
        r = CliRunner().invoke(main, ["extract", url, "--preset", "tiny", "-o", str(out)])
        assert r.exit_code != 0 and words in r.output and "Traceback" not in r.output, r.output
        assert not out.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(ImportError, match="s3fs"):
        read_manifest("s3://bucket/model.safetensors")


def test_cli_reads_urls_and_fsspec_paths(server, saved, tmp_path):
    url = f"{server.url}/cnn.nested.safetensors"
    r = CliRunner().invoke(main, ["inspect", url, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["layout"]["chain"][-1] == "full"
    out = tmp_path / "tiny.safetensors"
    r = CliRunner().invoke(main, ["extract", url, "--preset", "tiny", "-o", str(out)])
    assert r.exit_code == 0, r.output
    _same(elasticize.load_subnet(out), elasticize.load_subnet(server.root / "cnn.default.safetensors", "tiny"))
    fs_url = (server.root / "cnn.default.safetensors").as_uri()  # file://: through fsspec
    _same(elasticize.load_subnet(fs_url, "small"), elasticize.load_subnet(server.root / "cnn.default.safetensors", "small"))


@pytest.mark.parametrize("name", ["cnn", "llama", "lstm"])
def test_nested_layout_round_trips_bit_for_bit(server, saved, name):
    em, base = saved[name]
    kw = lambda: {"model": base()} if base else {}  # noqa: E731
    path = server.root / f"{name}.nested.safetensors"
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:  # a plain safetensors file: shells are stored tensors
        assert any("::shell" in k for k in f.keys())
    em2 = elasticize.load(path, **kw())
    _same(em2.model, em.model)
    for preset in em.presets:
        _same(elasticize.load_subnet(path, preset, **kw()), em.extract(preset))
    cfg = {"width": 0.6}  # not a preset: served from the shells by a few ranges
    _same(elasticize.load_subnet(path, cfg, **kw()), em.extract(cfg))


def _rewrite(src: Path, dst: Path, edit) -> None:
    """``src`` with its manifest (metadata key elasticize) changed by ``edit``, the data kept."""
    raw = src.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    m = json.loads(header["__metadata__"]["elasticize"])
    edit(m, header)
    header["__metadata__"]["elasticize"] = json.dumps(m)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    dst.write_bytes(len(h).to_bytes(8, "little") + h + raw[8 + n:])


def _first_multi(m):
    return next(k for k, t in m["layout"]["tensors"].items() if len(t["shells"]) > 1)


@pytest.mark.parametrize("edit,words", [
    (lambda m, h: m["layout"]["tensors"][_first_multi(m)].update(shells=m["layout"]["tensors"][_first_multi(m)]["shells"][:-1]),
     "elements of shape"),
    (lambda m, h: m["layout"]["tensors"][_first_multi(m)].update(shape=[1]), "hold the"),
    (lambda m, h: m["layout"].update(chain=m["layout"]["chain"][1:], prefix_bytes=m["layout"]["prefix_bytes"][1:]),
     "layout"),
    (lambda m, h: m["layout"].update(prefix_bytes=[0] * len(m["layout"]["prefix_bytes"])), "outside its section"),
    (lambda m, h: m["layout"].update(kind="zigzag"), "layout.kind"),
    (lambda m, h: m.update(format_version=3), "version 4"),
])
def test_hostile_nested_layout_is_refused(saved, server, tmp_path, edit, words):
    bad = tmp_path / "bad.safetensors"
    _rewrite(server.root / "cnn.nested.safetensors", bad, edit)
    with pytest.raises(ValueError, match=words):
        read_manifest(bad)


def test_swapped_shells_are_refused(saved, server, tmp_path):
    """Two shells of one tensor swapped in the header (each other's offsets): a wrong shape or section."""
    def edit(m, h):
        name = _first_multi(m)
        a, b = (f"{name}::shell{k}" for k in m["layout"]["tensors"][name]["shells"][:2])
        h[a], h[b] = h[b], h[a]
    bad = tmp_path / "bad.safetensors"
    _rewrite(server.root / "cnn.nested.safetensors", bad, edit)
    with pytest.raises(ValueError, match="layout"):
        read_manifest(bad)


def test_coalesce_spends_at_most_its_slack():
    ranges = [(i * 100, i * 100 + 90) for i in range(50)] + [(10_000, 10_500)]
    out = coalesce(ranges, slack=0.04)
    asked = sum(b - a for a, b in ranges)
    assert sum(b - a for a, b in out) <= 1.04 * asked and len(out) < len(ranges)
    assert all(any(a >= x and b <= y for x, y in out) for a, b in ranges)
    assert coalesce([(0, 10), (10, 20), (5, 12)]) == [(0, 20)]
    assert math.isclose(sum(b - a for a, b in coalesce(ranges, slack=0)), asked)


def test_multi_range_requests_and_their_fallbacks(server, saved):
    """The default layout's ranges go in multi-range requests; a server that answers them with the whole
    file or with one part is read one range at a time, with the same tensors; a bad part is refused."""
    local = server.root / "cnn.default.safetensors"
    ref = elasticize.load_subnet(local, "tiny")
    counts = {}
    for mode in ("", "single/", "onepart/"):
        got, requests, served = _served(server, lambda: elasticize.load_subnet(f"{server.url}/{mode}cnn.default.safetensors", "tiny"))
        _same(got, ref)
        counts[mode] = (requests, server.ranges, server.wire)
    requests, ranges, wire = counts[""]
    assert ranges > 20 and requests == 2 + math.ceil((ranges - 2) / 200)  # probe, header, then 200 ranges a request
    single_requests, single_ranges, single_wire = counts["single/"]
    assert single_requests == 1 + single_ranges == 1 + ranges and single_wire > wire  # 1: the refused request
    assert counts["onepart/"][0] == ranges  # probe, header, a multi-range request that brought the first range back
    #                                         only, then the other ranges one by one
    with pytest.raises(ValueError, match="multipart/byteranges answer is malformed"):
        elasticize.load_subnet(f"{server.url}/badmulti/cnn.default.safetensors", "tiny")


@pytest.mark.parametrize("body,words", [
    (b"--B\r\nContent-Range: bytes 0-3/10\r\n\r\nabcd\r\n--B--\r\n", None),
    (b"\r\n--B\r\nContent-Type: x\r\nContent-Range: bytes 4-5/10\r\n\r\nef\r\n--B\r\nContent-Range: bytes 0-0/10\r\n\r\nZ\r\n--B--",
     None),
    (b"--C\r\nContent-Range: bytes 0-3/10\r\n\r\nabcd\r\n--B--\r\n", "expected the boundary"),
    (b"--B\r\n\r\nabcd\r\n--B--\r\n", "no Content-Range"),
    (b"--B\r\nContent-Range: bytes 0-3/11\r\n\r\nabcd\r\n--B--\r\n", "of a file of 10 bytes"),
    (b"--B\r\nContent-Range: bytes 0-3/10\r\n\r\nab", "cut short"),
    (b"--B\r\nContent-Range: bytes 0-3/10\r\n\r\nabcdef\r\n--B--\r\n", "more bytes than"),
    (b"--B--\r\n", "no parts"),
])
def test_byteranges_parser_checks_every_part(body, words):
    import io
    from elasticize.fileformat.byteranges import boundary_of, read_byteranges
    assert boundary_of('multipart/byteranges; boundary="B"') == "B" and boundary_of("text/plain") is None
    if words is None:
        parts = read_byteranges(io.BytesIO(body), "B", 10, "f")
        assert all(len(d) > 0 for _, d in parts) and parts[0][0] in (0, 4)
    else:
        with pytest.raises(ValueError, match=words):
            read_byteranges(io.BytesIO(body), "B", 10, "f")
