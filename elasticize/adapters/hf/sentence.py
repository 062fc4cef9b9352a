"""The sentence-transformers files that travel with a transformers model: ``modules.json``, the
pooling and normalisation modules' configs, and ``sentence_bert_config.json``.

A sentence-transformers folder is a transformers folder plus these files
(https://sbert.net/docs/sentence_transformer/usage/custom_models.html). They are read at
conversion (:func:`sentence_files`), stored in the elasticize file as data like the tokenizer
files (names allowed by :func:`elasticize.adapters.hf.check_file_name`, contents checked by
sha256), and written into exported folders with the pooling dimension set to the sub-network's
hidden size (:func:`fit_sentence_files`), so ``SentenceTransformer(folder)`` loads the
sub-network with the original pooling and normalisation. Only the module types that hold no
weights and run no user code are carried: the transformer itself (at the folder's root),
``Pooling`` and ``Normalize``; a model with any other module (``Dense``, a custom class) keeps
its tokenizer but not these files, and a warning says so.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Mapping

__all__ = ["SENTENCE_FILES", "MODULE_CONFIG", "sentence_files", "fit_sentence_files", "is_sentence_model"]

#: the sentence-transformers files at a folder's root
SENTENCE_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
#: a module's config inside its numbered folder, e.g. ``1_Pooling/config.json``
MODULE_CONFIG = re.compile(r"[0-9]{1,3}_[A-Za-z]{1,40}/config\.json")
#: the module classes carried (last part of the ``type`` in ``modules.json``)
_MODULES = ("Transformer", "Pooling", "Normalize")
#: the most bytes of one such file (they are a few hundred bytes)
_CAP = 64 * 2**10


def _modules(data: bytes) -> list[dict[str, Any]]:
    """The entries of a ``modules.json``, checked.

    Raises:
        ValueError: not a JSON list of ``{"idx", "name", "path", "type"}`` entries whose type is a
            ``sentence_transformers.`` Transformer (at path ``""``), Pooling or Normalize, with paths
            of the form ``1_Pooling``.
    """
    try:
        mods = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ValueError("modules.json is not JSON") from None
    if not isinstance(mods, list) or not 1 <= len(mods) <= 16:
        raise ValueError("modules.json must be a list of 1 to 16 modules")
    for m in mods:
        if not isinstance(m, dict) or not all(isinstance(m.get(k), str) for k in ("name", "path", "type")):
            raise ValueError(f"modules.json: {m!r:.80} is not a module entry (name, path, type)")
        kind = m["type"].rpartition(".")[2]
        if not m["type"].startswith("sentence_transformers.") or kind not in _MODULES:
            raise ValueError(f"modules.json: module type {m['type']!r:.100} is not one elasticize carries "
                             f"({', '.join(_MODULES)})")
        if (kind == "Transformer") != (m["path"] == "") or m["path"] and not MODULE_CONFIG.fullmatch(
                m["path"] + "/config.json"):
            raise ValueError(f"modules.json: module {m['name']!r:.40} has path {m['path']!r:.80}; elasticize carries "
                             "the transformer at the folder's root and other modules in folders like 1_Pooling")
    if sum(m["type"].endswith(".Transformer") for m in mods) != 1:
        raise ValueError("modules.json must name exactly one Transformer module")
    return mods


def sentence_files(folder: str | os.PathLike) -> dict[str, bytes]:
    """The sentence-transformers files of a model folder (:data:`SENTENCE_FILES` and the configs of
    its Pooling and Normalize modules), or ``{}`` for a folder without ``modules.json``.

    Only regular files inside the folder are read. A ``modules.json`` that names another kind of
    module (or is malformed) gives ``{}`` and a ``UserWarning``: the exported folder is then a plain
    transformers folder, and ``SentenceTransformer`` on it would pool without that module.
    """
    root = Path(folder)
    out: dict[str, bytes] = {}
    names = list(SENTENCE_FILES)
    try:
        data = _read(root, "modules.json")
        if data is None:
            return {}
        names += [m["path"] + "/config.json" for m in _modules(data) if m["path"]]
    except ValueError as e:
        warnings.warn(f"{root}: the sentence-transformers modules are not stored with the model ({e}); exported "
                      "folders are plain transformers folders", stacklevel=2)
        return {}
    for name in names:
        data = _read(root, name)
        if data is not None:
            out[name] = data
    return out


def _read(root: Path, name: str) -> bytes | None:
    """The file ``root/name`` if it is a regular file inside ``root`` of at most :data:`_CAP` bytes."""
    f = root / name
    try:
        if not f.is_file() or not f.resolve().is_relative_to(root.resolve()):
            return None
        with open(f, "rb") as fh:
            data = fh.read(_CAP + 1)
    except OSError:
        return None
    if len(data) > _CAP:
        raise ValueError(f"{name} is over {_CAP // 1024} KiB")
    return data


def is_sentence_model(files: Mapping[str, bytes]) -> bool:
    """Whether the stored files ``files`` make a sentence-transformers folder (they hold ``modules.json``)."""
    return "modules.json" in files


def fit_sentence_files(files: Mapping[str, bytes], hidden_size: int) -> dict[str, bytes]:
    """``files`` with each Pooling module's dimension set to ``hidden_size`` (a sub-network may be narrower).

    Raises:
        ValueError: a ``modules.json`` that :func:`_modules` refuses, or a module config that is
            not a JSON object.
    """
    out = dict(files)
    if "modules.json" not in out or hidden_size <= 0:
        return out
    for m in _modules(bytes(out["modules.json"])):
        name = m["path"] + "/config.json"
        if not m["type"].endswith(".Pooling") or name not in out:
            continue
        try:
            cfg = json.loads(bytes(out[name]).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            cfg = None
        if not isinstance(cfg, dict):
            raise ValueError(f"the stored {name} is not a JSON object")
        for key in ("word_embedding_dimension", "embedding_dimension"):  # sentence-transformers < 6, >= 6
            if key in cfg:
                cfg[key] = int(hidden_size)
        out[name] = (json.dumps(cfg, indent=2) + "\n").encode()
    return out
