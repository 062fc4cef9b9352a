"""``train_file``: the whole ``elasticize train`` job as one API call (the CLI only parses options).

A folder of data is image classification (cross-entropy; the model's output is the logits); a
``.jsonl`` or ``.csv`` file of ``text`` and ``label`` is sequence classification of a Hugging
Face ``*ForSequenceClassification`` model (cross-entropy on the logits, accuracy; see
:mod:`~elasticize.train.labelled`); any other file is text, one sample per line, distilled from
the original model: the student's mean-pooled sentence embedding is trained towards the
original's (see :data:`TEXT_LOSSES`). Distillation from the original is the default for a
model converted from pretrained weights (on the logits, :data:`IMAGE_LOSSES`, for images and
labelled text), and always on for lines of text. After training: BN recalibration per preset, each preset measured on the held-out
part (``accuracy``, or ``cosine`` to the original's embedding) and written into the manifest,
then the file is saved atomically. Every check happens before training, and no file is written
when one fails.

Under ``torchrun --nproc_per_node N`` (or in a process group the caller created) the job is
data-parallel: each process trains on its share of the data with
:class:`~torch.nn.parallel.DistributedDataParallel` (see :class:`~elasticize.train.Trainer` and
:func:`~elasticize.train.distributed.process_group`), and process 0 writes ``output`` and ``state``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import itertools
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from .._files import check_output
from ..model import ElasticModel
from .data import image_folder_data, text_file_data
from .distributed import process_group
from .labelled import is_labelled, labelled_text_data
from .losses import masked_hidden, mean_pooled
from .presort import SORTS, presort_blocker, sort_by_activation
from .records import TrainLog
from .schedules import SCHEDULES, make_scheduler, saved_schedule
from .state import check_state_info, read_state_info
from .trainer import PARALLEL, Trainer

__all__ = ["train_file", "RunOptions", "recipe_line", "DEFAULTS", "SCHEDULES", "TEXT_LOSSES", "IMAGE_LOSSES"]

_log = logging.getLogger(__name__)

#: The recipe of :func:`train_file` and ``elasticize train`` when no option changes it, the best
#: of the side-by-side run ``benchmarks/bench_defaults.py`` (300 steps on MiniLM; the training
#: guide says why): Subnetwork-to-go (the full network and one random sub-network per step) with
#: the full network's loss weighted 3 (``strategy_options``, merged under the caller's own when the
#: strategy is this one), every preset also trained at every step (``always=None``), one-cycle
#: learning rate peaking at 5e-5, dropout off (the original's output, the target, is
#: deterministic); distillation from the original as before (always for text; for images when
#: converted from pretrained weights). A file still as converted without data is first ranked by
#: activation importance on the training data (``RunOptions.sort``).
DEFAULTS: dict[str, Any] = {"strategy": "subnetwork-to-go", "strategy_options": {"full_weight": 3.0}, "lr": 5e-5,
                            "schedule": "onecycle", "dropout": False, "always": None}


@dataclass(frozen=True)
class RunOptions:
    """How :func:`train_file` runs its loop (``elasticize train``'s options of the same names).

    Attributes:
        weight_decay: AdamW's decoupled weight decay (Loshchilov & Hutter, 2019), >= 0.
        max_grad_norm: clip each update's gradients to this total L2 norm (None: no clipping).
        workers: worker processes of the training ``DataLoader`` (0: load in this process).
        distribution: SortedNet's ``P_{B_j}`` per dimension (``{"width": [0.4, 0.3, 0.2, 0.1]}``:
            probabilities over the choices, largest first; see :class:`~elasticize.train.SubnetSampler`).
        parallel: ``"ddp"`` or ``"fsdp"`` under ``torchrun`` (see :class:`~elasticize.train.Trainer`).
        val_data: held-out data of the same kind as ``data`` (an image folder or a text file) to
            measure the presets on; then nothing of ``data`` is held out.
        log_dir: a folder for ``metrics.csv`` and TensorBoard scalars (:class:`~elasticize.train.records.TrainLog`).
        log_every: one plain progress line every this many steps (0: none).
        status: receives the plain lines (progress records and what each phase is doing); default ``print``.
        augment: image folders: the training images are augmented (timm's training transform; see
            :func:`~elasticize.train.data.image_transforms`); the held-out ones never are.
        sort: one of :data:`~elasticize.train.presort.SORTS`: ``"auto"`` ranks a file still as converted
            without data by activation importance on 8 batches of ``data`` before training (function-preserving;
            :func:`~elasticize.train.presort.sort_by_activation`), ``"activation"`` insists (ValueError for a file
            :func:`~elasticize.train.presort.presort_blocker` keeps, or when sorting would change the full network's
            output), ``"keep"`` never does.
    """

    weight_decay: float = 0.01
    max_grad_norm: float | None = None
    workers: int = 0
    distribution: Mapping[str, Sequence[float]] | None = None
    parallel: str = "ddp"
    val_data: str | os.PathLike | None = None
    log_dir: str | os.PathLike | None = None
    log_every: int = 0
    status: Callable[[str], None] | None = None
    augment: bool = False
    sort: str = "auto"

    def check(self, data: Path) -> None:
        """Raise ValueError (a bad value), FileNotFoundError (a missing ``val_data``), FileExistsError
        (a ``log_dir`` that is a file) or ImportError (``log_dir`` without tensorboard installed)
        before anything is loaded."""
        if not self.weight_decay >= 0:
            raise ValueError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"--max-grad-norm must be > 0 (leave it out for no clipping), got {self.max_grad_norm}")
        if self.workers < 0:
            raise ValueError(f"--workers must be >= 0 (0: load in the training process), got {self.workers}")
        if self.parallel not in PARALLEL:
            raise ValueError(f"parallel={self.parallel!r}: choose one of {', '.join(PARALLEL)}")
        if self.sort not in SORTS:
            raise ValueError(f"--sort {self.sort!r}: choose one of {', '.join(SORTS)}")
        if self.log_every < 0:
            raise ValueError(f"--log-every must be >= 0 (0: no plain records), got {self.log_every}")
        if self.log_dir is not None and Path(self.log_dir).exists() and not Path(self.log_dir).is_dir():
            raise FileExistsError(f"--log-dir {self.log_dir} is a file; give a folder for metrics.csv and TensorBoard")
        if self.log_dir is not None and importlib.util.find_spec("tensorboard") is None:
            raise ImportError("--log-dir writes TensorBoard scalars, which need the tensorboard package: "
                              "pip install 'elasticize[train]'")
        if self.augment and not data.is_dir():
            raise ValueError(f"--augment applies to image folders, and --data {data} is a file; drop --augment")
        if self.val_data is not None:
            v = Path(self.val_data)
            if not v.exists():
                raise FileNotFoundError(f"--val-data {v}: no such file or folder")
            if v.is_dir() != data.is_dir():
                raise ValueError(f"--val-data {v} is {'a folder' if v.is_dir() else 'a file'} and --data is not; give "
                                 "held-out data of the same kind (an image folder, or a text file)")
            if not v.is_dir() and is_labelled(v) != is_labelled(data):
                raise ValueError(f"--val-data {v} is {'' if is_labelled(v) else 'not '}labelled text (JSONL or CSV) and "
                                 "--data is the other kind; give held-out data of the same kind")

    @contextlib.contextmanager
    def phase(self, what: str, rank: int) -> Iterator[None]:
        """Say ``what`` is running, then how long it took (process 0 only)."""
        say = self.status or print
        t0 = time.perf_counter()
        if rank == 0:
            say(f"{what}...")
        yield
        if rank == 0:
            say(f"{what}: done in {time.perf_counter() - t0:.1f} s")

#: Distillation losses of :func:`train_file` for text, with the model output each one compares
#: (``elasticize train --distill-loss``; the first is the default): ``"cosine"``, ``1 - cos`` of
#: the mean-pooled sentence embeddings, or ``"hidden"``, that plus the relative MSE of every
#: token's final hidden state (:func:`~elasticize.train.hidden_distillation`). In the benchmarks'
#: MiniLM comparison ``hidden`` without dropout keeps the large sub-networks closer to the
#: original and ``cosine`` with dropout the small ones (and is 15% cheaper per step).
TEXT_LOSSES = {"cosine": mean_pooled, "hidden": masked_hidden}
#: Distillation losses of :func:`train_file` for images, on the logits (the first is the
#: default): ``"kl"`` (Hinton et al., 2015) or ``"mse"``.
IMAGE_LOSSES = ("kl", "mse")


def _choice(loss: str | None, choices: tuple[str, ...], kind: str) -> str:
    """``loss`` checked against the distillation losses for ``kind`` of data (None: the first)."""
    if loss is None:
        return choices[0]
    if loss not in choices:
        raise ValueError(f"--distill-loss {loss!r} does not apply to {kind}; choose one of {', '.join(choices)}")
    return loss


def _check_job(src: Path, out: Path, d: Path, *, steps: int, eval_every: int, schedule: str, warmup: float,
               state: str | os.PathLike | None, overwrite: bool, run: RunOptions) -> None:
    """The checks of :func:`train_file` that need no model (its errors, but KeyError and those of loading)."""
    from ..checkpoint import read_manifest

    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    if eval_every < 0:
        raise ValueError(f"--eval-every must be >= 0 (0: measure only at the end), got {eval_every}")
    if schedule not in SCHEDULES:
        raise ValueError(f"--schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if not 0 < warmup < 1:
        raise ValueError(f"--warmup {warmup}: the warm-up share of --steps must be in (0, 1), e.g. 0.06")
    read_manifest(src, presets=False)
    check_output(out, overwrite=overwrite, inputs=(src,))  # the input, kind, folder, permissions: before training
    if state is not None and Path(state).resolve() in (src.resolve(), out.resolve()):
        raise ValueError(f"--state {state} is the model or output file; give the trainer state its own path")
    if state is not None:
        check_output(state, overwrite=True, inputs=(src,))
    if not d.exists():
        raise FileNotFoundError(f"--data {d}: no such file or folder (an image folder, or a text file with one "
                                "sample per line)")
    run.check(d)


def _check_resume(resume: str | os.PathLike, em: ElasticModel, *, schedule: str, steps: int) -> None:
    """Raise FileNotFoundError or ValueError unless ``resume`` is a state of ``em`` with this schedule."""
    if not Path(resume).is_file():
        raise FileNotFoundError(f"--resume {resume}: no such trainer state file")
    meta = read_state_info(resume)
    check_state_info(f"--resume {resume}", meta, em)
    was, was_steps = saved_schedule(meta.get("scheduler"))
    if was != schedule:
        raise ValueError(f"--resume {resume} was saved with --schedule {was}; resume with the same --schedule")
    if was_steps is not None and was_steps != steps:
        raise ValueError(f"--resume {resume} comes from a {was} run of --steps {was_steps}; resume with the same "
                         "--steps (the schedule is laid out over them)")


def _distill_loss(asked: str | None, *, text: bool, distill: bool | None, pretrained: bool,
                  kind: str = "an image folder") -> str:
    """The distillation loss's name for this kind of data (None: its first).

    Raises:
        ValueError: a loss of the other kind of data, one given for images without distillation
            (``distill`` False, or None for a model not converted from pretrained weights), or
            text data with ``distill=False``.
    """
    loss = _choice(asked, tuple(TEXT_LOSSES), "text") if text else _choice(asked, IMAGE_LOSSES, kind)
    if not text and asked is not None and not (distill or (distill is None and pretrained)):
        raise ValueError(f"--distill-loss {asked} applies when distilling from the original model, and this run does "
                         "not (" + ("--no-distill" if distill is False else "the model was not converted from "
                                    "pretrained weights") + "): add --distill or drop --distill-loss")
    if text and distill is False:
        raise ValueError("text training distills from the original model (there are no labels); drop --no-distill")
    return loss


def _load_checked(src: Path, *, text: bool, model: Any, trust_remote_code: bool,
                  resume: str | os.PathLike | None, schedule: str, steps: int, distill: bool | None,
                  distill_loss: str | None, dropout: bool, labelled: bool = False) -> tuple[ElasticModel, str]:
    """``(the super-network, the distillation loss's name)``, after the checks that need the model."""
    from ..checkpoint import load

    em = load(src, model=model, trust_remote_code=trust_remote_code)
    if resume is not None:
        _check_resume(resume, em, schedule=schedule, steps=steps)
    distill_loss = _distill_loss(distill_loss, text=text and not labelled, distill=distill,
                                 pretrained=bool(em.recipe.get("pretrained")),
                                 kind="labelled text" if labelled else "an image folder")
    if not dropout:
        for m in em.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    return em, distill_loss


def _task(d: Path, em: ElasticModel, *, text: bool, distill_loss: str, batch_size: int, eval_fraction: float,
          max_length: int, seed: int, shard: tuple[int, int], run: RunOptions,
          dev: Any = "cpu") -> tuple[Any, list, Any, Any, str, str]:
    """``(training data, held-out batches, task loss, output_fn, metric, order)`` of a text file or an image folder
    (the held-out batches from ``run.val_data`` when it is given), after ``em``'s units are put in the order
    ``run.sort`` asks for (:func:`_presort`, on ``dev``; ``order`` says which)."""
    fraction = 0.0 if run.val_data is not None else eval_fraction
    labelled = text and is_labelled(d)
    if labelled:
        read: Callable[..., tuple[Any, list]] = functools.partial(labelled_text_data, max_length=max_length)
    elif text:
        read = functools.partial(text_file_data, max_length=max_length)
    else:
        read = image_folder_data
    train_read = read if text else functools.partial(read, augment=run.augment)
    train, held = train_read(d, em, batch_size=batch_size, eval_fraction=fraction, seed=seed, shard=shard,
                             workers=run.workers)
    if run.val_data is not None:
        held = list(read(run.val_data, em, batch_size=batch_size, eval_fraction=0.0, seed=seed,
                         **({"what": "--val-data"} if labelled else {}))[0])
    order = _presort(em, d, run.sort, labelled=labelled, max_length=max_length, seed=seed, dev=dev)
    if text and not labelled:
        return train, held, None, TEXT_LOSSES[distill_loss], "cosine", order
    return train, held, torch.nn.CrossEntropyLoss(), None, "accuracy", order


def _train(tr: Trainer, held: list, metric: str, *, steps: int, eval_every: int,
           on_eval: Callable[[int, dict[str, dict[str, float]]], None] | None, progress: Any,
           state: str | os.PathLike | None, save_every: int, run: RunOptions, log: TrainLog) -> list[dict[str, Any]]:
    """Train ``tr`` up to step ``steps``, measuring the presets every ``eval_every`` steps; the step records."""
    history: list[dict[str, Any]] = []
    while tr.step < steps:
        n = steps - tr.step if not eval_every else min(eval_every - tr.step % eval_every, steps - tr.step)
        history += tr.train_steps(n, progress=progress, state_path=None if state is None else str(state),
                                  save_every=save_every, on_step=log.step, total=steps)
        if eval_every and held and tr.step < steps:
            measured = _measure(tr, held, metric, run=run)
            log.measured(tr.step, measured)
            if on_eval is not None and tr.rank == 0:
                on_eval(tr.step, measured)
    return history


def _train_and_save(tr: Trainer, held: list, metric: str, out: Path, *, steps: int, latency: bool, overwrite: bool,
                    run: RunOptions, **train: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """:func:`_train`, then the presets measured (logged) and the file saved; ``(history, metrics)``."""
    log = TrainLog(run.log_dir, print_every=run.log_every, total=steps, echo=run.status or print, rank=tr.rank)
    try:
        history = _train(tr, held, metric, steps=steps, run=run, log=log, **train)
        metrics = _measure(tr, held, metric, run=run, latency=latency) if held else {}
        log.measured(tr.step, metrics)
    finally:
        log.close()
    with run.phase(f"saving {out}", tr.rank):
        tr.save(str(out), overwrite=overwrite)
    return history, metrics


def _measure(tr: Trainer, held: list, metric: str, *, run: RunOptions, latency: bool = False) -> dict[str, Any]:
    """BN recalibration (when the model has BatchNorm) and every preset measured, each phase announced."""
    from .bn import batchnorm_layers

    if batchnorm_layers(tr.em.model) or tr.em.compensation.means:
        what = " and ".join(w for w, on in (("BN recalibration", batchnorm_layers(tr.em.model)),
                                            ("bias compensation", bool(tr.em.compensation.means))) if on)
        with run.phase(f"{what} of {len(tr.em.presets)} presets", tr.rank):
            tr.recalibrate()
    with run.phase(f"measuring {len(tr.em.presets)} presets on {len(held)} held-out batches", tr.rank):
        return tr.evaluate(held, metric=metric, latency=latency)


def _presort(em: ElasticModel, d: Path, sort: str, *, labelled: bool, max_length: int, seed: int, dev: Any,
             batches: int = 8) -> str:
    """Sort ``em``'s units by activation importance on the first ``batches`` batches of 32 of ``d`` when ``sort``
    asks (:mod:`elasticize.train.presort`); the recipe line's words for the order trained.

    Raises:
        ValueError: ``sort="activation"`` for a file :func:`~elasticize.train.presort.presort_blocker` keeps,
            or a sort that changed the full network's output.
    """
    blocker = None if sort == "keep" else presort_blocker(em)
    if sort == "activation" and blocker is not None:
        raise ValueError(f"--sort activation would re-rank the units of {em.source_path or 'the model'}, but {blocker}; "
                         "give a file fresh from `elasticize convert`, or pass --sort keep")
    if sort == "keep" or blocker is not None:
        return "units as in the file" + ("" if sort == "keep" else f" ({blocker})")
    if labelled:
        data = labelled_text_data(d, em, batch_size=32, eval_fraction=0.0, seed=seed, max_length=max_length)[0]
    else:
        from .data import calibration_batches
        data = calibration_batches(d, input_shapes=em.input_shapes, recipe=em.recipe, files=em.files, num_batches=batches,
                                   max_length=max_length)
    sort_by_activation(em.to(dev), list(itertools.islice(iter(data), batches)), device=dev)
    n = em.importance["calibration_batches"]
    return f"units sorted by activation importance on {n} batch{'es' if n != 1 else ''} of the data"


def _trainer(em: Any, train: Any, dev: Any, *, loss_fn: Any, output_fn: Any, lr: float, steps: int, schedule: str,
             warmup: float, resume: Any, dropout: bool, run: RunOptions, rank: int, order: str = "",
             **options: Any) -> tuple[Trainer, str]:
    """The job's :class:`Trainer` (the model on ``dev``, AdamW at ``lr`` and its learning-rate schedule,
    resumed from the state file ``resume`` when one is given) and its :func:`recipe_line`, logged and
    said (``run.status``, else ``print``) by process 0."""
    em.to(dev)
    options["strategy_options"] = _options(options["strategy"], options.get("strategy_options"))
    opt = torch.optim.AdamW(em.parameters(), lr=lr, weight_decay=run.weight_decay)
    tr = Trainer(em, train, optimizer=opt, loss_fn=loss_fn, device=dev, max_grad_norm=run.max_grad_norm,
                 distribution=run.distribution, parallel=run.parallel,
                 scheduler=make_scheduler(schedule, opt, lr=lr, steps=steps, warmup=warmup), **options,
                 **({} if output_fn is None else {"output_fn": output_fn}))
    if resume is not None:
        tr.load_state(str(resume))
    recipe = recipe_line(tr, lr=lr, schedule=schedule, warmup=warmup, dropout=dropout, order=order)
    _log.info(recipe)
    if rank == 0:
        (run.status or print)(recipe)
    return tr, recipe


def _options(strategy: str, given: Mapping[str, Any] | None) -> dict[str, Any]:
    """The strategy's options: ``given`` over ``DEFAULTS["strategy_options"]`` when ``strategy`` is the default one."""
    return {**(DEFAULTS["strategy_options"] if strategy == DEFAULTS["strategy"] else {}), **(given or {})}


def _always(em: ElasticModel, always: Sequence[str] | None) -> Sequence[str]:
    """The ``always`` presets of :func:`train_file`: as given, or (None) every preset of ``em``."""
    return list(em.presets) if always is None else always


def recipe_line(tr: Trainer, *, lr: float, schedule: str, warmup: float, dropout: bool, order: str = "") -> str:
    """The one line naming a :func:`train_file` job's recipe, e.g. ``recipe: subnetwork-to-go + distillation from
    the original (cosine), lr 0.0001 constant, dropout off, always: large, medium, small, tiny``, then ``order``
    (how the units were ordered, e.g. ``units sorted by activation importance on 8 batches of the data``) and
    under ``torchrun`` the processes and how they share the model (``, 2 processes (FSDP2, 9 sharded units)``)."""
    opts = tr.strategy.options()
    parts = [tr.strategy.name + (" (" + ", ".join(f"{k}={v}" for k, v in opts.items()) + ")" if opts else "")]
    if tr.teacher is not None:
        loss = tr.distill_loss if isinstance(tr.distill_loss, str) else getattr(tr.distill_loss, "__name__", "custom")
        parts.append(f"distillation from the original ({loss})")
    if tr.loss_fn is not None:
        parts.append("task loss")
    sched = f"one-cycle ({warmup:.0%} warm-up)" if schedule == "onecycle" else schedule
    always = ", ".join(label for label, _ in tr.always) or "none"
    procs = f", {tr.world} processes ({'FSDP2, ' + str(len(tr.units)) + ' sharded units' if tr.parallel == 'fsdp' else 'DDP'})" \
        if tr.world > 1 else ""
    return (f"recipe: {' + '.join(parts)}, lr {lr:g} {sched}, dropout {'on' if dropout else 'off'}, always: {always}"
            f"{', ' + order if order else ''}{procs}")


def train_file(path: str | os.PathLike, *, data: str | os.PathLike, steps: int, output: str | os.PathLike,
               strategy: str = DEFAULTS["strategy"], strategy_options: Mapping[str, Any] | None = None, batch_size: int = 32,
               lr: float = DEFAULTS["lr"], seed: int = 0, distill: bool | None = None, eval_fraction: float = 0.1,
               max_length: int = 128, state: str | os.PathLike | None = None, resume: str | os.PathLike | None = None,
               save_every: int = 0, calibration_batches: int = 8, overwrite: bool = False,
               progress: Any = False, device: str | None = None, always: Sequence[str] | None = DEFAULTS["always"],
               amp: bool | None = None, schedule: str = DEFAULTS["schedule"], warmup: float = 0.06,
               distill_loss: str | None = None, dropout: bool = DEFAULTS["dropout"], latency: bool = False, eval_every: int = 0,
               on_eval: Callable[[int, dict[str, dict[str, float]]], None] | None = None,
               model: Any = None, trust_remote_code: bool = False, run: RunOptions | None = None) -> dict[str, Any]:
    """Train an elasticize super-network file on an image folder or a text file, and save it (see the module).

    Args:
        path: the super-network file (from ``elasticize convert``).
        output: the trained super-network file (never ``path``).
        data: an image folder (one sub-folder per class), labelled text (``.jsonl`` / ``.csv``) or a text file.
        steps: optimizer updates.
        batch_size: samples per batch.
        lr: AdamW (peak) learning rate.
        seed: sampler and data-split seed.
        strategy: a registered strategy (see :func:`~elasticize.train.make_strategy`).
        strategy_options: the strategy's options (over ``DEFAULTS["strategy_options"]`` for the default strategy).
        schedule: a :data:`~elasticize.train.schedules.SCHEDULES` name.
        warmup: the one-cycle warm-up share of ``steps``, in (0, 1).
        distill: distil from the original (None: the module's default; text: always).
        distill_loss: one of :data:`TEXT_LOSSES` or :data:`IMAGE_LOSSES` for the data (None: the first).
        dropout: False sets every ``nn.Dropout`` to ``p = 0`` for this run (the saved file is the same).
        eval_fraction: share of the data held out for the measured presets.
        eval_every: also measure every preset every this many steps (0: only at the end).
        on_eval: ``on_eval(step, {preset: {metric: value}})`` receives each measurement (process 0 only).
        latency: also measure each preset's ``latency_s`` (median seconds per held-out batch) into the manifest.
        max_length: tokens per text sample.
        state: where to write the trainer state (a resume file).
        save_every: steps between ``state`` writes (0: at the end).
        resume: a state file to resume from (of this super-network; its ``schedule`` and, unless constant, ``steps``).
        calibration_batches: batches per preset for BN recalibration.
        overwrite: replace an existing ``output``.
        progress: passed to :meth:`Trainer.train_steps` (True: rich progress bar, after the :func:`recipe_line`).
        device: ``"cpu"``, ``"cuda"``... (default: CUDA when available).
        amp: bf16 autocast for the training passes (None: on for CUDA only).
        always: presets also trained at every step (see :class:`~elasticize.train.Trainer`); None: every preset.
        model: the base model, for a file whose recipe cannot or may not rebuild it (see :func:`elasticize.load`).
        trust_remote_code: allow the file's ``import`` recipe to run its builder (see :func:`elasticize.load`).
        run: weight decay, clipping, workers, distribution, DDP/FSDP, validation data, logging (:class:`RunOptions`).

    Returns:
        ``{"output", "steps", "metrics" (per preset), "rank", "world", "history" (losses, configs per step), "recipe"}``.

    Raises:
        FileNotFoundError: a missing model file, data path, resume file or output folder.
        FileExistsError: ``output`` exists and ``overwrite`` is False, or ``output`` or ``state`` is a folder.
        OSError: writing ``output`` or ``state`` failed, or their folder cannot be written in (PermissionError, before training).
        ValueError: ``output`` (or ``state``) is the input; bad ``steps``, ``eval_every``, ``schedule`` or ``warmup``;
            a ``distill_loss`` not of the data's kind (or, on logits, without distillation); ``distill=False`` for
            lines of text; empty data or bad labelled text (:func:`~elasticize.train.labelled.labelled_text_data`); a
            resume state of another run; text for a model without a tokenizer; a file :func:`elasticize.load` refuses.
        KeyError, TypeError: an ``always`` name that is not a preset or an unknown ``strategy``; a ``strategy_options``
            key the strategy does not take. Also the errors of :meth:`RunOptions.check` and of ``run.sort`` (see it).
    """
    src, out, d, run = Path(path), Path(output), Path(data), run or RunOptions()
    _check_job(src, out, d, steps=steps, eval_every=eval_every, schedule=schedule, warmup=warmup, state=state,
               overwrite=overwrite, run=run)
    text, labelled = d.is_file(), is_labelled(d)
    em, distill_loss = _load_checked(src, text=text, model=model, trust_remote_code=trust_remote_code,
                                     resume=resume, schedule=schedule, steps=steps, distill=distill,
                                     distill_loss=distill_loss, dropout=dropout, labelled=labelled)
    with process_group(device or ("cuda" if torch.cuda.is_available() else "cpu")) as (rank, world, dev):
        train, held, loss_fn, output_fn, metric, order = _task(
            d, em, text=text, distill_loss=distill_loss, batch_size=batch_size, eval_fraction=eval_fraction,
            max_length=max_length, seed=seed, shard=(rank, world), run=run, dev=dev)
        tr, recipe = _trainer(
            em, train, dev, loss_fn=loss_fn, output_fn=output_fn, lr=lr, steps=steps, schedule=schedule, warmup=warmup,
            strategy=strategy, strategy_options=strategy_options, seed=seed, distill_loss=distill_loss, order=order,
            distill=True if text and not labelled else "auto" if distill is None else distill, dropout=dropout,
            calibration_batches=calibration_batches, always=_always(em, always), amp=amp, resume=resume, run=run, rank=rank)
        history, metrics = _train_and_save(tr, held, metric, out, steps=steps, eval_every=eval_every, on_eval=on_eval,
                                           progress=progress, state=state, save_every=save_every, run=run,
                                           latency=latency, overwrite=overwrite)
    return {"output": str(out), "steps": tr.step, "metrics": metrics, "rank": rank, "world": world, "recipe": recipe,
            "history": [{"step": r["step"], "losses": r["losses"], "configs": r["configs"]} for r in history]}
