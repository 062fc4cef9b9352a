"""``train_file``: the whole ``elasticize train`` job as one API call (the CLI only parses options)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist

from .._files import check_output
from .data import image_folder_data, text_file_data
from .losses import masked_hidden, mean_pooled
from .state import check_state_info, read_state_info
from .trainer import Trainer

__all__ = ["train_file", "SCHEDULES", "TEXT_LOSSES", "IMAGE_LOSSES"]

#: Learning-rate schedules of :func:`train_file` (``elasticize train --schedule``).
SCHEDULES = ("constant", "cosine", "onecycle")
#: Distillation losses of :func:`train_file` for text, with the model output each one compares
#: (``elasticize train --distill-loss``; the first is the default).
TEXT_LOSSES = {"cosine": mean_pooled, "hidden": masked_hidden}
#: Distillation losses of :func:`train_file` for images (on the logits; the first is the default).
IMAGE_LOSSES = ("kl", "mse")


def _scheduler(schedule: str, opt: torch.optim.Optimizer, *, lr: float, steps: int, warmup: float) -> Any:
    """The ``torch.optim.lr_scheduler`` of a :data:`SCHEDULES` name (None for constant)."""
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    if schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=warmup,
                                                   anneal_strategy="cos")
    return None


def _saved_schedule(state: dict[str, Any] | None) -> tuple[str, int | None]:
    """(schedule name, steps it was laid out over) of a trainer state's saved scheduler state."""
    if state is None:
        return "constant", None
    if "total_steps" in state:
        return "onecycle", state["total_steps"]
    return "cosine", state.get("T_max")


