"""One ``.safetensors`` file per elastic model, with its manifest in the header metadata.

The file holds the super-network's tensors under the original model's names, and the
header metadata key ``"elasticize"`` holds a JSON manifest (schema: docs/guides/file-format.md):
format version, library version, base-model recipe, the plan, and for each preset its
configuration, MACs, params, bytes and, per dense tensor, the source tensor and the
``[start, stop)`` ranges to read along each axis. A program in any language can cut a
preset out with a plain safetensors reader; :func:`load_subnet` does so here, reading
only the bytes that sub-network needs (``safe_open(...).get_slice``).

Writes are atomic (a temporary file in the same folder, then ``os.replace``; see
``elasticize._files``), give the file the mode ``open()`` would (``0666 & ~umask``, or the mode
of the file replaced), and never replace the file a model was loaded from. No pickle anywhere.

Format versions: 1 is the plain super-network; 2 adds calibrated BatchNorm statistics per
preset (BN recalibration): tensors ``elastic_bn.<preset>.<buffer>`` holding each preset's dense
running statistics, listed in the manifest's ``bn_stats`` (``{preset: {buffer: stored name}}``),
and that preset's tensor table points its running statistics at them (``source``, no slices),
so a reader that follows the table gets the calibrated values. A file without calibrated
statistics is still written as version 1, so older readers keep reading it. 3 adds small files
that travel with the model (a Hugging Face model's tokenizer, generation and preprocessor files,
:data:`elasticize.adapters.hf.TOKENIZER_FILES`): each is a 1-D ``uint8`` tensor
``elastic_file.<file name>`` holding its bytes, listed in the manifest's ``files``
(``{file name: {"tensor", "bytes", "sha256"}}``); readers check the name against the allow-list and
the contents against the hash. Format 2 readers load strictly and would refuse the extra tensors
as not fitting the model (a wrong diagnosis), so a file holding such files is version 3, one
without them keeps the lowest version that describes it. Manifests hold no absolute path of the
writing machine: a Hugging Face recipe names the folder by its own name (``origin: "folder"``) or
the hub id (``origin: "hub"``), for information only, and its stored config has ``_name_or_path`` blank.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ._files import atomic_write, check_output
from ._version import __version__
from .adapters import build_from_recipe
from .elastic import ElasticModel, SubnetLike
from .export import TensorSource, extract, set_tensor
from .fileformat.header import Header, read_header
from .fileformat.manifest import FILE_PREFIX, bn_name, check_manifest, preset_table
from .plan.parse import ManifestError, loads
from .plan import MANIFEST_FORMAT, Plan, apply_plan, slice_ranges
from .plan.manifest import Manifest, StoredFile, thaw
from .space import Config, SearchSpace
from .tensorfile import aligned, dedupe, load_strict, load_weights_file

__all__ = ["save", "load", "load_subnet", "save_subnet", "read_manifest", "load_manifest", "FORMAT_VERSION", "METADATA_KEY",
           "PRESETS_KEY", "load_weights_file", "read_files"]

#: The newest file format version this elasticize reads and writes (older ones migrate on read).
FORMAT_VERSION = MANIFEST_FORMAT.current
METADATA_KEY = "elasticize"
#: Second metadata key: per preset, the dense tensors and their slices (kept apart so loading skips them).
PRESETS_KEY = "elasticize.presets"


def _read(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any] | None, Manifest, SearchSpace]:
    """The manifest's JSON, the per-preset tables, the typed manifest and the search space of a file, all checked."""
    path = Path(path)
    header = read_header(path)
    meta = header.metadata
    raw = meta.get(METADATA_KEY)
    if raw is None:
        raise ManifestError(f"{path} is a safetensors file without an elasticize manifest; make one with "
                            "`elasticize convert` or elasticize.save()")
    try:
        manifest = loads(raw, "the elasticize manifest")
        tables = loads(meta[PRESETS_KEY], "the per-preset tables") if PRESETS_KEY in meta else None
        typed, space = check_manifest(manifest, header=header, tables=tables, format_version=FORMAT_VERSION)
    except ManifestError as e:
        raise ManifestError(f"{path}: {e}") from None
    return manifest, tables, typed, space


