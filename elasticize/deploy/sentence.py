"""A sub-network as a sentence-transformers folder: ``SentenceTransformer(folder)`` loads it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["save_sentence_transformers"]


def save_sentence_transformers(em: Any, directory: str | os.PathLike, subnet: Any = None, *,
                               overwrite: bool = False) -> Path:
    """Save sub-network ``subnet`` of a sentence-transformers model as a sentence-transformers folder.

    The folder is :meth:`elasticize.ElasticModel.save_pretrained`'s (the dense sub-network's
    transformer, its config and the tokenizer) plus the original model's ``modules.json``,
    ``sentence_bert_config.json`` and Pooling / Normalize configs, which
    :func:`elasticize.convert` stored in the file (:mod:`elasticize.adapters.hf.sentence`), the
    pooling dimension set to the sub-network's hidden size. ``SentenceTransformer(folder).encode``
    then computes the original pipeline (tokenize, the sub-network, pooling, normalisation) on the
    sub-network. ``em.save_pretrained`` writes the same folder for such a model; this function
    refuses a model that is not one.

    Args:
        em: an :class:`~elasticize.ElasticModel` converted from a sentence-transformers folder
            (one with ``modules.json``), or loaded from its file.
        directory: the folder to write (built beside it and swapped into place).
        subnet: a preset name, a config, or None for the largest sub-network.
        overwrite: replace an existing folder.

    Returns:
        The folder's path.

    Raises:
        ValueError: the model carries no sentence-transformers files (converted from a folder
            without ``modules.json``, or with modules other than Transformer, Pooling and Normalize),
            or the family's config cannot describe the sub-network (see ``save_pretrained``).
        TypeError: not a transformers model.
        FileExistsError, FileNotFoundError, PermissionError, OSError: see ``save_pretrained``.
    """
    from ..adapters.hf import is_sentence_model, sentence_files

    files = em.files or (sentence_files(em.source_dir) if em.source_dir else {})
    if not is_sentence_model(files):
        raise ValueError("this model is not a sentence-transformers model: its file carries no modules.json (convert "
                         "from a sentence-transformers folder, e.g. all-MiniLM-L6-v2's); save a plain transformers "
                         "folder instead (--format hf, em.save_pretrained)")
    return Path(em.save_pretrained(str(directory), subnet, overwrite=overwrite))
