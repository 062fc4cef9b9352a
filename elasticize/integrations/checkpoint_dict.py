"""Resume dicts (a Lightning checkpoint, your own loop's) as one safetensors file, never a pickle.

``torch.save`` pickles, and loading a pickle can run code. :func:`save_checkpoint_dict` splits a
nested dict into its tensors, stored as safetensors tensors, and everything else, stored as one
JSON tree under the header metadata key ``"elasticize.checkpoint"``; :func:`load_checkpoint_dict`
reads it back with safetensors and ``json`` only, checks every node, and rebuilds the same dict::

    from elasticize.integrations.checkpoint_dict import load_checkpoint_dict, save_checkpoint_dict

    save_checkpoint_dict({"step": 10, "model": model.state_dict(), "optim": opt.state_dict(),
                          "session": session.state()}, "resume.safetensors")
    state = load_checkpoint_dict("resume.safetensors")

What a checkpoint may hold, and how the JSON tree (format version 1) writes what JSON cannot say:

* ``str``, ``int``, ``bool``, ``None`` and finite ``float`` as themselves; ``inf``, ``-inf``,
  ``nan`` as ``{"$float": "inf"}``; a ``list`` as a list and a ``tuple`` as ``{"$tuple": [...]}``.
* A ``dict`` with ``str`` keys as an object (none starting with ``$``); any other ``dict`` (keys
  that are ``int``, ``float``, ``bool``, ``None``, tuples of those, or strings starting with ``$``)
  as ``{"$dict": [[key, value], ...]}``; an ``OrderedDict`` (a module's ``state_dict()``) as
  ``{"$odict": {"items": [[key, value], ...], "metadata": ...}}`` with its ``_metadata`` (the
  modules' state-dict versions).
* A ``torch.Tensor`` (strided, on any device, of a dtype safetensors stores) as
  ``{"$tensor": NAME}``, NAME being its stored tensor (named after its key path, e.g.
  ``optimizer_states[0].state[3].exp_avg``). Views of the same memory (tied weights, the same
  tensor under two keys) are stored once and load as one tensor; other tensors that share
  memory are stored as copies, and non-contiguous ones contiguously.
* A ``torch.dtype`` as ``{"$dtype": "float32"}``; a ``pathlib`` path as ``{"$path": "..."}``.

Anything else (a class instance, a function, a numpy array, a subclass of ``int``/``float``/
``str``/``dict`` such as an enum) is refused with its key path named, before anything is written:
rebuilding it would need pickle. Tensors load on the CPU (or ``device``), and a ``Parameter``
loads as a plain tensor. Writes are atomic (:func:`elasticize._files.atomic_write`: the old file or
the whole new one, ``0o666 & ~umask``).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import OrderedDict
from pathlib import Path, PurePath
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from .._files import atomic_write
from ..fileformat.header import read_header
from ..plan.parse import MAX_JSON_DEPTH, ManifestError, loads
from ..tensorfile import TORCH_DTYPES, aligned, dedupe

__all__ = ["save_checkpoint_dict", "load_checkpoint_dict", "encode", "decode", "CHECKPOINT_KEY", "CHECKPOINT_VERSION"]

#: The safetensors header metadata key holding the JSON tree.
CHECKPOINT_KEY = "elasticize.checkpoint"
#: The format version this elasticize writes and reads.
CHECKPOINT_VERSION = 1

_DTYPES = {str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)}
_STORABLE = frozenset(TORCH_DTYPES.values())
_FLOATS = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}
_PLAIN_KEY = re.compile(r"[A-Za-z_][\w.\-=]*")
_KEY_TYPES = (str, int, float, bool, type(None), tuple)


def _child(path: str, key: Any) -> str:
    """The key path of ``key`` inside ``path``: ``a.b``, ``a[0]``, ``a['x y']``."""
    if isinstance(key, str) and _PLAIN_KEY.fullmatch(key):
        return f"{path}.{key}" if path else key
    return f"{path}[{key!r:.120}]"


def _refuse(path: str, v: Any) -> None:
    kind = f"{type(v).__module__}.{type(v).__qualname__}".removeprefix("builtins.")
    raise TypeError(f"{path or 'the checkpoint'} is of type {kind}, which a safetensors checkpoint cannot hold without "
                    "pickle; save it as JSON-native values (str, int, float, bool, None, list, tuple, dict) or "
                    "tensors (torch.as_tensor for an array), or drop it (hyper-parameters: "
                    "save_hyperparameters(ignore=[...]))")


# --------------------------------------------------------------------------- encoding
class _Encoder:
    """One checkpoint's encoding: the JSON tree, and the tensors it references by name."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._open: set[int] = set()  # containers on the current path (a cycle is refused)

    def value(self, v: Any, path: str) -> Any:
        t = type(v)
        if v is None or t in (bool, int, str):
            return v
        if t is float:
            return v if math.isfinite(v) else {"$float": "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")}
        if t is torch.dtype:
            return {"$dtype": str(v).removeprefix("torch.")}
        if isinstance(v, PurePath):
            return {"$path": str(v)}
        if t in (torch.Tensor, torch.nn.Parameter):
            return {"$tensor": self._tensor(v, path)}
        if t not in (list, tuple, dict, OrderedDict):
            _refuse(path, v)
        if id(v) in self._open:
            raise ValueError(f"{path} contains itself; a checkpoint must be a tree (break the cycle)")
        self._open.add(id(v))
        try:
            return self._container(v, path)
        finally:
            self._open.discard(id(v))

    def _container(self, v: Any, path: str) -> Any:
        if type(v) is list:
            return [self.value(x, f"{path}[{i}]") for i, x in enumerate(v)]
        if type(v) is tuple:
            return {"$tuple": [self.value(x, f"{path}[{i}]") for i, x in enumerate(v)]}
        if type(v) is dict and all(type(k) is str and not k.startswith("$") for k in v):
            return {k: self.value(x, _child(path, k)) for k, x in v.items()}
        pairs = [[self._key(k, path), self.value(x, _child(path, k))] for k, x in v.items()]
        if type(v) is dict:
            return {"$dict": pairs}
        body: dict[str, Any] = {"items": pairs}
        meta = getattr(v, "_metadata", None)
        if meta is not None:
            body["metadata"] = self.value(meta, f"{path}._metadata")
        return {"$odict": body}

    def _key(self, k: Any, path: str) -> Any:
        if not isinstance(k, _KEY_TYPES) or (type(k) is tuple and not all(isinstance(x, _KEY_TYPES) for x in k)):
            raise TypeError(f"{path} has the key {k!r:.80} ({type(k).__name__}), which a safetensors checkpoint "
                            "cannot hold; use str, int, float, bool, None or tuples of them as keys")
        return self.value(k, f"{path}[key {k!r:.80}]")

    def _tensor(self, t: torch.Tensor, path: str) -> str:
        if t.layout != torch.strided or t.device.type == "meta" or t.dtype not in _STORABLE:
            raise TypeError(f"{path} is a {t.layout} {t.dtype} tensor on {t.device}, which safetensors cannot store; "
                            "store a dense tensor of a standard dtype with data (e.g. t.to_dense().cpu())")
        name, n = path or "tensor", 1
        while name in self.tensors or name == "__metadata__":  # safetensors' reserved header key
            n += 1
            name = f"{path}#{n}"
        self.tensors[name] = t
        return name