def read_manifest(path: str | os.PathLike, *, presets: bool = True) -> dict[str, Any]:
    """The manifest of an elasticize file, validated in full before it is returned.

    Reading never builds a model, imports code or follows a path the file names. The whole
    header is checked (:func:`elasticize.fileformat.header.read_header`) and so is every manifest key
    (:func:`elasticize.fileformat.manifest.check_manifest`), including the per-preset tables.

    Args:
        path: the file.
        presets: attach the per-preset tensor tables (metadata key ``elasticize.presets``) to
            each preset as ``"tensors"``; they are checked either way.

    Raises:
        FileNotFoundError: no such file.
        ValueError: (:class:`elasticize.plan.parse.ManifestError`) not a readable safetensors file
            (truncated, corrupted, a header over safetensors' 100 MB limit, bad offsets), no
            elasticize manifest in it, a manifest that is not valid JSON, one written in a newer
            format version than this elasticize reads (the message says to upgrade), or any key
            that is missing, unknown, mistyped or disagrees with the tensors or the plan (named).
    """
    manifest, tables, _, _ = _read(path)
    if presets and tables:
        for name, entry in manifest.get("presets", {}).items():
            entry["tensors"] = tables.get(name, {})
    return manifest


def load_manifest(path: str | os.PathLike) -> Manifest:
    """The typed, frozen :class:`~elasticize.plan.manifest.Manifest` of an elasticize file, checked as by
    :func:`read_manifest` and migrated from its format version to the current one.

    Raises:
        FileNotFoundError, ValueError: as :func:`read_manifest`.
    """
    return _read(path)[2]


