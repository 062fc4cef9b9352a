"""Writing output files and folders: the one place that does it.

* :func:`check_output` checks an output path before any long work: its kind (a file output is
  not an existing folder, a folder output not an existing file), ``overwrite``, that it is not
  one of the inputs, and that its folder exists and can be written in.
* :func:`atomic_write` writes a file through a temporary file in the same folder and
  ``os.replace``; :func:`swap_folder` builds a folder beside its destination and swaps it into
  place (``renameat2(RENAME_EXCHANGE)`` on Linux, so the old or the new folder is always at the
  destination; elsewhere two renames, and the old folder is kept hidden between them).
* Modes are what ``open()`` and ``os.mkdir`` give: ``0666 & ~umask`` for a new file and
  ``0777 & ~umask`` for a new folder; an overwritten file or replaced folder keeps its mode.
* Temporary names are ``.<name>.<host>-<pid>.<random>.elasticize-tmp`` (``-old`` for a replaced
  folder kept between two renames); a file is written inside a temporary folder of that name.
  :func:`sweep` removes those whose writer, on this host, is no longer running; every write (and
  :func:`check_output`) sweeps its folder first. Nothing else is ever removed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import re
import secrets
import shutil
import socket
import stat
import sys
import threading
from pathlib import Path
from typing import Callable, Iterable

__all__ = ["check_output", "atomic_write", "swap_folder", "sweep", "temp_name", "umask", "file_mode", "folder_mode"]

_SUFFIX = ".elasticize-"
#: room left for the host, pid, random part and suffix within a 255-byte file name
_NAME_MAX = 100
_TEMP = re.compile(r"\.(?P<name>.+)\.(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]+)\.[0-9a-f]{8}\.elasticize-(?P<kind>tmp|old)",
                   re.DOTALL)
_umask_lock = threading.Lock()


# --------------------------------------------------------------------------- modes
def umask() -> int:
    """This process's umask: read from ``/proc/self/status`` where the kernel lists it (Linux),
    else set and restored under a lock (briefly to 0o077, so a file another thread creates
    meanwhile gets a stricter mode, never a looser one)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:
        old = os.umask(0o077)
        os.umask(old)
    return old


def file_mode() -> int:
    """The mode ``open()`` gives a new file: ``0o666 & ~umask``."""
    return 0o666 & ~umask()


def folder_mode() -> int:
    """The mode ``os.mkdir`` gives a new folder: ``0o777 & ~umask``."""
    return 0o777 & ~umask()