def encode(obj: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Split a checkpoint dict into its JSON tree and the tensors that tree references.

    Args:
        obj: the checkpoint, a dict (see the module's description for what it may hold).

    Returns:
        (the JSON-native tree, stored name -> contiguous CPU tensor, memory shared by no other).

    Raises:
        TypeError: ``obj`` is not a dict, or holds a value or key a safetensors checkpoint cannot
            hold (the message names its key path).
        ValueError: ``obj`` contains itself (a cycle).
    """
    if type(obj) not in (dict, OrderedDict):
        raise TypeError(f"a checkpoint must be a dict, not {type(obj).__name__}")
    enc = _Encoder()
    tree = enc.value(obj, "")
    stored, aliases = dedupe(enc.tensors)
    seen: set[int] = set()
    for name, t in stored.items():  # safetensors refuses tensors sharing memory: copy the views of one storage
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():
            stored[name] = t.clone()
        seen.add(ptr)
    return _rename(tree, aliases), stored


def _rename(node: Any, aliases: dict[str, str]) -> Any:
    """``node`` with each ``{"$tensor": alias}`` pointing at the tensor stored in its place."""
    if isinstance(node, list):
        return [_rename(x, aliases) for x in node]
    if isinstance(node, dict):
        if len(node) == 1 and isinstance(node.get("$tensor"), str):
            return {"$tensor": aliases.get(node["$tensor"], node["$tensor"])}
        return {k: _rename(x, aliases) for k, x in node.items()}
    return node


# --------------------------------------------------------------------------- decoding
def _malformed(path: str, msg: str) -> None:
    raise ManifestError(f"checkpoint key {path or '(root)'}: {msg}; the file is corrupted or was not written by "
                        "elasticize")


class _Decoder:
    """One checkpoint's decoding: every node checked, tensors looked up by name."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors
        self.used: set[str] = set()
        self._tags: dict[str, Callable[[Any, str], Any]] = {
            "$float": _named(_FLOATS, f"$float: one of {sorted(_FLOATS)}"), "$dtype": _named(_DTYPES, "$dtype: a torch dtype"),
            "$tuple": self._tuple, "$dict": self._dict, "$odict": self._odict, "$tensor": self._tensor, "$path": self._path}

    def value(self, node: Any, path: str) -> Any:
        t = type(node)
        if node is None or t in (bool, int, str, float):
            return node  # JSON floats are finite (the parser refuses NaN and Infinity)
        if t is list:
            return [self.value(x, f"{path}[{i}]") for i, x in enumerate(node)]
        if t is not dict:
            _malformed(path, f"a {t.__name__} is not a checkpoint node")
        tags = [k for k in node if k.startswith("$")]
        if not tags:
            return {k: self.value(x, _child(path, k)) for k, x in node.items()}
        if len(node) != 1 or tags[0] not in self._tags:
            _malformed(path, f"unknown tagged object with keys {sorted(node)[:5]}")
        return self._tags[tags[0]](node[tags[0]], path)

    def _tuple(self, p: Any, path: str) -> tuple:
        if type(p) is not list:
            _malformed(path, "$tuple must hold a list")
        return tuple(self.value(x, f"{path}[{i}]") for i, x in enumerate(p))

    def _pairs(self, p: Any, path: str) -> list[tuple[Any, Any]]:
        if type(p) is not list or not all(type(x) is list and len(x) == 2 for x in p):
            _malformed(path, "a dict must hold a list of [key, value] pairs")
        out, keys = [], set()
        for raw, x in p:
            k = self.value(raw, f"{path}[key]")
            if not _hashable_key(k):
                _malformed(path, f"a dict key must be str, int, float, bool, None or a tuple of them, not "
                                 f"{type(k).__name__}")
            if k in keys:
                _malformed(path, f"the key {k!r:.80} appears twice")
            keys.add(k)
            out.append((k, self.value(x, _child(path, k))))
        return out

    def _dict(self, p: Any, path: str) -> dict:
        return dict(self._pairs(p, path))

    def _odict(self, p: Any, path: str) -> OrderedDict:
        if type(p) is not dict or "items" not in p or set(p) - {"items", "metadata"}:
            _malformed(path, "$odict must hold {'items': [...]} and optionally 'metadata'")
        out = OrderedDict(self._pairs(p["items"], path))
        if "metadata" in p:
            out._metadata = self.value(p["metadata"], f"{path}._metadata")  # type: ignore[attr-defined]
        return out

    def _tensor(self, p: Any, path: str) -> torch.Tensor:
        if type(p) is not str or p not in self.tensors:
            _malformed(path, f"it references the tensor {p!r:.120}, which the file does not hold")
        self.used.add(p)
        return self.tensors[p]

    def _path(self, p: Any, path: str) -> Path:
        if type(p) is not str:
            _malformed(path, "$path must hold a string")
        return Path(p)


def _named(table: dict[str, Any], what: str) -> Callable[[Any, str], Any]:
    """The decoder of a tag whose payload is a name in ``table``."""
    def get(p: Any, path: str) -> Any:
        if type(p) is not str or p not in table:
            _malformed(path, f"{p!r:.40} is not {what}")
        return table[p]
    return get


def _hashable_key(k: Any) -> bool:
    return type(k) in (str, int, float, bool, type(None)) or (type(k) is tuple and all(_hashable_key(x) for x in k))


def decode(tree: Any, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Rebuild the checkpoint dict from its JSON tree (as :func:`encode` wrote it) and its tensors.

    Args:
        tree: the parsed JSON tree.
        tensors: stored name -> tensor.

    Returns:
        The checkpoint dict; a tensor referenced twice is one tensor object.

    Raises:
        ManifestError: a node of a kind :func:`encode` never writes, a reference to a tensor
            that ``tensors`` lacks, a tensor no node references, or a root that is not a dict.
    """
    dec = _Decoder(tensors)
    out = dec.value(tree, "")
    if not isinstance(out, dict):
        _malformed("", f"the root must be a dict, not {type(out).__name__}")
    extra = sorted(set(tensors) - dec.used)
    if extra:
        _malformed("", f"the file holds {len(extra)} tensor(s) no key references ({', '.join(extra[:3])})")
    return out


# --------------------------------------------------------------------------- files
def save_checkpoint_dict(obj: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write a checkpoint dict as one safetensors file (tensors + the JSON tree), atomically.

    Missing parent folders are created; an existing file at ``path`` is replaced (it keeps its
    mode; a new file gets ``0o666 & ~umask``). Everything is checked before anything is written.

    Args:
        obj: the checkpoint (see the module's description for what it may hold).
        path: the file; any name (Lightning's ``.ckpt`` names are kept), the content is safetensors.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        TypeError: a value or key the format cannot hold, named by its key path; nothing is written.
        ValueError: ``obj`` contains itself, nests deeper than the reader accepts, or ``path`` is
            a URL (local files only); nothing is written.
        FileExistsError, PermissionError, OSError: as :func:`elasticize._files.atomic_write`;
            the old file stays as it was.
    """
    if "://" in str(path):
        raise ValueError(f"{path}: checkpoint dicts are written to local files only; give a local path")
    tree, tensors = encode(obj)
    text = json.dumps({"format_version": CHECKPOINT_VERSION, "tree": tree}, separators=(",", ":"), allow_nan=False)
    try:
        loads(text, "the checkpoint's JSON tree")  # what is written can be read back
    except ManifestError as e:
        raise ValueError(f"the checkpoint nests too deep to store ({MAX_JSON_DEPTH} JSON levels at most, tagged "
                         f"values count 2-3): {e}") from None
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(p, lambda tmp: save_file(tensors, tmp, metadata={CHECKPOINT_KEY: text}), overwrite=True)


_PICKLE_HINT = ("elasticize never unpickles a file. Convert it once, in a session you trust: read it with "
                "torch.load and weights_only=True, then save_checkpoint_dict(that, new_path); or resume it once "
                "without SafetensorsCheckpointIO and save again with it")


def _sniff(p: Path) -> None:
    """Refuse a pickle or a ``torch.save`` zip archive by its first bytes, before any parser sees it."""
    with open(p, "rb") as fh:
        head = fh.read(4)
    if head.startswith(b"PK\x03\x04"):
        raise ValueError(f"{p} is not a safetensors checkpoint: it is a zip archive (torch.save's format, as "
                         f"Lightning's default TorchCheckpointIO writes), holding a pickle. {_PICKLE_HINT}")
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        raise ValueError(f"{p} is not a safetensors checkpoint: it is a pickle (protocol {head[1]}). {_PICKLE_HINT}")


def load_checkpoint_dict(path: str | os.PathLike, *, device: str | torch.device | None = None) -> dict[str, Any]:
    """Read a file written by :func:`save_checkpoint_dict` with safetensors and ``json`` only.

    Args:
        path: the file.
        device: where the tensors go (default: the CPU).

    Returns:
        The checkpoint dict, as it was saved (see the module's description for what changes:
        devices, ``Parameter`` -> tensor, views of one memory that were not the same view).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a pickle or ``torch.save`` archive (refused unread: elasticize never
            unpickles), not a safetensors file, truncated, a safetensors file without the
            ``"elasticize.checkpoint"`` metadata (e.g. a model file), a newer or unknown format
            version, or a malformed JSON tree (a :class:`~elasticize.plan.parse.ManifestError`
            naming the key path).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such checkpoint file: {p}")
    _sniff(p)
    header = read_header(p)
    raw = header.metadata.get(CHECKPOINT_KEY)
    if raw is None:
        raise ValueError(f"{p} is a safetensors file but not an elasticize checkpoint dict (no {CHECKPOINT_KEY!r} "
                         "metadata; an elasticize model file loads with elasticize.load)")
    info = loads(raw, f"{p}: the checkpoint's JSON tree")
    if type(info) is not dict or set(info) != {"format_version", "tree"} or type(info["format_version"]) is not int:
        raise ManifestError(f"{p}: the checkpoint metadata must be {{'format_version': int, 'tree': ...}}; the file "
                            "is corrupted or was not written by elasticize")
    if info["format_version"] != CHECKPOINT_VERSION:
        newer = info["format_version"] > CHECKPOINT_VERSION
        raise ValueError(f"{p} has checkpoint format version {info['format_version']}; this elasticize reads "
                         f"{CHECKPOINT_VERSION}" + ("; upgrade elasticize" if newer else ""))
    tensors = {k: aligned(v) for k, v in load_file(str(p)).items()}
    if device is not None:
        tensors = {k: v.to(device) for k, v in tensors.items()}
    try:
        return decode(info["tree"], tensors)
    except ManifestError as e:
        raise ManifestError(f"{p}: {e}") from None
