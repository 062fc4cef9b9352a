"""Data for ``elasticize train``: an image folder (classification) or a text file (one sample per line).

Both return a training ``DataLoader`` and a held-out list of batches. Images are read with
torchvision's ``ImageFolder`` (one sub-folder per class) and made tensors at the model's example
input size by :func:`image_transforms` (timm's data config for a timm model). Text lines are tokenized with the Hugging Face tokenizer that travels with the model
(:attr:`~elasticize.ElasticModel.files`, read from its folder at conversion and kept in its file)
and grouped into batches of similar length (:func:`length_grouped_batches`),
each padded to its longest line; batches are mappings ``{"input_ids", "attention_mask"}``.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..elastic import ElasticModel

__all__ = ["image_folder_data", "image_transforms", "text_file_data", "read_text_lines", "calibration_batches",
           "length_grouped_batches", "tokenized_loaders", "model_tokenizer"]


def length_grouped_batches(lengths: Sequence[int], batch_size: int, *, seed: int = 0) -> list[list[int]]:
    """Sample indices grouped into batches of similar length, in a shuffled but fixed batch order.

    Sorting by length before batching keeps padding small: on the standard library's docstring
    sentences (20 tokens on average) random batches of 32 pad to 51 tokens on average, grouped
    ones to 20. The batch order is a permutation drawn from ``seed``, the same every epoch, so
    training resumes exactly (see :class:`~elasticize.train.Trainer`).

    Args:
        lengths: each sample's length (tokens).
        batch_size: samples per batch (the last batch of the sorted order may be smaller).
        seed: seed of the batch-order permutation.

    Returns:
        Lists of sample indices, one per batch (a ``batch_sampler`` for ``DataLoader``).

    Raises:
        ValueError: ``batch_size < 1``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    groups = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    perm = torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed)).tolist()
    return [groups[i] for i in perm]


def _split(n: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    k = int(round(n * eval_fraction))
    if n - k < 1:
        raise ValueError(f"only {n} samples: nothing left to train on after holding out {k}")
    return perm[k:], perm[:k]


def _shard(items: list[Any], shard: tuple[int, int], what: str) -> list[Any]:
    """Process ``rank``'s share of ``items`` (``shard = (rank, world)``): every ``world``-th item
    from ``rank`` on, after dropping the remainder so that every process gets as many."""
    rank, world = shard
    if world == 1:
        return items
    if len(items) < world:
        raise ValueError(f"{len(items)} training {what} cannot be shared by {world} processes; give more data or "
                         "start fewer processes")
    return items[:len(items) // world * world][rank::world]


def image_folder_data(path: str | Path, em: ElasticModel, *, batch_size: int = 32, eval_fraction: float = 0.1,
                      seed: int = 0, workers: int = 0, shard: tuple[int, int] = (0, 1),
                      augment: bool = False) -> tuple[DataLoader, list[Any]]:
    """An image folder (``PATH/<class>/<image>``) as ``(train loader, held-out batches)`` of ``(x, y)``.

    ``x`` is ``(batch, channels, height, width)`` at the model's example input size, made by
    :func:`image_transforms` (the training transform for the loader, the evaluation one for the
    held-out batches).

    Args:
        augment: the training loader augments (see :func:`image_transforms`).
        workers: the training loader's worker processes (``DataLoader(num_workers=)``).
        shard: ``(rank, world size)`` under data-parallel training: the loader gives this
            process's share of the training images (every process the same number); the held-out
            batches are the same on every process.

    Raises:
        FileNotFoundError: ``path`` is not a folder.
        ValueError: a folder with no class sub-folders or no images, fewer training images than
            processes, or a model whose example input is not an image ``(1, C, H, W)``.
    """
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"--data {p}: no such folder (an image folder has one sub-folder per class)")
    from torchvision import datasets

    train_tf, eval_tf = image_transforms(em, augment=augment)
    try:
        ds, held_ds = (datasets.ImageFolder(str(p), transform=tf) for tf in (train_tf, eval_tf))
    except (FileNotFoundError, RuntimeError) as e:
        raise ValueError(f"--data {p}: {e}") from None
    tr, ev = _split(len(ds), eval_fraction, seed)
    loader = DataLoader(Subset(ds, _shard(tr, shard, "images")), batch_size=batch_size, shuffle=False, num_workers=workers, drop_last=False)
    held = list(DataLoader(Subset(held_ds, ev), batch_size=batch_size)) if ev else []
    return loader, held


def _timm_config(em: Any, size: tuple[int, int, int]) -> dict[str, Any] | None:
    """timm's data config (``resolve_data_config``) of a timm model at ``size``, else None."""
    from ..adapters import get_adapter

    recipe = getattr(em, "recipe", None) or {}
    model = getattr(em, "model", None)
    if recipe.get("adapter") != "timm" and not (model is not None and get_adapter("timm").owns(model)):
        return None
    from timm.data import resolve_data_config

    cfg = getattr(model, "pretrained_cfg", None)
    if cfg is None:  # no model at hand (calibration at conversion): the registered config of the name
        import timm

        found = timm.get_pretrained_cfg(str(recipe.get("name")), allow_unregistered=True)
        cfg = found.to_dict() if found is not None else {}
    return resolve_data_config({"input_size": size}, pretrained_cfg=dict(cfg))


def image_transforms(em: Any, *, augment: bool = False) -> tuple[Any, Any]:
    """``(training transform, evaluation transform)`` of PIL images for ``em``'s example input size.

    A timm model (recipe adapter ``timm``, or a timm module): timm's own, from ``resolve_data_config`` on the
    model's ``pretrained_cfg`` (its mean, std, interpolation and ``crop_pct``) at the example
    input's size: ``create_transform(**config)`` (resize the shorter side to ``size / crop_pct``,
    then a centre crop) for evaluation, and for training too unless ``augment``, then
    ``create_transform(**config, is_training=True)`` (random resized crop, horizontal flip, colour
    jitter). Any other model: resize to the example input's height and width (the aspect ratio is
    not kept), scale to [0, 1], and normalise with ImageNet's mean and std (three channels) or
    0.5 / 0.5 (other channel counts); with ``augment`` the training transform is timm's
    ``create_transform(input_size, mean, std, is_training=True)`` at that size and normalisation.
    One-channel models see the images converted to greyscale first.

    Args:
        em: the model (its ``input_shapes``, ``recipe`` and, for timm, ``model.pretrained_cfg``).
        augment: the training transform augments.

    Returns:
        Two callables from a PIL image to a ``(channels, height, width)`` float tensor.

    Raises:
        ValueError: a model whose example input is not an image ``(1, C, H, W)``.
    """
    shapes = em.input_shapes
    if not shapes or len(shapes[0]) != 4:
        raise ValueError(f"the model's example input has shape {shapes[0] if shapes else None}; an image folder needs "
                         "a model that takes (batch, channels, height, width)")
    _, c, h, w = (int(n) for n in shapes[0])
    from torchvision import transforms

    cfg = _timm_config(em, (c, h, w))
    if cfg is None:
        mean, std = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) if c == 3 else ((0.5,) * c, (0.5,) * c)
        cfg = {"input_size": (c, h, w), "mean": mean, "std": std}
        evaluate = transforms.Compose([transforms.Resize((h, w)), transforms.ToTensor(), transforms.Normalize(mean, std)])
    else:
        from timm.data import create_transform

        evaluate = create_transform(**cfg)
    train = evaluate
    if augment:
        from timm.data import create_transform

        train = create_transform(**cfg, is_training=True)
    if c == 1:  # ImageFolder reads RGB
        evaluate, train = (transforms.Compose([transforms.Grayscale(1), t]) for t in (evaluate, train))
    return train, evaluate


