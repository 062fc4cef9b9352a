"""Data for ``elasticize eval``: an image folder, a text file or a ``module:function`` that yields batches.

The folder and file are read by the loaders ``elasticize train`` uses
(:func:`~elasticize.train.data.image_folder_data`, :func:`~elasticize.train.data.text_file_data`); half
the samples calibrate (BN recalibration, bias compensation, the solver's sensitivities), the other
half are held out and measured. A ``module:function`` (imported only because the user named it) is
called without arguments and must return an iterable of batches: tensors, ``(x, y)`` pairs or
mappings of keyword inputs; its first half calibrates, its second half is measured.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..batches import default_output, split_batch

__all__ = ["EvalData", "eval_data"]


@dataclass
class EvalData:
    """Calibration and held-out batches, with the metric and output function that fit them.

    Attributes:
        calibration: batches for BN recalibration, bias compensation and sensitivities.
        held: batches that are measured.
        metric: ``"accuracy"`` (labelled batches) or ``"cosine"`` (to the original model's output).
        output_fn: ``(model output, batch) -> tensor`` (logits, or a mean-pooled sentence embedding).
        source: what the data was, for the record (a file or folder name, or the function's name).
    """

    calibration: list[Any]
    held: list[Any]
    metric: str
    output_fn: Callable[[Any, Any], Any]
    source: str


def eval_data(spec: str, em: Any, *, batch_size: int = 32, max_batches: int = 64, seed: int = 0) -> EvalData:
    """Read ``--data``: an image folder, a text file (one sample per line) or ``package.module:function``.

    Args:
        spec: the folder, the file or the import path.
        em: the elastic model (its example input size and tokenizer files read the data).
        batch_size: samples per batch.
        max_batches: at most this many batches of each half.
        seed: the split's seed.

    Returns:
        The :class:`EvalData`.

    Raises:
        FileNotFoundError: ``spec`` is no file, folder or import path.
        ValueError: data the loaders refuse (see :func:`~elasticize.train.data.image_folder_data`,
            :func:`~elasticize.train.data.text_file_data`), or fewer than two batches.
        KeyError: an import path that cannot be imported.
    """
    from ..train.data import image_folder_data, text_file_data
    from ..train.losses import mean_pooled

    p = Path(spec)
    if p.is_dir():
        train, held = image_folder_data(p, em, batch_size=batch_size, eval_fraction=0.5, seed=seed)
        calib, metric, out_fn = list(itertools.islice(train, max_batches)), "accuracy", default_output
    elif p.is_file():
        train, held = text_file_data(p, em, batch_size=batch_size, eval_fraction=0.5, seed=seed)
        calib, metric, out_fn = list(itertools.islice(train, max_batches)), "cosine", mean_pooled
    elif re.fullmatch(r"[\w.]+:[\w.]+", spec):
        from ..adapters.importpath import import_callable

        batches = list(itertools.islice(iter(import_callable(spec)()), 2 * max_batches))
        if len(batches) < 2:
            raise ValueError(f"--data {spec} yielded {len(batches)} batch(es); it needs at least 2 (half calibrate, "
                             "half are measured)")
        half = len(batches) // 2
        calib, held = batches[:half], batches[half:]
        metric = "accuracy" if split_batch(batches[0])[2] is not None else "cosine"
        out_fn = default_output
    else:
        raise FileNotFoundError(f"--data {spec}: no such file or folder, nor a package.module:function (an image "
                                "folder with one sub-folder per class, a text file with one sample per line, or a "
                                "function that yields batches)")
    held = list(held)[:max_batches]
    if not calib or not held:
        raise ValueError(f"--data {spec}: too few samples to calibrate on half and measure the other half; give more")
    return EvalData(calib, held, metric, out_fn, p.name if p.exists() else spec)