# --------------------------------------------------------------------------- temporary names
def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def temp_name(name: str, kind: str = "tmp", *, pid: int | None = None) -> str:
    """A hidden name beside ``name`` that says who wrote it: this host, ``pid`` (default: this
    process) and a random part; ``kind`` is ``"tmp"`` (being written) or ``"old"`` (a replaced
    folder, kept until the new one is in place)."""
    return (f".{name[:_NAME_MAX]}.{_host()}-{os.getpid() if pid is None else pid}.{secrets.token_hex(4)}"
            f"{_SUFFIX}{kind}")


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists (True when that cannot be told: nothing is swept then)."""
    if pid == os.getpid():
        return True
    if os.name != "posix" or pid <= 0:  # os.kill on Windows would terminate the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, another user's
        return True
    return True


def _remove(path: Path) -> None:
    """Remove a file, link or folder tree of ours, ignoring errors (never follows a link)."""
    try:
        if path.is_symlink() or not path.is_dir():
            path.unlink()
        else:
            shutil.rmtree(path, ignore_errors=True)
    except OSError:
        pass


def sweep(folder: str | os.PathLike) -> list[Path]:
    """Remove the stale temporary files and folders that elasticize writers left in ``folder``.

    An entry is stale when its name is one of :func:`temp_name`'s, it was written on this host,
    and the process that wrote it is gone (killed mid-write). A stale ``-old`` folder (a replaced
    folder whose writer died between its two renames) is renamed back to its name when nothing
    is there, else removed. Entries of running processes and every other file are left alone.
    Errors are ignored: sweeping is housekeeping.

    Returns:
        The entries removed or put back.
    """
    d = Path(folder)
    done: list[Path] = []
    try:
        names = os.listdir(d)
    except OSError:
        return done
    host = _host()
    for n in names:
        m = _TEMP.fullmatch(n)
        if m is None or m["host"] != host or _running(int(m["pid"])):
            continue
        p = d / n
        if m["kind"] == "old":
            target = d / m["name"]
            if len(m["name"]) < _NAME_MAX and not os.path.lexists(target) and p.is_dir() and not p.is_symlink():
                with contextlib.suppress(OSError):
                    os.rename(p, target)
                    done.append(p)
                continue
            if not os.path.lexists(target):
                continue  # the only copy of a folder whose full name the temporary name cut: keep it
        _remove(p)
        if not os.path.lexists(p):
            done.append(p)
    return done


# --------------------------------------------------------------------------- checks
def _same(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _inside(inner: Path, outer: Path) -> bool:
    try:
        return inner.exists() and outer.is_dir() and inner.resolve().is_relative_to(outer.resolve())
    except OSError:
        return False


def _probe(folder: Path) -> None:
    """Create and remove an empty temporary file in ``folder``: the only sure test that a file
    can be created there (permissions, ACLs, read-only mounts, root).

    Raises:
        PermissionError: it cannot.
    """
    p = folder / temp_name("write-check")
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except PermissionError:
        raise PermissionError(f"cannot write in folder {folder} (permission denied); choose another output path "
                              "or make the folder writable") from None
    except OSError as e:
        if e.errno != errno.EROFS:
            raise
        raise PermissionError(f"cannot write in folder {folder}: it is on a read-only file system; choose another "
                              "output path") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(p)


def check_output(path: str | os.PathLike, *, kind: str = "file", overwrite: bool = False,
                 inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Check that ``path`` can be written as a ``kind`` output, before any long work.

    Sweeps the folder's stale temporary files first (see :func:`sweep`). A file output needs
    its folder to exist; a folder output's missing parents are created when it is written, so
    the nearest existing one is checked.

    Args:
        path: the output.
        kind: ``"file"`` (replaced by :func:`atomic_write`) or ``"folder"`` (:func:`swap_folder`).
        overwrite: an existing output of the same kind may be replaced.
        inputs: paths the output must not be (None entries are skipped); a folder output must
            not hold one either (replacing it would delete the input).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: ``kind`` is neither, or ``path`` is one of ``inputs`` or (a folder) holds one.
        FileExistsError: ``path`` is an existing folder for a file output, an existing file for a
            folder output, neither a regular file nor a folder, or exists and ``overwrite`` is False.
        FileNotFoundError: the folder of a file output does not exist, or a parent is a file.
        PermissionError: the folder cannot be written in (or a folder to replace cannot be emptied).
        OSError: another error of the file system while checking.
    """
    if kind not in ("file", "folder"):
        raise ValueError(f"kind must be 'file' or 'folder', not {kind!r}")
    p = Path(path)
    for src in inputs:
        if src is None:
            continue
        s = Path(src)
        if _same(p, s):
            what = "folder" if s.is_dir() else "file"
            raise ValueError(f"refusing to write {p}: it is the input {what}; choose another output path")
        if kind == "folder" and _inside(s, p):
            raise ValueError(f"refusing to replace {p}: it holds the input {s}; choose another output folder")
    parent = p.parent
    while kind == "folder" and not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent  # save creates the missing ones
    if parent.is_dir():
        sweep(parent)
    if os.path.lexists(p):
        if kind == "file" and p.is_dir():
            raise FileExistsError(f"{p} is a folder, and this output is one file; give a file path such as "
                                  f"{p / 'model.safetensors'} (--force never replaces a folder with a file)")
        if kind == "file" and not p.is_file():
            raise FileExistsError(f"{p} exists and is not a regular file; choose another output path")
        if kind == "folder" and not p.is_dir():
            raise FileExistsError(f"{p} is a file, and this output is a folder; give a folder path (--force never "
                                  "replaces a file with a folder)")
        if not overwrite:
            raise FileExistsError(f"{p} exists; pass overwrite=True (CLI: --force) to replace it, or choose another "
                                  "path")
        if kind == "folder" and not os.access(p, os.W_OK | os.X_OK):
            raise PermissionError(f"cannot replace folder {p}: it is not writable, so its old files could not be "
                                  "removed; choose another output folder or make it writable")
    if not parent.exists():
        raise FileNotFoundError(f"folder {parent} does not exist; create it first")
    if not parent.is_dir():
        raise FileNotFoundError(f"{parent} is a file, not a folder; choose an output path inside a folder")
    _probe(parent)
    return p


# --------------------------------------------------------------------------- writes
_OS_ERROR = re.compile(r"\(os error ([0-9]+)\)")


