"""Saving a dense transformers sub-network as a plain transformers folder, and telling first
whether the family's config can describe it (:func:`export_problem`)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ...batches import default_output
from .files import check_file_name, folder_files, has_tokenizer, write_files
from .sentence import fit_sentence_files, sentence_files

__all__ = ["export_problem", "save_hf"]


def export_problem(dense: nn.Module) -> str | None:
    """Why ``dense`` (a synced dense sub-network) cannot be saved as a plain transformers folder, or None.

    Builds the model class from the sub-network's config on the ``meta`` device and compares every
    tensor shape: the family's config must describe the sub-network exactly. Then builds it for
    real with the sub-network's tensors and compares one short forward (see ``_reload_problem``).
    """
    cfg = dense.config
    if getattr(cfg, "elasticize_layers", None):
        return "its layers differ in heads or FFN width, and this family's config has one value for all layers"
    try:
        with torch.device("meta"):
            ref = type(dense)._from_config(cfg)
    except (ValueError, TypeError, AssertionError, RuntimeError) as e:
        return f"{type(dense).__name__} rejects the sub-network's config ({str(e).splitlines()[0]})"
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in dense.state_dict().items()}
    for k, shape in have.items():
        if k in want and want[k] != shape:
            return (f"{type(dense).__name__} built from the sub-network's config has {k} of shape {list(want[k])}, "
                    f"the sub-network {list(shape)} (e.g. {cfg.model_type} derives head_dim from hidden_size / "
                    "num_attention_heads, so its heads and hidden width can only shrink together)")
    missing = sorted(set(want) ^ set(have))
    if missing:
        return f"the tensors differ from the family's: {missing[:4]}"
    return _reload_problem(dense)


def _reload_problem(dense: nn.Module) -> str | None:
    """Whether the family, built from the sub-network's config with its tensors, computes what it computes.

    A family may derive a constant from the config at construction (Gemma's and BioGPT's
    embedding scale ``sqrt(hidden_size)``), which a narrower sub-network keeps at its full-size
    value: shapes match, outputs do not. One short input (8 token ids, or one random image)
    through both tells; the first scalar attribute or buffer that differs is named.
    """
    cfg = dense.config
    if getattr(dense, "main_input_name", "input_ids") == "pixel_values":
        size, ch = getattr(cfg, "image_size", None), getattr(cfg, "num_channels", 3)
        if not isinstance(size, int):
            return None
        x = torch.randn(1, ch, size, size, generator=torch.Generator().manual_seed(0))
    else:
        x = torch.arange(8).unsqueeze(0) % max(1, int(getattr(cfg, "vocab_size", 8) or 8))
    p = next(dense.parameters())
    try:
        ref = type(dense)._from_config(cfg).to(device=p.device, dtype=p.dtype).eval()
        ref.load_state_dict(dense.state_dict(), strict=False)
        with torch.no_grad():
            a, b = default_output(ref(x.to(p.device))), default_output(dense.eval()(x.to(p.device)))
    except Exception:  # noqa: BLE001 - a family that cannot run this probe is not judged by it
        return None
    diff = (a.float() - b.float()).abs().max().item()
    if diff <= 1e-4 * max(1.0, b.float().abs().max().item()):
        return None
    cause = ""
    mine = dict(dense.named_modules())
    for name, m in ref.named_modules():
        d = mine.get(name)
        scalars = [(k, v, getattr(d, k, None)) for k, v in vars(m).items() if isinstance(v, float)]
        scalars += [(k, v.item(), getattr(d, k).item()) for k, v in m._buffers.items()
                    if v is not None and v.dim() == 0 and isinstance(getattr(d, k, None), torch.Tensor)]
        bad = next(((k, v, w) for k, v, w in scalars if isinstance(w, float) and abs(v - w) > 1e-6 * max(1, abs(w))), None)
        if bad:
            cause = f": {name}.{bad[0]} is {bad[1]:.6g} from the config, {bad[2]:.6g} in the sub-network"
            break
    return (f"{type(dense).__name__} built from the sub-network's config computes something else (outputs differ by "
            f"{diff:.2g}{cause}); a sub-network that keeps the sizes the config derives it from can be saved")


def save_hf(dense: nn.Module, directory: str | Path, *, files: Mapping[str, bytes] | None = None,
            source: str | None = None, overwrite: bool = False) -> Path:
    """Save a dense sub-network as a Hugging Face folder (``save_pretrained``: safetensors + ``config.json``).

    Tokenizer, generation and preprocessor files (:data:`TOKENIZER_FILES`), and a sentence-transformers
    model's ``modules.json`` and module configs (:mod:`elasticize.adapters.hf.sentence`: the folder is
    then one that ``SentenceTransformer(folder)`` loads, its pooling dimension set to the sub-network's
    hidden size), come from ``files``
    (those an elasticize file carries, :attr:`ElasticModel.files`), or when it is empty are copied
    from ``source``, which must be the folder the model was converted from in this process (never a
    folder read from a manifest: another machine's path may hold another model). When neither gives
    a tokenizer or preprocessor file, a ``UserWarning`` says so: the folder loads as a model, but
    ``AutoTokenizer.from_pretrained`` on it fails or builds some other tokenizer.

    The folder is built next to its destination and swapped into place
    (``elasticize._files.swap_folder``): a failure leaves the old folder (or nothing) and no
    temporary folder, and replacing a folder leaves the old or the new one whole. The folder gets
    ``0o777 & ~umask`` (or the mode of the folder it replaces), its files ``0o666 & ~umask``.

    Args:
        dense: a dense sub-network from :meth:`ElasticModel.extract` of a transformers model.
        directory: the folder to write (missing parents are created).
        files: file name -> contents, names from :data:`TOKENIZER_FILES`.
        source: the folder the original model was converted from in this process.
        overwrite: replace an existing folder.

    Raises:
        ValueError: if the family's config cannot describe this sub-network (see :func:`export_problem`),
            ``directory`` is ``source`` or holds it, or a name in ``files`` is not an allowed file name
            (:func:`check_file_name`).
        FileExistsError: if ``directory`` exists and ``overwrite`` is False, or is a file.
        FileNotFoundError: a parent of ``directory`` is a file.
        PermissionError: the folder cannot be written (see :func:`elasticize._files.check_output`).
        OSError: writing failed (e.g. a full disk); the old folder stays.
    """
    from ..._files import check_output, swap_folder

    out = check_output(directory, kind="folder", overwrite=overwrite, inputs=(source,))
    for name in files or {}:
        check_file_name(name)
    why = export_problem(dense)
    if why is not None:
        raise ValueError(f"this sub-network cannot be saved as a plain transformers folder: {why}")
    if not files and source is not None and Path(source).is_dir():
        files = {**folder_files(source, cap=None), **sentence_files(source)}
    files = fit_sentence_files(files or {}, int(getattr(dense.config, "hidden_size", 0) or 0))
    written: list[str] = []

    def build(tmp: Path) -> None:
        cfg = dense.config
        extra = cfg.__dict__.pop("elasticize_layers", None)
        try:
            dense.save_pretrained(tmp)
        finally:
            if extra is not None:
                cfg.elasticize_layers = extra
        written.extend(write_files(files or {}, tmp))

    swap_folder(out, build, overwrite=overwrite, inputs=(source,))
    if not has_tokenizer(written):
        warnings.warn(f"{out} has no tokenizer: no tokenizer or preprocessor files came with the model (its "
                      "elasticize file carries none: made from a model object or a folder without them, or by an older "
                      "elasticize); save the original's into it: AutoTokenizer.from_pretrained(ORIGINAL)"
                      f".save_pretrained({str(out)!r})", stacklevel=2)
    return out
