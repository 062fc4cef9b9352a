"""The small files that travel with a transformers model inside an elasticize file: its tokenizer,
generation and preprocessor files (:data:`TOKENIZER_FILES`), read from a model folder (or the
local hub cache), checked by name, written into a folder, or made into a tokenizer."""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path
from typing import Any, Mapping

__all__ = ["TOKENIZER_FILES", "FILES_CAP", "has_tokenizer", "check_file_name", "folder_files", "write_files",
           "tokenizer_from_files", "hub_folder"]

#: the file names (in a model folder) that travel with the model
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "tokenizer.model", "spiece.model", "added_tokens.json", "chat_template.jinja",
                   "generation_config.json", "preprocessor_config.json")
#: the files of TOKENIZER_FILES that make a tokenizer or an image/audio processor (a folder without any has none)
_PROCESSOR_FILES = tuple(n for n in TOKENIZER_FILES if n != "generation_config.json")
#: the most bytes of a model folder's TOKENIZER_FILES that travel inside an elasticize file (all of them together)
FILES_CAP = 64 * 2**20


def has_tokenizer(names: Any) -> bool:
    """Whether the file names ``names`` include a tokenizer or preprocessor file (not only ``generation_config.json``)."""
    return any(n in _PROCESSOR_FILES for n in names)


def check_file_name(name: str) -> str:
    """``name``, if it may travel with an elasticize file: one of :data:`TOKENIZER_FILES` or of the
    sentence-transformers files (:data:`~elasticize.adapters.hf.sentence.SENTENCE_FILES`, a plain
    file name, or a module's ``<n>_<Name>/config.json``, :data:`~elasticize.adapters.hf.sentence.MODULE_CONFIG`).

    Raises:
        ValueError: any other name (another path, ``..``, a name outside the allow-list).
    """
    from .sentence import MODULE_CONFIG, SENTENCE_FILES

    plain = isinstance(name, str) and name in TOKENIZER_FILES + SENTENCE_FILES and os.path.basename(name) == name \
        and "/" not in name and "\\" not in name
    if not plain and not (isinstance(name, str) and MODULE_CONFIG.fullmatch(name)):
        raise ValueError(f"{name!r} is not a file name elasticize stores with a model; allowed: "
                         f"{', '.join(TOKENIZER_FILES + SENTENCE_FILES)} and <n>_<Module>/config.json")
    return name


def _inside(target: Path, root: Path) -> bool:
    try:
        target.relative_to(root)
        return True
    except ValueError:
        return False


def folder_files(folder: str | os.PathLike, *, cap: int | None = FILES_CAP) -> dict[str, bytes]:
    """The tokenizer, generation and preprocessor files (:data:`TOKENIZER_FILES`) of a model folder.

    Only regular files are read. A symbolic link counts when it points at a regular file inside the
    folder, or, for a Hugging Face hub cache snapshot (``.../snapshots/<revision>``), inside that
    model's cache folder (the snapshot's links point at its ``blobs``); a link elsewhere is left out
    with a warning, so converting a downloaded folder never embeds some other file of this machine.

    Args:
        folder: the model folder.
        cap: the most bytes read in all; when the files are larger together, none is returned and a
            ``UserWarning`` says so (a tokenizer without some of its files would tokenize otherwise).
            None: no limit.

    Returns:
        File name -> contents, in :data:`TOKENIZER_FILES` order; empty for a folder without them.
    """
    root = Path(folder).resolve()
    allowed = root.parent.parent if root.parent.name == "snapshots" else root
    out: dict[str, bytes] = {}
    total = 0
    for name in TOKENIZER_FILES:
        f = Path(folder) / name
        try:
            st = os.stat(f)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        if f.is_symlink() and not _inside(f.resolve(), allowed):
            warnings.warn(f"{f} is a link to {f.resolve()}, outside the model folder: not stored with the model",
                          stacklevel=2)
            continue
        with open(f, "rb") as fh:
            data = fh.read() if cap is None else fh.read(cap - total + 1)
        total += len(data)
        if cap is not None and total > cap:
            warnings.warn(f"the tokenizer files of {folder} exceed {cap / 2**20:.0f} MiB together: none is stored "
                          "with the model; copy them into exported folders yourself", stacklevel=2)
            return {}
        out[name] = data
    return out


def write_files(files: Mapping[str, bytes], folder: str | os.PathLike) -> list[str]:
    """Write ``files`` (name -> contents, names checked by :func:`check_file_name`) into ``folder``.

    Returns:
        The names written.

    Raises:
        ValueError: a name outside :data:`TOKENIZER_FILES` or with a path in it.
    """
    names = [check_file_name(n) for n in files]
    for name in names:
        (Path(folder) / name).parent.mkdir(exist_ok=True)  # a sentence-transformers module's 1_Pooling/
        (Path(folder) / name).write_bytes(bytes(files[name]))
    return names


def tokenizer_from_files(files: Mapping[str, bytes], *, config: Mapping[str, Any] | None = None) -> Any:
    """The Hugging Face tokenizer that ``files`` (an elasticize file's embedded files) make.

    They are written to a temporary folder, ``AutoTokenizer.from_pretrained`` reads it, and the
    folder is removed.

    Args:
        files: file name -> contents.
        config: the model's config (the recipe's), written as ``config.json`` beside them: a
            ``tokenizer_config.json`` that names no tokenizer class leaves the choice to the model type.

    Raises:
        ValueError: no tokenizer file among ``files``, a name :func:`check_file_name` refuses, or
            files transformers cannot make a tokenizer of.
    """
    import json
    import tempfile

    from transformers import AutoTokenizer

    if not any(n in files for n in _PROCESSOR_FILES if n != "preprocessor_config.json"):
        raise ValueError("the model's file holds no tokenizer files")
    with tempfile.TemporaryDirectory(prefix="elasticize-tokenizer.") as tmp:
        write_files(files, tmp)
        if config:
            (Path(tmp) / "config.json").write_text(json.dumps(dict(config)))
        try:
            return AutoTokenizer.from_pretrained(tmp)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"the tokenizer files stored with the model do not make a tokenizer: {e}") from None


def hub_folder(name: str) -> Path | None:
    """The local hub-cache snapshot folder of hub id ``name`` (no network), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json")
    except Exception:  # noqa: BLE001 - not a valid hub id, no cache: nothing to read
        return None
    return Path(found).parent if isinstance(found, str) else None