def read_text_lines(path: str | Path) -> list[str]:
    """The non-empty lines of a UTF-8 text file.

    Raises:
        FileNotFoundError: no such file. ValueError: a file with no non-empty line, or not UTF-8 text.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--data {p}: no such file (a text file has one sample per line)")
    try:
        lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as e:
        raise ValueError(f"--data {p} is not UTF-8 text ({e})") from None
    lines = [ln for ln in lines if ln]
    if not lines:
        raise ValueError(f"--data {p} is empty: it needs one text sample per line")
    return lines


class _Lines(Dataset):
    """Text samples, each ``text`` or, with labels, ``(text, label)``."""

    def __init__(self, lines: list[str], labels: list[int] | None = None) -> None:
        self.lines, self.labels = lines, labels

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, i: int) -> Any:
        return self.lines[i] if self.labels is None else (self.lines[i], self.labels[i])


def tokenized_loaders(lines: list[str], tokenizer: Any, *, labels: list[int] | None = None, batch_size: int = 32,
                      eval_fraction: float = 0.1, max_length: int = 128, seed: int = 0,
                      shard: tuple[int, int] = (0, 1), workers: int = 0) -> tuple[DataLoader, list[Any]]:
    """Text samples as ``(train loader, held-out batches)`` of mappings ``{"input_ids", "attention_mask"}``
    (``(batch, tokens)``, each batch padded to its longest sample, batches grouped by length:
    :func:`length_grouped_batches`), plus ``"labels"`` ``(batch,)`` when ``labels`` are given
    (one class index per line).

    Raises:
        ValueError: ``eval_fraction`` outside [0, 1), nothing left to train on, fewer training
            batches than processes.
    """
    def collate(batch: list[Any]) -> dict[str, torch.Tensor]:
        texts = [b if labels is None else b[0] for b in batch]
        enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if labels is not None:
            out["labels"] = torch.tensor([b[1] for b in batch], dtype=torch.int64)
        return out

    tr, ev = _split(len(lines), eval_fraction, seed)

    def part(idx: list[int]) -> _Lines:
        return _Lines([lines[i] for i in idx], None if labels is None else [labels[i] for i in idx])

    def grouped(ds: _Lines) -> list[list[int]]:
        lengths = [len(ids) for ids in tokenizer(ds.lines, truncation=True, max_length=max_length)["input_ids"]]
        return length_grouped_batches(lengths, batch_size, seed=seed)

    train, held = part(tr), part(ev)
    loader = DataLoader(train, batch_sampler=_shard(grouped(train), shard, "batches"), collate_fn=collate,
                        num_workers=workers)
    return loader, (list(DataLoader(held, batch_sampler=grouped(held), collate_fn=collate)) if ev else [])


def text_file_data(path: str | Path, em: ElasticModel, *, batch_size: int = 32, eval_fraction: float = 0.1,
                   max_length: int = 128, seed: int = 0, tokenizer: Any = None,
                   shard: tuple[int, int] = (0, 1), workers: int = 0) -> tuple[DataLoader, list[Any]]:
    """A text file (one sample per line) as ``(train loader, held-out batches)`` of tokenized mappings.

    Args:
        tokenizer: a Hugging Face tokenizer; default: the one made of the model's tokenizer files
            (:attr:`~elasticize.ElasticModel.files`), else for a model converted from a hub id
            (``hf:ID``) that hub model's tokenizer.
        shard: ``(rank, world size)`` under data-parallel training: the loader gives this
            process's share of the length-grouped training batches (every process the same number).
        workers: the training loader's worker processes (``DataLoader(num_workers=)``).

    Raises:
        FileNotFoundError, ValueError: see :func:`read_text_lines`; also a model that is not a
            Hugging Face model or carries no tokenizer files (no folder path named in a manifest is
            read: it may hold another model on this machine), or fewer training batches than
            processes.
    """
    lines = read_text_lines(path)
    return tokenized_loaders(lines, tokenizer if tokenizer is not None else model_tokenizer(em), batch_size=batch_size,
                             eval_fraction=eval_fraction, max_length=max_length, seed=seed, shard=shard,
                             workers=workers)


def model_tokenizer(em: Any) -> Any:
    """The tokenizer of ``em``: from its tokenizer files, else (hub models) from the hub id.

    Raises:
        ValueError: not a Hugging Face model, or one with no tokenizer files (and not from the hub).
    """
    from ..adapters.hf import has_tokenizer, tokenizer_from_files

    recipe = em.recipe or {}
    files = getattr(em, "files", None) or {}
    if recipe.get("adapter") != "hf":
        raise ValueError("text data needs a Hugging Face model converted from a folder or hub id (its tokenizer "
                         "tokenizes the lines); this model's recipe names none")
    name = recipe.get("name")
    if has_tokenizer(files):
        return tokenizer_from_files(files, config=(recipe.get("kwargs") or {}).get("config"))
    if recipe.get("origin") == "hub" and name and not Path(name).exists():
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as e:
            raise ValueError(f"no tokenizer for {name}: {e}") from None
    raise ValueError(f"the model ({name or 'a Hugging Face model'}) carries no tokenizer files: its file was written "
                     "by an older elasticize, or its folder had none. Convert the original folder again, or store its "
                     "tokenizer in the file: em = elasticize.load(FILE); em.files = elasticize.adapters.hf.folder_files("
                     "ORIGINAL_FOLDER); elasticize.save(em, NEW_FILE) (Python: or pass tokenizer=)")


def calibration_batches(path: str | Path, *, input_shapes: list[list[int]], recipe: dict[str, Any],
                        num_batches: int = 8, batch_size: int = 32, max_length: int = 128,
                        files: Mapping[str, bytes] | None = None) -> list[Any]:
    """The first ``num_batches`` batches of an image folder or a text file, for activation importance.

    A folder is read as an image folder (:func:`image_folder_data`), a file as text lines
    (:func:`text_file_data`, tokenized by the tokenizer ``files`` make).
    Nothing is held out.

    Args:
        path: the image folder or text file.
        input_shapes: the model's example input shapes, e.g. ``[[1, 3, 224, 224]]``.
        recipe: the conversion recipe (a Hugging Face model's, for text).
        files: the model's tokenizer files (:attr:`~elasticize.ElasticModel.files`), for text.

    Returns:
        Up to ``num_batches`` batches: ``(x, y)`` with ``x`` of shape ``(batch, C, H, W)``, or
        mappings of ``input_ids`` / ``attention_mask`` of shape ``(batch, tokens)``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: as :func:`image_folder_data` and :func:`text_file_data`.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"calibration data {p}: no such file or folder (an image folder with one sub-folder "
                                "per class, or a text file with one sample per line)")
    model = SimpleNamespace(input_shapes=input_shapes, recipe=recipe, files=dict(files or {}))  # what loaders read
    try:
        if p.is_dir():
            loader, _ = image_folder_data(p, model, batch_size=batch_size, eval_fraction=0.0)  # type: ignore[arg-type]
        else:
            loader, _ = text_file_data(p, model, batch_size=batch_size, eval_fraction=0.0,  # type: ignore[arg-type]
                                       max_length=max_length)
    except ValueError as e:
        raise ValueError(str(e).replace("--data ", "calibration data ", 1)) from None
    return list(itertools.islice(loader, num_batches))