@contextlib.contextmanager
def _os_errors(path: Path):
    """The ``OSError`` inside a writer's own error: safetensors reports a full disk as
    ``SafetensorError("... I/O error: No space left on device (os error 28)")``."""
    try:
        yield
    except Exception as e:
        m = _OS_ERROR.search(str(e))
        if isinstance(e, OSError) or m is None or type(e).__name__ != "SafetensorError":
            raise
        code = int(m[1])
        raise OSError(code, f"cannot write it: {os.strerror(code)}", str(path)) from e


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], *, overwrite: bool = False,
                 inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Write a file atomically: ``write(tmp)`` writes a file in a temporary folder beside ``path``,
    which then replaces ``path`` (``os.replace``), so ``path`` is the old file or the whole new one.

    The temporary folder also holds whatever ``write`` puts beside its file (safetensors'
    ``save_file`` writes through its own ``.tmpXXXXXX`` file), so :func:`sweep` removes all of
    it after a killed write. The file gets the mode of the file it replaces, or
    ``0o666 & ~umask`` when new (whatever mode ``write`` created it with).

    Args:
        path: the file.
        write: writes the content to the path it is given.
        overwrite, inputs: see :func:`check_output`.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError, FileExistsError, FileNotFoundError, PermissionError: see :func:`check_output`.
        OSError: writing failed (e.g. the disk is full; also when safetensors reports it); nothing
            is left behind.
        Exception: whatever else ``write`` raises; nothing is left behind.
    """
    p = check_output(path, kind="file", overwrite=overwrite, inputs=tuple(inputs))
    mode = stat.S_IMODE(os.stat(p).st_mode) & 0o777 if p.is_file() else file_mode()
    work = p.parent / temp_name(p.name)
    os.mkdir(work, 0o700)
    try:
        tmp = work / p.name
        with _os_errors(p):
            write(str(tmp))
        os.chmod(tmp, mode)
        os.replace(tmp, p)
    finally:
        _remove(work)
    return p


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where the system
    or file system does not offer it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _replace_folder(new: Path, dst: Path) -> None:
    """Put the folder ``new`` at ``dst`` (an existing folder) so that one of them is always there."""
    if _exchange(new, dst):  # ``new`` now holds the old folder
        _remove(new)
        return
    old = dst.parent / temp_name(dst.name, "old")
    os.rename(dst, old)
    try:
        os.rename(new, dst)
    except BaseException:
        os.rename(old, dst)
        raise
    _remove(old)


def _set_modes(folder: Path) -> None:
    """``0o666 & ~umask`` for every file under ``folder``, ``0o777 & ~umask`` for every folder (links untouched)."""
    files, folders = file_mode(), folder_mode()
    for root, dirs, names in os.walk(folder):
        for n in dirs:
            if not os.path.islink(os.path.join(root, n)):
                os.chmod(os.path.join(root, n), folders)
        for n in names:
            f = os.path.join(root, n)
            if not os.path.islink(f):
                os.chmod(f, files)


def swap_folder(path: str | os.PathLike, build: Callable[[Path], None], *, overwrite: bool = False,
                inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Write a folder: ``build(tmp)`` fills a new folder beside ``path``, which then takes its
    place. A failure leaves the old folder (or nothing) and no temporary folder; on Linux the old
    or the new folder is at ``path`` at every moment.

    The folder gets the mode of the folder it replaces, or ``0o777 & ~umask`` when new (missing
    parents too); the files and folders ``build`` writes get ``0o666 & ~umask`` and
    ``0o777 & ~umask`` (safetensors creates its files 0600).

    Args:
        path: the folder.
        build: fills the folder it is given.
        overwrite, inputs: see :func:`check_output`.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError, FileExistsError, FileNotFoundError, PermissionError: see :func:`check_output`.
        OSError: writing (also when safetensors reports it) or renaming failed; the old folder stays.
        Exception: whatever else ``build`` raises; the old folder stays.
    """
    p = check_output(path, kind="folder", overwrite=overwrite, inputs=tuple(inputs))
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.parent / temp_name(p.name)
    os.mkdir(tmp, 0o777)
    try:
        with _os_errors(p):
            build(tmp)
        _set_modes(tmp)
        if p.is_dir():
            os.chmod(tmp, stat.S_IMODE(os.stat(p).st_mode) & 0o777)
            _replace_folder(tmp, p)
        else:
            os.rename(tmp, p)
    except BaseException:
        _remove(tmp)
        raise
    return p
