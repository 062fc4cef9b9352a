"""Writing outputs: modes that honour the umask, the HF folder swap, stale temporary files, and
outputs that cannot be written refused with one line before any work (``elasticize._files``)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import elasticize
from elasticize import checkpoint
from elasticize.cli import main
from elasticize.train import Trainer

sys.path.insert(0, str(Path(__file__).parent))
from conftest import scratch_dir  # noqa: E402
from toy_models import DigitsResNet, ToyCNN  # noqa: E402

UMASKS = [0o022, 0o077]


@contextlib.contextmanager
def umask(value: int):
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def hidden(d: Path) -> list[str]:
    return sorted(n for n in os.listdir(d) if n.startswith("."))


def one_line_error(res, *words: str) -> None:
    """A CLI refusal: exit 1, one line naming ``words``, no traceback (CliRunner reports an
    uncaught exception as exit 1 too, so the exception must be click's SystemExit)."""
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    text = res.output.strip()
    assert "\n" not in text and "Traceback" not in text and text.startswith("Error: "), text
    for w in words:
        assert w in text, text


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def toy() -> elasticize.ElasticModel:
    torch.manual_seed(0)
    return elasticize.elasticize(ToyCNN(c=8).eval())


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A converted digits model file and a small image folder to train it on."""
    from PIL import Image

    with scratch_dir(tmp_path_factory, "files") as d:
        g = torch.Generator().manual_seed(0)
        for i in range(24):
            cls = d / "images" / str(i % 2)
            cls.mkdir(parents=True, exist_ok=True)
            pixels = (torch.rand(8, 8, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels, mode="L").save(cls / f"{i}.png")
        model = d / "digits.safetensors"
        res = CliRunner().invoke(main, ["convert", "toy_models:DigitsResNet", "--kwarg", "c=8", "--no-pretrained",
                                        "--dims", "width", "-o", str(model)])
        assert res.exit_code == 0, res.output
        yield d, d / "images", model


def _tiny_llama():
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, head_dim=8, intermediate_size=48, vocab_size=100,
                                            max_position_embeddings=64)).eval()


# --------------------------------------------------------------------------- modes
@pytest.mark.parametrize("mask", UMASKS, ids=["umask022", "umask077"])
def test_save_and_save_subnet_modes_follow_the_umask_and_keep_an_overwritten_files(tmp_path, mask):
    em = toy()
    with umask(mask):
        for write in (lambda p, **kw: elasticize.save(em, p, **kw),
                      lambda p, **kw: checkpoint.save_subnet(em, "medium", p, **kw)):
            new, old = tmp_path / "new.safetensors", tmp_path / "old.safetensors"
            write(new)
            assert mode(new) == 0o666 & ~mask  # as open() makes it (mkstemp and safetensors make 0600)
            old.write_bytes(b"x")
            os.chmod(old, 0o644)
            write(old, overwrite=True)
            assert mode(old) == 0o644 and old.stat().st_size > 1
            new.unlink()
    assert hidden(tmp_path) == []  # no temporary files left


@pytest.mark.parametrize("mask", UMASKS, ids=["umask022", "umask077"])
def test_cli_convert_and_extract_modes(tmp_path, mask):
    out, sub = tmp_path / "toy.safetensors", tmp_path / "sub.safetensors"
    with umask(mask):
        res = CliRunner().invoke(main, ["convert", "toy_models:ToyCNN", "--kwarg", "c=8", "-o", str(out)])
        assert res.exit_code == 0, res.output
        res = CliRunner().invoke(main, ["extract", "--trust-remote-code", str(out), "--preset", "medium", "-o", str(sub)])
        assert res.exit_code == 0, res.output
        assert mode(out) == mode(sub) == 0o666 & ~mask
        os.chmod(out, 0o644)
        os.chmod(sub, 0o644)
        res = CliRunner().invoke(main, ["convert", "toy_models:ToyCNN", "--kwarg", "c=8", "-o", str(out), "--force"])
        assert res.exit_code == 0, res.output
        res = CliRunner().invoke(main, ["extract", "--trust-remote-code", str(out), "--preset", "tiny", "-o", str(sub), "--force"])
        assert res.exit_code == 0, res.output
        assert mode(out) == mode(sub) == 0o644
    assert hidden(tmp_path) == []


@pytest.mark.parametrize("mask", UMASKS, ids=["umask022", "umask077"])
def test_cli_train_output_and_state_modes(job, tmp_path, mask):
    _, images, model = job
    out, state = tmp_path / "trained.safetensors", tmp_path / "state.safetensors"
    args = ["train", "--trust-remote-code", str(model), "--data", str(images), "--steps", "1", "--batch-size", "8", "--device", "cpu",
            "-o", str(out), "--state", str(state)]
    with umask(mask):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 0, res.output
        assert mode(out) == mode(state) == 0o666 & ~mask
        os.chmod(out, 0o644)
        os.chmod(state, 0o644)
        res = CliRunner().invoke(main, [*args, "--force"])
        assert res.exit_code == 0, res.output
        assert mode(out) == mode(state) == 0o644
    assert hidden(tmp_path) == []


@pytest.mark.parametrize("mask", UMASKS, ids=["umask022", "umask077"])
def test_trainer_save_and_save_state_modes(tmp_path, mask):
    torch.manual_seed(0)
    em = elasticize.elasticize(DigitsResNet(c=8).eval(), dims=("width",))
    data = [(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))]
    tr = Trainer(em, data, optimizer=torch.optim.SGD(em.parameters(), 0.01), loss_fn=nn.CrossEntropyLoss())
    tr.train_steps(1)
    out, state = tmp_path / "m.safetensors", tmp_path / "s.safetensors"
    with umask(mask):
        tr.save(str(out))
        tr.save_state(str(state))
        assert mode(out) == mode(state) == 0o666 & ~mask
        os.chmod(out, 0o644)
        os.chmod(state, 0o644)
        tr.save(str(out), overwrite=True)
        tr.save_state(str(state))
        assert mode(out) == mode(state) == 0o644


@pytest.mark.parametrize("mask", UMASKS, ids=["umask022", "umask077"])
def test_hf_folder_modes(tmp_path, mask):
    em = elasticize.elasticize(_tiny_llama())
    out = tmp_path / "hf"
    with umask(mask):
        em.save_pretrained(str(out), "small")
        assert mode(out) == 0o777 & ~mask  # mkdtemp made 0700
        files = list(out.iterdir())
        assert files and all(mode(f) == 0o666 & ~mask for f in files), {f.name: oct(mode(f)) for f in files}
        os.chmod(out, 0o755)
        em.save_pretrained(str(out), "tiny", overwrite=True)
        assert mode(out) == 0o755  # a replaced folder keeps its mode
    assert hidden(tmp_path) == []


# --------------------------------------------------------------------------- the folder swap
def _folder(files: dict[str, str]):
    def build(d: Path) -> None:
        for name, text in files.items():
            (d / name).write_text(text)
    return build


def _contents(d: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in d.iterdir()}


OLD = {"config.json": "old", "model.safetensors": "old weights"}
NEW = {"config.json": "new", "model.safetensors": "new weights", "tokenizer.json": "new"}


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_a_crash_mid_swap_leaves_the_old_or_the_new_folder_whole(tmp_path, monkeypatch, exchange):
    from elasticize import _files

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    if exchange and not _files._exchange(a, b):
        pytest.skip("this system or file system has no renameat2(RENAME_EXCHANGE)")
    a.rmdir()
    b.rmdir()
    out = tmp_path / "hf"
    _files.swap_folder(out, _folder(OLD))

    def two_renames() -> None:
        if not exchange:
            monkeypatch.setattr(_files, "_exchange", lambda a, b: False)
    two_renames()

    # 1. the build fails: the old folder stays, no temporary folder
    def broken(d: Path) -> None:
        _folder(NEW)(d)
        raise RuntimeError("crash while writing")
    with pytest.raises(RuntimeError):
        _files.swap_folder(out, broken, overwrite=True)
    assert _contents(out) == OLD and hidden(tmp_path) == []

    # 2. the swap itself fails (the exchange, or the rename that puts the new folder in place)
    if exchange:
        def fail(a, b):
            raise OSError(5, "Input/output error", str(a))
        monkeypatch.setattr(_files, "_exchange", fail)
    else:
        real_rename, calls = os.rename, []

        def rename(a, b):
            calls.append(a)
            if len(calls) == 2:
                raise OSError(5, "Input/output error", str(a))
            real_rename(a, b)
        monkeypatch.setattr(_files.os, "rename", rename)
    with pytest.raises(OSError):
        _files.swap_folder(out, _folder(NEW), overwrite=True)
    assert _contents(out) == OLD and hidden(tmp_path) == []  # the old folder is back in place
    monkeypatch.undo()
    two_renames()

    # 3. a crash right after the swap, while the old folder is removed: the new one is whole
    real_remove = _files._remove

    def remove(p: Path) -> None:
        monkeypatch.setattr(_files, "_remove", real_remove)
        raise KeyboardInterrupt
    monkeypatch.setattr(_files, "_remove", remove)
    with pytest.raises(KeyboardInterrupt):
        _files.swap_folder(out, _folder(NEW), overwrite=True)
    assert _contents(out) == NEW
    # with two renames the old folder may be left hidden; it is ours, and swept once this process is gone
    assert all(_files._TEMP.fullmatch(n) for n in hidden(tmp_path))


def test_hf_export_crash_mid_swap_keeps_the_old_folder_loadable(tmp_path, monkeypatch):
    from elasticize import _files

    T = pytest.importorskip("transformers")
    em = elasticize.elasticize(_tiny_llama())
    out = tmp_path / "hf"
    em.save_pretrained(str(out), "small")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(_files, "_exchange", lambda a, b: False)
    real = os.rename
    calls = []

    def rename(a, b):  # the second rename (new folder into place) fails
        calls.append(a)
        if len(calls) == 2:
            raise OSError(28, "No space left on device", str(b))
        real(a, b)
    monkeypatch.setattr(_files.os, "rename", rename)
    with pytest.raises(OSError):
        em.save_pretrained(str(out), "tiny", overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and hidden(tmp_path) == []
    assert T.AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers >= 1


# --------------------------------------------------------------------------- stale temporary files
def test_a_killed_save_leaves_a_temporary_file_the_next_save_removes(tmp_path):
    """A real SIGKILL after the full-size file is written, before the rename."""
    out = tmp_path / "m.safetensors"
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import torch, elasticize
from elasticize import checkpoint
from toy_models import ToyCNN
em = elasticize.elasticize(ToyCNN(c=8).eval())
real = checkpoint.save_file
def killed(tensors, path, metadata=None):
    real(tensors, path, metadata=metadata)
    os.kill(os.getpid(), signal.SIGKILL)
checkpoint.save_file = killed
elasticize.save(em, {str(out)!r})
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(elasticize.__file__).parent.parent),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert hidden(tmp_path) and not out.exists()
    left = sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file())
    (tmp_path / "notes.txt").write_text("mine")
    other = elasticize.save(toy(), tmp_path / "other.safetensors")
    assert left >= 0.9 * other.stat().st_size  # the killed save had written a full-size file
    assert hidden(tmp_path) == [] and sorted(os.listdir(tmp_path)) == ["notes.txt", "other.safetensors"]


def test_sweep_removes_only_dead_writers_entries_and_puts_a_replaced_folder_back(tmp_path):
    from elasticize import _files

    dead = dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale_file = tmp_path / _files.temp_name("a.safetensors", pid=dead)
        stale_file.write_bytes(b"x" * 1000)
        stale_dir = tmp_path / _files.temp_name("b.safetensors", pid=dead)
        stale_dir.mkdir()
        (stale_dir / ".tmpAbC123").write_bytes(b"x" * 1000)  # safetensors' own temporary file inside ours
        stale_old = tmp_path / _files.temp_name("hf", "old", pid=dead)  # killed between the two renames
        stale_old.mkdir()
        (stale_old / "config.json").write_text("old")
        stale_new = tmp_path / _files.temp_name("hf", pid=dead)
        stale_new.mkdir()
        keep = [tmp_path / _files.temp_name("c.safetensors", pid=live.pid),  # a running writer's
                tmp_path / _files.temp_name("d.safetensors"),  # this process's
                # another host's (its pid is not this host's to judge)
                tmp_path / _files.temp_name("e.safetensors", pid=dead).replace(_files._host(), "0badc0de"),
                tmp_path / ".tmpXyZ987", tmp_path / ".m.safetensors.1234.tmp", tmp_path / "notes.elasticize-tmp",
                tmp_path / "model.safetensors"]
        for p in keep:
            p.write_text("keep")
        elasticize.save(toy(), tmp_path / "new.safetensors")
        assert (tmp_path / "hf" / "config.json").read_text() == "old"  # put back
        assert sorted(os.listdir(tmp_path)) == sorted([p.name for p in keep] + ["hf", "new.safetensors"])
    finally:
        live.kill()
        live.wait()


# --------------------------------------------------------------------------- refused before any work
def _tripwire(monkeypatch, target, name: str) -> None:
    def boom(*a, **k):
        raise AssertionError(f"{name} ran: the output should have been refused before it")
    monkeypatch.setattr(target, name, boom)


def test_wrong_kind_outputs_are_refused_with_one_line_before_work(job, tmp_path, monkeypatch):
    d, images, model = job
    folder, file = tmp_path / "folder", tmp_path / "file"
    folder.mkdir()
    (folder / "keep.txt").write_text("keep")
    file.write_text("keep")
    _tripwire(monkeypatch, checkpoint, "load")
    runner = CliRunner()
    for force in ([], ["--force"]):
        res = runner.invoke(main, ["extract", "--trust-remote-code", str(model), "--preset", "medium", "-o", str(folder), *force])
        one_line_error(res, "is a folder", "file path")
        res = runner.invoke(main, ["extract", "--trust-remote-code", str(model), "--preset", "medium", "--format", "hf", "-o", str(file),
                                   *force])
        one_line_error(res, "is a file", "folder path")
    assert _contents(folder) == {"keep.txt": "keep"} and file.read_text() == "keep"
    # convert and train declare -o and --state as files: click refuses a folder at parsing
    import elasticize.model as model_mod
    import elasticize.train.run as run_mod
    _tripwire(monkeypatch, model_mod, "convert")
    _tripwire(monkeypatch, run_mod, "train_file")
    for args in (["convert", "toy_models:ToyCNN", "-o", str(folder), "--force"],
                 ["train", "--trust-remote-code", str(model), "--data", str(images), "--steps", "1", "-o", str(folder), "--force"],
                 ["train", "--trust-remote-code", str(model), "--data", str(images), "--steps", "1", "-o", str(tmp_path / "t.safetensors"),
                  "--state", str(folder)]):
        res = runner.invoke(main, args)
        assert res.exit_code == 2 and isinstance(res.exception, SystemExit) and "is a directory" in res.output
    monkeypatch.undo()
    # the Python API
    em = toy()
    for call in (lambda: elasticize.save(em, folder, overwrite=True),
                 lambda: checkpoint.save_subnet(em, "medium", folder, overwrite=True)):
        with pytest.raises(FileExistsError, match="is a folder"):
            call()
    _tripwire(monkeypatch, checkpoint, "load")
    from elasticize.train.run import train_file
    for kw in ({"output": folder}, {"output": tmp_path / "t.safetensors", "state": folder}):
        with pytest.raises(FileExistsError, match="is a folder"):
            train_file(model, data=images, steps=1, overwrite=True, **kw)
    assert _contents(folder) == {"keep.txt": "keep"}


def test_hf_export_to_a_file_is_refused_before_the_extraction(tmp_path, monkeypatch):
    em = elasticize.elasticize(_tiny_llama())
    file = tmp_path / "model"
    file.write_text("keep")
    _tripwire(monkeypatch, em, "extract")
    with pytest.raises(FileExistsError, match="is a file"):
        em.save_pretrained(str(file), "small", overwrite=True)
    assert file.read_text() == "keep"


@contextlib.contextmanager
def unprivileged():
    """Permission checks as an ordinary user: root ignores a folder's mode, so as root the
    effective user becomes ``nobody`` meanwhile."""
    if os.geteuid() != 0:
        yield
        return
    try:
        os.setegid(65534)
        os.seteuid(65534)
    except OSError as e:
        os.setegid(0)
        pytest.skip(f"cannot drop privileges to test a read-only folder: {e}")
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@pytest.fixture
def readonly(job):
    """(a folder nobody may write in, the model file, the image folder), reachable by ``nobody``."""
    _, images, model = job
    base = Path(tempfile.mkdtemp(prefix="elasticize-ro-"))
    try:
        os.chmod(base, 0o777)  # nobody may write here, not in base / "ro"
        shutil.copy(model, base / "m.safetensors")
        shutil.copytree(images, base / "images")
        for p in [base / "m.safetensors", *(base / "images").rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        os.chmod(base / "images", 0o755)
        ro = base / "ro"
        ro.mkdir()
        os.chmod(ro, 0o555)
        yield ro, base / "m.safetensors", base / "images"
    finally:
        os.chmod(base / "ro", 0o755)
        shutil.rmtree(base, ignore_errors=True)


def test_a_read_only_folder_is_refused_with_one_line_before_work(readonly, monkeypatch):
    import elasticize.model as model_mod
    import elasticize.train.run as run_mod
    from elasticize.train.run import train_file

    ro, model, images = readonly
    em = toy()
    runner = CliRunner()
    with unprivileged():
        for target, name in ((model_mod, "convert"), (checkpoint, "load"), (run_mod, "train_file")):
            _tripwire(monkeypatch, target, name)
        cases = [["convert", "toy_models:ToyCNN", "-o", str(ro / "c.safetensors")],
                 ["extract", "--trust-remote-code", str(model), "--preset", "medium", "-o", str(ro / "s.safetensors")],
                 ["extract", "--trust-remote-code", str(model), "--preset", "medium", "--format", "hf", "-o", str(ro / "hf")],
                 ["extract", "--trust-remote-code", str(model), "--preset", "medium", "--format", "hf", "-o", str(ro / "deeper" / "hf")],
                 ["train", "--trust-remote-code", str(model), "--data", str(images), "--steps", "1", "-o", str(ro / "t.safetensors")],
                 ["train", "--trust-remote-code", str(model), "--data", str(images), "--steps", "1", "-o", str(model.parent / "t.safetensors"),
                  "--state", str(ro / "state.safetensors")]]
        for args in cases:
            one_line_error(runner.invoke(main, args), "cannot write in folder", str(ro))
        monkeypatch.undo()
        _tripwire(monkeypatch, checkpoint, "load")
        for kw in ({"output": ro / "t.safetensors"}, {"output": model.parent / "t.safetensors",
                                                      "state": ro / "state.safetensors"}):
            with pytest.raises(PermissionError, match="cannot write in folder"):
                train_file(model, data=images, steps=1, **kw)
        monkeypatch.undo()
        for call in (lambda: elasticize.save(em, ro / "m.safetensors"),
                     lambda: checkpoint.save_subnet(em, "medium", ro / "m.safetensors")):
            with pytest.raises(PermissionError, match="cannot write in folder"):
                call()
    assert os.listdir(ro) == [] and not (model.parent / "t.safetensors").exists()


def test_a_write_that_fails_midway_is_one_line_and_leaves_nothing(job, tmp_path):
    """A real I/O error inside safetensors (the file size limit, as a full disk would):
    safetensors raises its own SafetensorError, which the CLI reports as the OSError it is."""
    resource = pytest.importorskip("resource")
    _, _, model = job
    out = tmp_path / "sub.safetensors"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (model.stat().st_size // 2, hard))
    try:
        res = CliRunner().invoke(main, ["extract", "--trust-remote-code", str(model), "--preset", "full", "-o", str(out)])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    one_line_error(res, str(out), "File too large")
    assert os.listdir(tmp_path) == []
