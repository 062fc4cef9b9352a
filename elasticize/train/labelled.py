"""Labelled text for ``elasticize train``: JSONL or CSV files of ``text`` and ``label``, for a
Hugging Face ``*ForSequenceClassification`` model.

A ``.jsonl`` file has one JSON object per line, ``{"text": "...", "label": "json"}``; a ``.csv``
file has a header row naming the columns ``text`` and ``label`` (other fields are ignored in
both). A label is one of the model's label names (``config.id2label``, e.g. set with
``BertConfig(id2label={0: "json", 1: "re"})``) or a class index ``0 .. num_labels - 1`` (a JSON
integer, or digits in CSV). The batches are those of :func:`~elasticize.train.data.tokenized_loaders`
with ``"labels"``, so the trainer's task loss is cross-entropy on the logits
(:func:`~elasticize.batches.split_batch` takes ``labels`` as the target) and the metric is accuracy.
The file is read as data: JSON objects and CSV strings only; every field checked before training.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from .data import model_tokenizer, tokenized_loaders

__all__ = ["LABELLED_SUFFIXES", "is_labelled", "read_labelled", "label_ids", "labelled_text_data"]

#: File name endings read as labelled text (any other file is one sample per line).
LABELLED_SUFFIXES = (".jsonl", ".csv")


def is_labelled(path: str | Path) -> bool:
    """Whether ``path`` names a labelled text file (:data:`LABELLED_SUFFIXES`, any case)."""
    return Path(path).suffix.lower() in LABELLED_SUFFIXES


def _jsonl(p: Path, what: str, text: str) -> list[tuple[int, Any, Any]]:
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{what} {p} line {n} is not JSON ({e.msg}); give one object per line, "
                             '{"text": "...", "label": "..."}') from None
        if not isinstance(obj, dict):
            raise ValueError(f"{what} {p} line {n} is a JSON {type(obj).__name__}, not an object with text and label")
        rows.append((n, obj.get("text"), obj.get("label", ...)))
    return rows


def _csv(p: Path, what: str, text: str) -> list[tuple[int, Any, Any]]:
    reader = csv.DictReader(text.splitlines())
    fields = reader.fieldnames or []
    for need in ("text", "label"):
        if fields and need not in fields:
            raise ValueError(f"{what} {p} has no {need!r} column (its header is {', '.join(fields)}); the first row "
                             "names the columns: text,label")
    return [(reader.line_num, row.get("text"), row.get("label")) for row in reader]


def read_labelled(path: str | Path, *, what: str = "--data") -> tuple[list[str], list[str | int]]:
    """``(texts, labels)`` of a JSONL or CSV file of ``text`` and ``label`` fields.

    Args:
        path: the ``.jsonl`` or ``.csv`` file.
        what: the option named in errors.

    Returns:
        The texts (stripped) and their labels (strings, or JSON integers), in file order.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not UTF-8, a JSONL line that is not a JSON object, a CSV without a ``text`` or
            ``label`` column, a sample with no (or an empty) text or no label, a label that is not
            a string or an integer, or a file with no sample.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} {p}: no such file (labelled text is JSONL or CSV with text and label)")
    try:
        raw = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {p} is not UTF-8 text ({e})") from None
    rows = _jsonl(p, what, raw) if p.suffix.lower() == ".jsonl" else _csv(p, what, raw)
    texts, labels = [], []
    for n, text, label in rows:
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{what} {p} line {n} has no 'text' field (or an empty one); every sample needs "
                             "a text and a label")
        if label is ... or label is None or label == "":
            raise ValueError(f"{what} {p} line {n} has no 'label' field; every sample needs a text and a label")
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise ValueError(f"{what} {p} line {n}: label {label!r} is neither a string nor an integer")
        texts.append(text.strip())
        labels.append(label)
    if not texts:
        raise ValueError(f"{what} {p} is empty: it needs samples with text and label fields")
    return texts, labels


def label_ids(labels: list[str | int], config: Any, *, where: str) -> list[int]:
    """Class indices of ``labels`` for a model of this Hugging Face ``config``: a name of
    ``config.label2id``, else an integer (or digits) in ``0 .. config.num_labels - 1``.

    Raises:
        ValueError: a label that is neither (the message names the model's labels).
    """
    n = int(config.num_labels)
    names = {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
    out = []
    for i, label in enumerate(labels):
        if isinstance(label, str) and label in names:
            out.append(names[label])
            continue
        idx = label if isinstance(label, int) else int(label) if label.strip().isdigit() else None
        if idx is None or not 0 <= idx < n:
            shown = ", ".join(list(names)[:10])
            raise ValueError(f"{where}: unknown label {label!r} (sample {i + 1}); the model has {n} labels: "
                             f"{shown} or 0..{n - 1} (set the model's id2label to your label names)")
        out.append(idx)
    return out


def labelled_text_data(path: str | Path, em: Any, *, batch_size: int = 32, eval_fraction: float = 0.1,
                       max_length: int = 128, seed: int = 0, tokenizer: Any = None, shard: tuple[int, int] = (0, 1),
                       workers: int = 0, what: str = "--data") -> tuple[DataLoader, list[Any]]:
    """A labelled JSONL or CSV file as ``(train loader, held-out batches)`` of mappings
    ``{"input_ids", "attention_mask"}`` ``(batch, tokens)`` and ``"labels"`` ``(batch,)``.

    Args:
        path: the file (see the module).
        em: a Hugging Face ``*ForSequenceClassification`` super-network (its ``config`` gives the labels).
        batch_size: samples per batch.
        eval_fraction: share held out.
        max_length: tokens per sample.
        seed: data-split and batch-order seed.
        tokenizer: default the model's own (:func:`~elasticize.train.data.model_tokenizer`).
        shard: ``(rank, world size)`` under data-parallel training.
        workers: the training loader's worker processes.
        what: the option named in errors.

    Raises:
        FileNotFoundError, ValueError: see :func:`read_labelled` and :func:`label_ids`; also a
            model that is not a sequence classifier, or one without a tokenizer.
    """
    model = getattr(em, "model", None)
    config = getattr(model, "config", None)
    if not type(model).__name__.endswith("ForSequenceClassification") or config is None:
        raise ValueError(f"{what} {path} is labelled text, which trains a Hugging Face *ForSequenceClassification "
                         f"model, and this model is {type(model).__name__}; convert a sequence classifier, or give a "
                         "text file of lines to distil this one")
    texts, labels = read_labelled(path, what=what)
    ids = label_ids(labels, config, where=f"{what} {path}")
    return tokenized_loaders(texts, tokenizer if tokenizer is not None else model_tokenizer(em), labels=ids,
                             batch_size=batch_size, eval_fraction=eval_fraction, max_length=max_length, seed=seed,
                             shard=shard, workers=workers)