def _same(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


@contextlib.contextmanager
def _process_group(device: str) -> Iterator[tuple[int, int, str]]:
    """``(rank, world size, device)`` of this process; joins the ``torchrun`` job it was started in.

    When ``WORLD_SIZE > 1`` (set by ``torchrun``) and no process group exists yet, one is created
    (NCCL for CUDA, gloo otherwise; a bare ``"cuda"`` becomes ``cuda:LOCAL_RANK``) and destroyed on
    exit. An existing process group (the caller's) is used as it is.
    """
    if dist.is_available() and dist.is_initialized():
        yield dist.get_rank(), dist.get_world_size(), device
        return
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield 0, 1, device
        return
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if dev.index is None else dev
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    try:
        yield dist.get_rank(), dist.get_world_size(), str(dev)
    finally:
        dist.destroy_process_group()


def _choice(loss: str | None, choices: tuple[str, ...], kind: str) -> str:
    """``loss`` checked against the distillation losses for ``kind`` of data (None: the first)."""
    if loss is None:
        return choices[0]
    if loss not in choices:
        raise ValueError(f"--distill-loss {loss!r} does not apply to {kind}; choose one of {', '.join(choices)}")
    return loss


def train_file(path: str | os.PathLike, *, data: str | os.PathLike, steps: int, output: str | os.PathLike,
               strategy: str = "sortednet", strategy_options: Mapping[str, Any] | None = None, batch_size: int = 32,
               lr: float = 1e-4, seed: int = 0, distill: bool | None = None, eval_fraction: float = 0.1,
               max_length: int = 128, state: str | os.PathLike | None = None, resume: str | os.PathLike | None = None,
               save_every: int = 0, calibration_batches: int = 8, overwrite: bool = False,
               progress: Any = False, device: str | None = None, always: Sequence[str] = (),
               amp: bool | None = None, schedule: str = "constant", warmup: float = 0.06,
               distill_loss: str | None = None, dropout: bool = True, latency: bool = False, eval_every: int = 0,
               on_eval: Callable[[int, dict[str, dict[str, float]]], None] | None = None,
               model: Any = None, trust_remote_code: bool = False) -> dict[str, Any]:
    """Train an elasticize super-network file on an image folder or a text file, and save it.

    A folder ``data`` is image classification (cross-entropy; the model's output is the logits);
    a file is text, one sample per line, distilled from the original model: the student's
    mean-pooled sentence embedding is trained towards the original's (cosine; see
    ``distill_loss``). Distillation from the original is the default for a model converted from
    pretrained weights, and always on for text. After training: BN recalibration per preset, each
    preset measured on the held-out part (``accuracy``, or ``cosine`` to the original's embedding)
    and written into the manifest, then the file is saved atomically. Every check happens before
    training, and no file is written when one fails.

    Args:
        path: the super-network file (from ``elasticize convert``).
        data: an image folder (one sub-folder per class) or a text file.
        steps: optimizer updates.
        output: the trained super-network file (never ``path``).
        strategy: see :func:`~elasticize.train.make_strategy`.
        strategy_options: see :func:`~elasticize.train.make_strategy`.
        batch_size: batch size.
        lr: AdamW (peak) learning rate.
        seed: sampler/data-split seed.
        schedule: ``"constant"`` (the default: ``lr`` throughout), ``"cosine"`` (from ``lr`` to 0
            along a cosine over ``steps``; :class:`torch.optim.lr_scheduler.CosineAnnealingLR`, the
            digits benchmarks' schedule) or ``"onecycle"`` (rises from ``lr / 25`` over the first
            ``warmup`` share of ``steps``, then falls along a cosine to ``lr / 2.5e5``;
            :class:`torch.optim.lr_scheduler.OneCycleLR`, which also cycles AdamW's beta1 between
            0.95 and 0.85; the MiniLM benchmark's schedule). ``benchmarks/bench_train_schedule.py``
            compares them. A resumed run must give the interrupted run's ``schedule`` and, unless
            constant, its ``steps``.
        warmup: the one-cycle warm-up share of ``steps``, in (0, 1).
        distill: None for the default above.
        distill_loss: the distillation loss (None: the first of its kind). Text: ``"cosine"``
            (``1 - cos`` of the mean-pooled sentence embeddings) or ``"hidden"`` (that plus the
            relative MSE of every token's final hidden state, :func:`~elasticize.train.hidden_distillation`);
            images: ``"kl"`` (Hinton et al., 2015) or ``"mse"`` on the logits. In the benchmarks'
            MiniLM comparison ``hidden`` without dropout keeps the large sub-networks closer to the
            original and ``cosine`` with dropout the small ones (and is 15% cheaper per step).
        dropout: keep the model's dropout during training (False: every ``nn.Dropout`` gets
            ``p = 0`` for this run; the saved file is the same either way, dropout has no weights).
        eval_fraction: share of the data held out for the measured presets.
        eval_every: also measure every preset on the held-out part every this many steps (0:
            only at the end); ``on_eval(step, {preset: {metric: value}})`` receives each
            measurement (process 0 only).
        latency: also measure each preset's ``latency_s`` (median seconds of one forward on a
            held-out batch, on ``device``) into the manifest, for ``select(max_latency_s=...)``.
        max_length: tokens per text sample.
        state: where to write the trainer state (resume file) every ``save_every`` steps and at the end.
        resume: a state file to resume from (must come from this super-network).
        calibration_batches: batches per preset for BN recalibration.
        overwrite: replace an existing ``output``.
        progress: passed to :meth:`Trainer.train_steps` (True: rich progress bar).
        device: ``"cpu"``, ``"cuda"``... (default: CUDA when available).
        always: preset names trained at every step on top of the strategy's draws (see
            :class:`~elasticize.train.Trainer`).
        amp: bf16 autocast for the training passes (None: on for CUDA only; see :class:`~elasticize.train.Trainer`).
        model: the base model, for a file whose recipe cannot or may not rebuild it (see
            :func:`elasticize.load`).
        trust_remote_code: allow the file's ``import`` recipe to run its builder (see :func:`elasticize.load`).

    Under ``torchrun --nproc_per_node N`` (or in a process group the caller created) the job is
    data-parallel: each process trains on its share of the data with
    :class:`~torch.nn.parallel.DistributedDataParallel` (see :class:`~elasticize.train.Trainer`),
    and process 0 writes ``output`` and ``state``.

    Returns:
        ``{"output", "steps", "metrics" (per preset), "rank", "world" (this process and how many
        train), "history" (losses per step)}``.

    Raises:
        FileNotFoundError: a missing model file, data path, resume file or output folder.
        FileExistsError: ``output`` exists and ``overwrite`` is False, or ``output`` or ``state`` is a folder.
        PermissionError: the folder of ``output`` or ``state`` cannot be written in (checked before training).
        OSError: writing ``output`` or ``state`` failed.
        ValueError: ``output`` is the input, ``steps < 1``, ``eval_every < 0``, an unknown
            ``schedule`` or a ``warmup`` outside (0, 1), a ``distill_loss`` that is not one of the
            data's kind or (images) given for a run that does not distill, empty data, a resume
            state from another super-network or with another schedule or (a decaying schedule)
            another ``steps``, or text data for a model without a tokenizer.
        KeyError: an ``always`` name that is not one of the file's presets.
    """
    from ..checkpoint import load, read_manifest

    src, out = Path(path), Path(output)
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    if eval_every < 0:
        raise ValueError(f"--eval-every must be >= 0 (0: measure only at the end), got {eval_every}")
    if schedule not in SCHEDULES:
        raise ValueError(f"--schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if not 0 < warmup < 1:
        raise ValueError(f"--warmup {warmup}: the warm-up share of --steps must be in (0, 1), e.g. 0.06")
    read_manifest(src, presets=False)
    if _same(out, src) or (out.resolve() == src.resolve()):
        raise ValueError("-o points at the input file; choose another output path")
    if out.exists() and out.is_file() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --force to replace it or choose another -o")
    check_output(out, overwrite=overwrite, inputs=(src,))  # kind, folder and permissions: before any training
    if state is not None and Path(state).resolve() in (src.resolve(), out.resolve()):
        raise ValueError(f"--state {state} is the model or output file; give the trainer state its own path")
    if state is not None:
        check_output(state, overwrite=True, inputs=(src,))
    d = Path(data)
    if not d.exists():
        raise FileNotFoundError(f"--data {d}: no such file or folder (an image folder, or a text file with one "
                                "sample per line)")
    em = load(src, model=model, trust_remote_code=trust_remote_code)
    if resume is not None:
        if not Path(resume).is_file():
            raise FileNotFoundError(f"--resume {resume}: no such trainer state file")
        meta = read_state_info(resume)
        check_state_info(f"--resume {resume}", meta, em)
        was, was_steps = _saved_schedule(meta.get("scheduler"))
        if was != schedule:
            raise ValueError(f"--resume {resume} was saved with --schedule {was}; resume with the same --schedule")
        if was_steps is not None and was_steps != steps:
            raise ValueError(f"--resume {resume} comes from a {was} run of --steps {was_steps}; resume with the same "
                             "--steps (the schedule is laid out over them)")
    text = d.is_file()
    asked = distill_loss
    distill_loss = _choice(distill_loss, tuple(TEXT_LOSSES), "text") if text else \
        _choice(distill_loss, IMAGE_LOSSES, "an image folder")
    if not text and asked is not None and not (distill or (distill is None and em.recipe.get("pretrained"))):
        raise ValueError(f"--distill-loss {asked} applies when distilling from the original model, and this run does "
                         "not (" + ("--no-distill" if distill is False else "the model was not converted from "
                                    "pretrained weights") + "): add --distill or drop --distill-loss")
    if text and distill is False:
        raise ValueError("text training distills from the original model (there are no labels); drop --no-distill")
    if not dropout:
        for m in em.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    with _process_group(device or ("cuda" if torch.cuda.is_available() else "cpu")) as (rank, world, dev):
        if text:
            train, held = text_file_data(d, em, batch_size=batch_size, eval_fraction=eval_fraction,
                                         max_length=max_length, seed=seed, shard=(rank, world))
            distill, loss_fn, output_fn, metric = True, None, TEXT_LOSSES[distill_loss], "cosine"
        else:
            train, held = image_folder_data(d, em, batch_size=batch_size, eval_fraction=eval_fraction, seed=seed,
                                            shard=(rank, world))
            loss_fn, output_fn, metric = torch.nn.CrossEntropyLoss(), None, "accuracy"
        em.to(dev)
        opt = torch.optim.AdamW(em.parameters(), lr=lr)
        sched = _scheduler(schedule, opt, lr=lr, steps=steps, warmup=warmup)
        kw: dict[str, Any] = {} if output_fn is None else {"output_fn": output_fn}
        tr = Trainer(em, train, optimizer=opt, loss_fn=loss_fn, strategy=strategy, strategy_options=strategy_options,
                     seed=seed, distill="auto" if distill is None else distill, distill_loss=distill_loss, device=dev,
                     calibration_batches=calibration_batches, always=always, amp=amp, scheduler=sched, **kw)
        if resume is not None:
            tr.load_state(str(resume))
        history: list[dict[str, Any]] = []
        while tr.step < steps:
            n = steps - tr.step if not eval_every else min(eval_every - tr.step % eval_every, steps - tr.step)
            history += tr.train_steps(n, progress=progress, state_path=None if state is None else str(state),
                                      save_every=save_every)
            if eval_every and held and tr.step < steps:
                measured = tr.evaluate(held, metric=metric)
                if on_eval is not None and rank == 0:
                    on_eval(tr.step, measured)
        metrics = tr.evaluate(held, metric=metric, latency=latency) if held else {}
        tr.save(str(out), overwrite=overwrite)
    return {"output": str(out), "steps": tr.step, "metrics": metrics, "rank": rank, "world": world,
            "history": [{"step": r["step"], "losses": r["losses"]} for r in history]}