# --------------------------------------------------------------------------- manifest
def _preset_entry(em: ElasticModel, name: str, cfg: Config, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    stored = {n: (list(t.shape), t.element_size()) for n, t in state.items()}
    calibrated = em.bn_stats.get(name, {})
    for fqn, t in calibrated.items():
        stored[bn_name(name, fqn)] = (list(t.shape), t.element_size())
    tensors, total = preset_table(em.plan, em.space, name, cfg, stored, calibrated)
    return {"config": cfg, "macs": em.macs(cfg), "params": em.params(cfg), "bytes": total,
            "metrics": dict(em.metrics.get(name, {})), "tensors": tensors}


def _file_tensors(files: Mapping[str, bytes]) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """The stored tensors of ``files`` (checked names) and their manifest entries."""
    from .adapters.hf import check_file_name

    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict[str, Any]] = {}
    for name, data in files.items():
        data = bytes(data)
        stored = FILE_PREFIX + check_file_name(name)
        tensors[stored] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)
        entries[name] = {"tensor": stored, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return tensors, entries


def _file_bytes(path: Any, name: str, entry: Any, tensor: torch.Tensor | None) -> bytes:
    """The contents of the stored file ``name``, checked against its manifest entry."""
    from .adapters.hf import check_file_name

    try:
        check_file_name(name)
    except ValueError as e:
        raise ValueError(f"{path}: the manifest lists a stored file {name!r}: {e}") from None
    if not isinstance(entry, StoredFile) or entry.tensor != FILE_PREFIX + name:
        raise ValueError(f"{path}: the manifest entry of the stored file {name!r} is malformed; the file is corrupted")
    if tensor is None or tensor.dtype != torch.uint8 or tensor.dim() != 1:
        raise ValueError(f"{path}: the stored file {name!r} (tensor {entry.tensor}) is missing or not bytes; "
                         "the file is corrupted")
    data = tensor.numpy().tobytes()
    if len(data) != entry.bytes or hashlib.sha256(data).hexdigest() != entry.sha256:
        raise ValueError(f"{path}: the stored file {name!r} does not match its sha256; the file is corrupted")
    return data


def _listed_files(manifest: Manifest) -> list[tuple[str, StoredFile, str]]:
    """``(name, manifest entry, stored tensor name)`` of each file the manifest lists (checked by
    :func:`elasticize.fileformat.manifest.check_files` when the manifest was read)."""
    return [(name, entry, entry.tensor) for name, entry in manifest.files.items()]


def read_files(path: str | os.PathLike) -> dict[str, bytes]:
    """The small files stored in an elasticize file (format 3: e.g. a Hugging Face tokenizer), name -> bytes.

    Reads only those tensors. Write them into a folder with :func:`elasticize.adapters.hf.write_files`,
    or make the tokenizer with :func:`elasticize.adapters.hf.tokenizer_from_files`.

    Raises:
        FileNotFoundError, ValueError: see :func:`read_manifest`; also a stored file whose name is
            not an allowed file name or whose contents do not match the manifest's sha256.
    """
    listed = _listed_files(_read(path)[2])
    if not listed:
        return {}
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        return {name: _file_bytes(path, name, entry, f.get_tensor(stored) if stored in keys else None)
                for name, entry, stored in listed}


def _manifest(em: ElasticModel, aliases: dict[str, str], kind: str, config: Config | None = None,
              files: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    calibrated = kind == "super-network" and bool(em.bn_stats)
    m: dict[str, Any] = {
        "format": "elasticize",
        "format_version": 0,  # set below: the oldest version that has every key written
        "library_version": __version__,
        "kind": kind,
        "recipe": em.recipe,
        "input_shapes": em.input_shapes,
        "importance": em.importance,
        "plan": em.plan.to_json(),
        "search_space": em.space.dimensions,
        "aliases": aliases,
    }
    if kind == "super-network":
        state = em.model.state_dict()
        m["presets"] = {n: _preset_entry(em, n, c, state) for n, c in em.presets.items()}
        if calibrated:
            m["bn_stats"] = {p: {fqn: bn_name(p, fqn) for fqn in t} for p, t in em.bn_stats.items()}
    else:
        m["config"] = config
        m["macs"] = em.macs(config)
        m["params"] = em.params(config)
    if files:
        m["files"] = files
    m["format_version"] = MANIFEST_FORMAT.oldest_for(m)  # older readers keep reading what has no newer key
    return m


# --------------------------------------------------------------------------- save
def save(em: ElasticModel, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write the super-network and its manifest to one ``.safetensors`` file, atomically.

    The model's stored files (:attr:`ElasticModel.files`, e.g. a Hugging Face tokenizer) go into
    it too (format version 3).

    Args:
        em: the elastic model.
        path: output file.
        overwrite: replace an existing file (never the one ``em`` was loaded from).

    Returns:
        The path written.

    Raises:
        TypeError: if ``em`` is not an :class:`ElasticModel`.
        FileExistsError: ``path`` exists and ``overwrite`` is False, or is a folder.
        ValueError: ``path`` is the file ``em`` was loaded from, or a name in ``em.files`` is not
            an allowed file name (:func:`elasticize.adapters.hf.check_file_name`).
        FileNotFoundError: the folder does not exist.
        PermissionError: the folder cannot be written in.
        OSError: writing failed (e.g. a full disk); the old file, if any, stays as it was.
    """
    if not isinstance(em, ElasticModel):
        raise TypeError(f"save() takes an ElasticModel (from elasticize.elasticize), not {type(em).__name__}")
    check_output(path, overwrite=overwrite, inputs=(em.source_path,))  # before the work
    with em.trained_bn_stats():
        tensors, aliases = dedupe(em.model.state_dict())
    for preset, table in em.bn_stats.items():
        for fqn, t in table.items():
            tensors[bn_name(preset, fqn)] = t.detach().contiguous().cpu()
    stored, files = _file_tensors(em.files)
    tensors.update(stored)
    manifest = _manifest(em, aliases, "super-network", files=files)
    tables = {name: entry.pop("tensors") for name, entry in manifest["presets"].items()}
    meta = {METADATA_KEY: json.dumps(manifest, separators=(",", ":")),
            PRESETS_KEY: json.dumps(tables, separators=(",", ":"))}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta), overwrite=overwrite,
                        inputs=(em.source_path,))


def save_subnet(em: ElasticModel, subnet: SubnetLike, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write one dense sub-network to a ``.safetensors`` file (tensors under the original names).

    :func:`load_subnet` reads it back into a dense module; the model's stored files go into it
    as in :func:`save` (:func:`read_files` reads them). Errors as :func:`save`, plus those of
    :meth:`ElasticModel.resolve` for a sub-network outside the search space.
    """
    if not isinstance(em, ElasticModel):
        raise TypeError(f"save_subnet() takes an ElasticModel, not {type(em).__name__}")
    check_output(path, overwrite=overwrite, inputs=(em.source_path,))  # before the extraction
    cfg = em.resolve(subnet)
    dense = em.extract(cfg)
    tensors, aliases = dedupe(dense.state_dict())
    stored, files = _file_tensors(em.files)
    tensors.update(stored)
    meta = {METADATA_KEY: json.dumps(_manifest(em, aliases, "sub-network", cfg, files=files), separators=(",", ":"))}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta), overwrite=overwrite,
                        inputs=(em.source_path,))


# --------------------------------------------------------------------------- load
def _base_model(manifest: Manifest, model: nn.Module | None, trust_remote_code: bool) -> tuple[nn.Module, bool]:
    if model is not None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, not {type(model).__name__}")
        if any(hasattr(m, "_el_tensors") for m in model.modules()):
            raise TypeError("pass the plain base model (not an elastic one) as model=")
        return model.eval(), False
    return build_from_recipe(thaw(manifest.recipe), device="meta", trust_remote_code=trust_remote_code), True


class _RealBuffers:
    """The buffers of one real (not ``meta``) build of the recipe's model, built on first use.

    Non-persistent buffers are not in the file: a model built on ``meta`` takes them from here,
    whole (:func:`_materialize`) or cut to a sub-network (:func:`_non_persistent`), from one build.
    """

    def __init__(self, manifest: Manifest, trust_remote_code: bool) -> None:
        self.manifest = manifest
        self.trust_remote_code = trust_remote_code
        self._buffers: dict[str, torch.Tensor] | None = None

    def get(self) -> dict[str, torch.Tensor]:
        if self._buffers is None:
            built = build_from_recipe(thaw(self.manifest.recipe), trust_remote_code=self.trust_remote_code)
            self._buffers = dict(built.named_buffers())
        return self._buffers


def _non_persistent(base: nn.Module, plan: Plan, real: _RealBuffers, meta: bool) -> dict[str, torch.Tensor]:
    """The full values of the sliced non-persistent buffers, which the file does not hold: the
    given model's own, or a real build's when ``base`` was built on ``meta``."""
    names = [fqn for fqn, info in plan.tensors.items() if not info.persistent]
    if not names:
        return {}
    own = real.get() if meta else dict(base.named_buffers())
    return {n: own[n].detach() for n in names}


def _materialize(model: nn.Module, real: _RealBuffers) -> None:
    """Buffers not stored in the file (non-persistent) are still on ``meta``: take them from a real build."""
    missing = [n for n, b in model.named_buffers() if b.is_meta]
    if not missing:
        return
    buffers = real.get()
    for n in missing:
        if n in buffers:
            set_tensor(model, n, buffers[n])


def load(path: str | os.PathLike, *, model: nn.Module | None = None, trust_remote_code: bool = False) -> ElasticModel:
    """Load an elastic model saved by :func:`save`.

    The whole file is checked first (:func:`read_manifest`); nothing is built before that.

    Args:
        path: the ``.safetensors`` file.
        model: the base model (same architecture as at conversion); if None it is rebuilt
            from the manifest's recipe (timm, torchvision or transformers, from the adapter's
            allow-listed arguments only) without allocating random weights.
        trust_remote_code: allow a recipe that imports and calls ``package.module:builder``
            (your own model's builder). Off by default: such a file would run code that is not
            elasticize's. See the README's *Security model*.

    Returns:
        The :class:`ElasticModel`, in eval mode, with the file's weights and stored files
        (:attr:`ElasticModel.files`).

    Raises:
        FileNotFoundError, ValueError: see :func:`read_manifest`; also a file that is a dense
            sub-network (use :func:`load_subnet`), an ``import`` recipe without
            ``trust_remote_code`` or ``model=``, tensors that do not fit the model (shape or dtype),
            or a stored file with a name outside the allow-list or contents that do not match its sha256.
        KeyError: the plan names a rule that is not registered (import the module that registers it).
    """
    manifest = _read(path)[2]
    if manifest.is_sub_network:
        raise ValueError(f"{path} holds one dense sub-network; load it with elasticize.load_subnet(path)")
    base, meta = _base_model(manifest, model, trust_remote_code)
    em = ElasticModel(base, manifest.plan, recipe=thaw(manifest.recipe),
                      input_shapes=thaw(manifest.input_shapes), importance=thaw(manifest.importance))
    tensors = {k: aligned(t) for k, t in load_file(str(path)).items()}
    calibrated = {p: {fqn: tensors.pop(stored) for fqn, stored in t.items()} for p, t in manifest.bn_stats.items()}
    files = {name: _file_bytes(path, name, entry, tensors.pop(stored, None) if stored else None)
             for name, entry, stored in _listed_files(manifest)}
    for alias, target in manifest.aliases.items():
        tensors[alias] = tensors[target]
    load_strict(em.model, tensors, assign=meta, what=f"{path}")
    if meta:
        _materialize(em.model, _RealBuffers(manifest, trust_remote_code))
    _named_presets(em.space, manifest)
    em.metrics = {n: dict(p.metrics) for n, p in manifest.presets.items()}
    if calibrated:
        em.set_bn_stats(calibrated)
    em.files = files
    em.source_path = str(path)
    return em.eval()


def _named_presets(space: SearchSpace, manifest: Manifest) -> None:
    """Restore the presets a user named (:meth:`ElasticModel.add_preset`) from a manifest."""
    for name, entry in manifest.presets.items():
        cfg = thaw(entry.config)
        if space.presets.get(name) != cfg:
            space.add_preset(name, cfg, replace=name in space.presets)


def _read_ranges(sl: Any, ranges: list[list[tuple[int, int]]]) -> torch.Tensor:
    """The ranges (from :func:`elasticize.plan.tensor_ranges`) of a safetensors slice (``get_slice``),
    reading only their bytes: one rectangular read per combination of ranges, concatenated."""
    multi = [i for i, rs in enumerate(ranges) if len(rs) > 1]
    if not multi:
        return sl[tuple(slice(rs[0][0], rs[0][1]) for rs in ranges)]
    ax = multi[0]
    parts = [_read_ranges(sl, ranges[:ax] + [[r]] + ranges[ax + 1:]) for r in ranges[ax]]
    return torch.cat(parts, dim=ax)


def load_subnet(path: str | os.PathLike, subnet: SubnetLike = None, *, model: nn.Module | None = None,
                trust_remote_code: bool = False) -> nn.Module:
    """A dense sub-network, reading only the bytes it needs from the file.

    Args:
        path: a super-network file from :func:`save` (then ``subnet`` picks the preset or
            config, default full), or a dense sub-network file from :func:`save_subnet`
            (then ``subnet`` must be None or equal to its configuration).
        subnet: preset name or configuration.
        model: the base model, if the file's recipe cannot rebuild it.
        trust_remote_code: as for :func:`load`.

    Returns:
        The dense module (ordinary layers), in eval mode; equal to ``load(path).extract(subnet)``,
        non-tensor state included: both run :func:`elasticize.export.extract`, with the tensors of
        the file instead of the live model's. ``model``, when given, becomes that module.

    Raises:
        FileNotFoundError, ValueError: see :func:`read_manifest` and :func:`load`; also a stored
            tensor whose shape or dtype is not the one the sub-network needs.
        KeyError, ValueError, TypeError: a sub-network outside the search space.
    """
    _, _, manifest, space = _read(path)
    plan = manifest.plan
    _named_presets(space, manifest)
    base, meta = _base_model(manifest, model, trust_remote_code)
    state = apply_plan(base, plan)
    if manifest.is_sub_network:
        cfg = thaw(manifest.config)
        if subnet is not None and space.resolve(subnet) != space.resolve(cfg):
            raise ValueError(f"{path} holds only the sub-network {cfg}; it cannot give {subnet!r}")
    else:
        cfg = space.resolve(subnet)
    space.apply(state, cfg)
    real = _RealBuffers(manifest, trust_remote_code)
    with safe_open(str(path), framework="pt") as f:
        source = _FileTensors(path, f, manifest, _calibrated_table(manifest, space, cfg),
                              _non_persistent(base, plan, real, meta), real if meta else None)
        dense = extract(base, plan, space, state, cfg, source, recipe=thaw(manifest.recipe), in_place=True)
    return dense.eval()


def _calibrated_table(manifest: Manifest, space: SearchSpace, cfg: Config) -> dict[str, str]:
    """The calibrated BatchNorm statistics of the preset that ``cfg`` is, if the file has them: buffer -> stored name."""
    if manifest.is_sub_network:
        return {}
    for preset, table in manifest.bn_stats.items():
        if space.resolve(preset) == cfg:
            return dict(table)
    return {}


class _FileTensors(TensorSource):
    """A sub-network's tensors read from an open safetensors file, only the slices it needs
    (``get_slice``), each checked against the shape and dtype the sub-network needs.

    Args:
        path: the file (for messages).
        f: the file, opened with ``safe_open``.
        manifest: its checked manifest.
        calibrated: buffer name -> stored name of the preset's calibrated BatchNorm statistics.
        built: full values of the sliced non-persistent buffers, which the file does not hold.
        real: the real build whose buffers fill those still on ``meta`` (a model built on
            ``meta``), or None.
    """

    def __init__(self, path: Any, f: Any, manifest: Manifest, calibrated: dict[str, str],
                 built: dict[str, torch.Tensor], real: _RealBuffers | None) -> None:
        self.path, self.f, self.calibrated, self.built, self.real = path, f, calibrated, built, real
        self.dense_file = manifest.is_sub_network
        self.aliases = manifest.aliases

    def read(self, name: str, src: str, ranges: Any, want: Any) -> torch.Tensor:
        f = self.f
        if src in self.built:
            t = slice_ranges(self.built[src], ranges)
        elif self.dense_file:
            t = f.get_tensor(self.aliases.get(name, name))
        elif src in self.calibrated:
            t = f.get_tensor(self.calibrated[src])
        else:
            src = self.aliases.get(src, src)
            t = f.get_tensor(src) if ranges is None or not ranges else _read_ranges(f.get_slice(src), ranges)
        if want is not None and (list(t.shape) != want[0] or t.dtype != want[1]):
            raise ManifestError(f"{self.path}: tensor {name!r} is stored as {t.dtype} {list(t.shape)}, but the "
                                f"sub-network needs {want[1]} {want[0]}; the file is corrupted")
        return aligned(t.contiguous())

    def complete(self, dense: nn.Module) -> None:
        if self.real is not None:
            _materialize(dense, self.real)
