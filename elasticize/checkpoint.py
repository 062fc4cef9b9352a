"""One ``.safetensors`` file per elastic model, with its manifest in the header metadata.

The file holds the super-network's tensors under the original model's names, and the
header metadata key ``"elasticize"`` holds a JSON manifest (schema: docs/guides/file-format.md):
format version, library version, base-model recipe, the plan, and for each preset its
configuration, MACs, params, bytes and, per dense tensor, the source tensor and the
``[start, stop)`` ranges to read along each axis. A program in any language can cut a
preset out with a plain safetensors reader; :func:`load_subnet` does so here, reading
only the bytes that sub-network needs, from a path or a URL (:mod:`elasticize.fileformat.source`).
Format 4 adds the optional nested byte layout (:mod:`elasticize.fileformat.layout`).

Writes are atomic (a temporary file in the same folder, then ``os.replace``; see
``elasticize._files``), give the file the mode ``open()`` would (``0666 & ~umask``, or the mode
of the file replaced), and never replace the file a model was loaded from. No pickle anywhere.

Format versions (1 plain; 2 calibrated BatchNorm statistics, ``elastic_bn.<preset>.<buffer>``; 3 small
stored files such as a tokenizer's, ``elastic_file.<name>``; 4 measurements, bias compensation and the
nested layout): one registered migration step each (:data:`elasticize.plan.migrate.MANIFEST_FORMAT`), and a
file is written in the oldest version that holds its keys, so older readers keep reading it (the file
format page, *Versions and migration*, has the details). Manifests hold no absolute path of the
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
from safetensors.torch import save_file
from torch import nn

from ._files import atomic_write, check_output
from ._version import __version__
from .adapters import build_from_recipe
from .elastic import ElasticModel, SubnetLike
from .export import TensorSource, dense_tensors, extract, set_tensor
from .fileformat import measurements as extra
from .fileformat.layout import nested_shells
from .fileformat.opened import FORMAT_VERSION, METADATA_KEY, PRESETS_KEY, OpenedFile as _Opened
from .fileformat.manifest import FILE_PREFIX, bn_name, preset_table
from .plan import MANIFEST_FORMAT, Plan, apply_plan, slice_ranges
from .plan.parse import ManifestError
from .plan.manifest import Manifest, StoredFile, thaw
from .space import Config, SearchSpace
from .tensorfile import aligned, dedupe, load_strict, load_weights_file, write_ordered

__all__ = ["save", "load", "load_subnet", "save_subnet", "read_manifest", "load_manifest", "FORMAT_VERSION",
           "METADATA_KEY", "PRESETS_KEY", "load_weights_file", "read_files"]


def _read(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any] | None, Manifest, SearchSpace]:
    """The manifest's JSON, the per-preset tables, the typed manifest and the search space of a file, all checked."""
    with _Opened(path) as f:
        return f.raw, f.tables, f.manifest, f.space


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
    calibrated: dict[str, Any] = dict(em.bn_stats.get(name, {}))
    for fqn, t in calibrated.items():
        stored[bn_name(name, fqn)] = (list(t.shape), t.element_size())
    for fqn, (shape, item, s) in extra.preset_stored(em, name).items():
        stored[s], calibrated[fqn] = (shape, item), s
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
    with _Opened(path) as f:
        listed = _listed_files(f.manifest)
        got = f.reader().fetch({stored: (stored, None) for _, _, stored in listed if stored in f.logical.tensors})
    return {name: _file_bytes(path, name, entry, got.get(stored)) for name, entry, stored in listed}


