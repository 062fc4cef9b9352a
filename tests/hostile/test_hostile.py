"""Crafted files (``make_hostile.py``) against every entry point: one clear error, no code run,
nothing fetched, nothing written or changed."""

from __future__ import annotations

import os
import re
import socket
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import elasticize
from elasticize.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from conftest import scratch_dir  # noqa: E402
from make_hostile import CASES, make  # noqa: E402

#: what an entry point may raise for a malformed file (ManifestError is a ValueError)
CLEAR = (ValueError, KeyError, TypeError, FileNotFoundError)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    with scratch_dir(tmp_path_factory, "hostile") as d:
        sentinel = d / "SENTINEL"
        made = make(d / "files", sentinel=sentinel)
        data = d / "data" / "0"
        data.mkdir(parents=True)
        (data / "a.png").write_bytes(b"")  # train must refuse the file before it reads any data
        yield made, sentinel, d


@pytest.fixture
def sealed(monkeypatch, tmp_path):
    """No network, and empty hub caches: a builder that tried to fetch or read a checkpoint would fail loudly."""
    def refuse(*a, **k):
        raise AssertionError("an entry point opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # a relative path written anywhere would land here
    yield tmp_path


def _snapshot(folder: Path) -> dict[str, tuple[int, int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_mode)
            for p in sorted(folder.rglob("*"))}


def _entry_points(path: Path, out: Path, data: Path):
    """(name, call) for every entry point; a call returns (exception or None, CLI result or None)."""
    def api(fn):
        def call():
            try:
                fn()
            except CLEAR as e:  # noqa: PERF203
                return e, None
            return None, None
        return call

    def cli(args):
        def call():
            return None, CliRunner().invoke(main, args)
        return call

    return [
        ("read_manifest", api(lambda: elasticize.read_manifest(path))),
        ("load", api(lambda: elasticize.load(path))),
        ("load_subnet", api(lambda: elasticize.load_subnet(path))),
        ("inspect", cli(["inspect", str(path)])),
        ("extract", cli(["extract", str(path), "--preset", "full", "-o", str(out / "sub.safetensors")])),
        ("train", cli(["train", str(path), "--data", str(data), "--steps", "1", "-o", str(out / "t.safetensors")])),
    ]


@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_every_entry_point_refuses_the_file(hostile, sealed, name):
    made, sentinel, d = hostile
    case, path = made[name]
    out = sealed / "out"
    out.mkdir()
    before = _snapshot(d)
    for entry, call in _entry_points(path, out, d / "data"):
        err, res = call()
        reading = entry in ("read_manifest", "inspect")
        if case.reads and reading:  # well formed: shown, and refused only when something would be built
            assert err is None and (res is None or res.exit_code == 0), (entry, err, res and res.output)
            continue
        if res is None:
            assert err is not None, f"{entry} accepted {name}"
            msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        else:
            assert res.exit_code == 1, (entry, res.exit_code, res.output, res.exception)
            assert not isinstance(res.exception, SystemExit) or res.exception.code == 1
            msg = res.output.strip()
            assert msg.count("\n") == 0 and msg.startswith("Error: "), (entry, msg)
        assert re.search(case.expect, msg), (entry, msg)
        assert "\n" not in msg
    assert not sentinel.exists(), "a file's recipe ran a command"
    assert _snapshot(d) == before, "an entry point wrote or changed a file"
    assert list(out.iterdir()) == [] and list(Path.cwd().iterdir()) == [] and not (sealed / "torch-home").exists() and not (sealed / "hf-home").exists()


def test_inspect_warns_when_loading_would_import_code(hostile):
    made, sentinel, _ = hostile
    _, path = made["import_os_system"]
    res = CliRunner().invoke(main, ["inspect", str(path)])
    assert res.exit_code == 0
    assert "import builder 'os:system'" in res.output and "command" in res.output  # the builder and its kwargs
    assert "--trust-remote-code" in res.output and "code from outside elasticize" in res.output
    assert not sentinel.exists()


def test_the_base_files_load_through_every_entry_point(hostile, sealed):
    """The control: the files the cases are made from are fine, so each refusal above is the edit's."""
    made, _, d = hostile
    files = d / "files"
    for base in ("cnn", "bert", "lstm"):
        path = files / f"base_{base}.safetensors"
        trust = base == "lstm"  # its recipe imports rnn_models:TokenTagger
        elasticize.read_manifest(path)
        em = elasticize.load(path, trust_remote_code=trust)
        sub = elasticize.load_subnet(path, "small", trust_remote_code=trust)
        assert sum(p.numel() for p in sub.parameters()) == em.params("small")
        out = sealed / f"{base}.safetensors"
        args = ["extract", str(path), "--preset", "small", "-o", str(out)] + (["--trust-remote-code"] if trust else [])
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 0, res.output
        assert elasticize.read_manifest(out)["kind"] == "sub-network"
        if trust:
            with pytest.raises(ValueError, match="trust_remote_code"):
                elasticize.load(path)


def test_a_missing_file_is_one_clear_error(tmp_path):
    path = tmp_path / "nowhere.safetensors"
    for entry, call in _entry_points(path, tmp_path, tmp_path):
        err, res = call()
        if res is None:
            assert isinstance(err, FileNotFoundError), entry
        else:
            assert res.exit_code in (1, 2) and "nowhere.safetensors" in res.output, (entry, res.output)
    assert sorted(os.listdir(tmp_path)) == []


def test_there_are_at_least_40_cases():
    assert len(CASES) >= 40 and len({c.name for c in CASES}) == len(CASES)