def _manifest(em: ElasticModel, aliases: dict[str, str], kind: str, config: Config | None = None,
              files: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    calibrated = kind == "super-network" and bool(em.bn_stats)
    added = extra.saved_keys(em) if kind == "super-network" else {}
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
        m.update(added)
    else:
        m["config"] = config
        m["macs"] = em.macs(config)
        m["params"] = em.params(config)
    if files:
        m["files"] = files
    m["format_version"] = MANIFEST_FORMAT.oldest_for(m)  # older readers keep reading what has no newer key
    return m


# --------------------------------------------------------------------------- save
def save(em: ElasticModel, path: str | os.PathLike, *, overwrite: bool = False, layout: str = "default") -> Path:
    """Write the super-network and its manifest to one ``.safetensors`` file, atomically.

    The model's stored files (:attr:`ElasticModel.files`, e.g. a Hugging Face tokenizer) go into
    it too (format version 3).

    Args:
        em: the elastic model.
        path: output file.
        overwrite: replace an existing file (never the one ``em`` was loaded from).
        layout: ``"default"``, the tensors under their own names; or ``"nested"`` (format
            version 4, :mod:`elasticize.fileformat.layout`): each tensor stored as shells, so that
            every preset nested in the next larger ones is one byte prefix of the data (one HTTP
            range request for :func:`load_subnet` from a URL).

    Returns:
        The path written.

    Raises:
        TypeError: if ``em`` is not an :class:`ElasticModel`.
        FileExistsError: ``path`` exists and ``overwrite`` is False, or is a folder.
        ValueError: ``path`` is the file ``em`` was loaded from, a name in ``em.files`` is not
            an allowed file name (:func:`elasticize.adapters.hf.check_file_name`), an unknown
            ``layout``, or a nested layout of a preset that reads one tensor in two ways.
        FileNotFoundError: the folder does not exist.
        PermissionError: the folder cannot be written in.
        OSError: writing failed (e.g. a full disk); the old file, if any, stays as it was.
    """
    if not isinstance(em, ElasticModel):
        raise TypeError(f"save() takes an ElasticModel (from elasticize.elasticize), not {type(em).__name__}")
    if layout not in ("default", "nested"):
        raise ValueError(f"layout must be 'default' or 'nested', not {layout!r}")
    check_output(path, overwrite=overwrite, inputs=(em.source_path,))  # before the work
    with em.trained_bn_stats():
        tensors, aliases = dedupe(em.model.state_dict())
    for preset, table in em.bn_stats.items():
        for fqn, t in table.items():
            tensors[bn_name(preset, fqn)] = t.detach().contiguous().cpu()
    tensors.update(extra.saved_tensors(em))
    stored, files = _file_tensors(em.files)
    tensors.update(stored)
    manifest = _manifest(em, aliases, "super-network", files=files)
    tables = {name: entry.pop("tensors") for name, entry in manifest["presets"].items()}
    ordered = nested_shells(manifest, tensors, tables, aliases) if layout == "nested" else None
    meta = {METADATA_KEY: json.dumps(manifest, separators=(",", ":")),
            PRESETS_KEY: json.dumps(tables, separators=(",", ":"))}
    write = (lambda tmp: save_file(tensors, tmp, metadata=meta)) if ordered is None else \
        (lambda tmp: write_ordered(ordered, tmp, meta))
    return atomic_write(path, write, overwrite=overwrite, inputs=(em.source_path,))


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
    with _Opened(path) as f:
        manifest, plan = f.manifest, f.plan
        if manifest.is_sub_network:
            raise ValueError(f"{path} holds one dense sub-network; load it with elasticize.load_subnet(path)")
        base, meta = _base_model(manifest, model, trust_remote_code)
        tensors = {k: aligned(t) for k, t in f.reader().fetch({n: (n, None) for n in f.logical.tensors}).items()}
    em = ElasticModel(base, plan, recipe=thaw(manifest.recipe),
                      input_shapes=thaw(manifest.input_shapes), importance=thaw(manifest.importance))
    calibrated = {p: {fqn: tensors.pop(stored) for fqn, stored in t.items()} for p, t in manifest.bn_stats.items()}
    files = {name: _file_bytes(path, name, entry, tensors.pop(stored, None) if stored else None)
             for name, entry, stored in _listed_files(manifest)}
    compensation = extra.pop_tensors(manifest, tensors)
    for alias, target in manifest.aliases.items():
        tensors[alias] = tensors[target]
    load_strict(em.model, tensors, assign=meta, what=f"{path}")
    if meta:
        _materialize(em.model, _RealBuffers(manifest, trust_remote_code))
    _named_presets(em.space, manifest)
    em.metrics = {n: dict(p.metrics) for n, p in manifest.presets.items()}
    if calibrated:
        em.set_bn_stats(calibrated)
    extra.restore(em, manifest, compensation)
    em.files = files
    em.source_path = str(path)
    return em.eval()


def _named_presets(space: SearchSpace, manifest: Manifest) -> None:
    """Restore the presets a user named (:meth:`ElasticModel.add_preset`) from a manifest."""
    for name, entry in manifest.presets.items():
        cfg = thaw(entry.config)
        if space.presets.get(name) != cfg:
            space.add_preset(name, cfg, replace=name in space.presets)


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
    with _Opened(path) as f:
        return _load_subnet(f, subnet, model, trust_remote_code)


def _load_subnet(f: _Opened, subnet: SubnetLike, model: nn.Module | None, trust_remote_code: bool) -> nn.Module:
    path, manifest, plan, space = f.path, f.manifest, f.plan, f.space
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
    source = _FileTensors(path, manifest, _calibrated_table(manifest, space, cfg),
                          _non_persistent(base, plan, real, meta), real if meta else None)
    source.prefetch(f, dense_tensors(plan, space, state, cfg), _prefix(f, space, cfg))
    dense = extract(base, plan, space, state, cfg, source, recipe=thaw(manifest.recipe), in_place=True)
    return dense.eval()


def _prefix(f: _Opened, space: SearchSpace, cfg: Config) -> tuple[int, int] | None:
    """In a nested file, the data prefix of the chain preset that ``cfg`` is (read as one range), else None."""
    if f.layout is None:
        return None
    for k, p in enumerate(f.layout.chain):
        if space.resolve(p) == cfg:
            return 0, f.layout.prefix_bytes[k]
    return None


def _calibrated_table(manifest: Manifest, space: SearchSpace, cfg: Config) -> dict[str, str]:
    """The calibrated tensors (BatchNorm statistics, compensated biases) of the preset that ``cfg`` is, if the
    file has them: tensor name -> stored name."""
    if manifest.is_sub_network:
        return {}
    name = next((p for p in manifest.presets if space.resolve(p) == cfg), None)
    return {**manifest.bn_stats.get(name, {}), **extra.file_table(manifest, name)}


class _FileTensors(TensorSource):
    """A sub-network's tensors read from a checked file, only the bytes they need, all in one batch
    of coalesced ranges (:meth:`prefetch`), each checked against the shape and dtype the
    sub-network needs.

    Args:
        path: the file (for messages).
        manifest: its checked manifest.
        calibrated: buffer name -> stored name of the preset's calibrated BatchNorm statistics.
        built: full values of the sliced non-persistent buffers, which the file does not hold.
        real: the real build whose buffers fill those still on ``meta`` (a model built on
            ``meta``), or None.
    """

    def __init__(self, path: Any, manifest: Manifest, calibrated: dict[str, str],
                 built: dict[str, torch.Tensor], real: _RealBuffers | None) -> None:
        self.path, self.calibrated, self.built, self.real = path, calibrated, built, real
        self.dense_file = manifest.is_sub_network
        self.aliases = manifest.aliases
        self.got: dict[str, torch.Tensor] = {}

    def _stored(self, name: str, src: str, ranges: Any) -> tuple[str, Any]:
        """The stored tensor and ranges that the dense tensor ``name`` is read from."""
        if self.dense_file:
            return self.aliases.get(name, name), None
        if src in self.calibrated:
            return self.calibrated[src], None
        return self.aliases.get(src, src), ranges or None

    def prefetch(self, f: _Opened, spec: Mapping[str, tuple[str, Any]], cover: tuple[int, int] | None) -> None:
        """Read every tensor of ``spec`` (:func:`elasticize.export.dense_tensors`) from ``f``."""
        want = {n: self._stored(n, src, r) for n, (src, r) in spec.items() if src not in self.built}
        want = {n: w for n, w in want.items() if w[0] in f.logical.tensors}  # a missing one: the check below
        self.got = f.reader().fetch(want, cover)

    def read(self, name: str, src: str, ranges: Any, want: Any) -> torch.Tensor:
        if src in self.built:
            t = slice_ranges(self.built[src], ranges)
        elif name in self.got:
            t = self.got.pop(name)
        else:
            raise ManifestError(f"{self.path}: the sub-network needs tensor {name!r}, which the file does not "
                                "store; the file is corrupted")
        if want is not None and (list(t.shape) != want[0] or t.dtype != want[1]):
            raise ManifestError(f"{self.path}: tensor {name!r} is stored as {t.dtype} {list(t.shape)}, but the "
                                f"sub-network needs {want[1]} {want[0]}; the file is corrupted")
        return aligned(t.contiguous())

    def complete(self, dense: nn.Module) -> None:
        if self.real is not None:
            _materialize(dense, self.real)
