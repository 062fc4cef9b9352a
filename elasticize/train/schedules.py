"""Learning-rate schedules by name, for :func:`~elasticize.train.run.train_file` (``elasticize train --schedule``).

``"constant"`` (the default)
    ``lr`` throughout.
``"cosine"``
    From ``lr`` to 0 along a cosine over ``steps``
    (:class:`torch.optim.lr_scheduler.CosineAnnealingLR`, the digits benchmarks' schedule).
``"onecycle"``
    Rises from ``lr / 25`` over the first ``warmup`` share of ``steps``, then falls along a
    cosine to ``lr / 2.5e5`` (:class:`torch.optim.lr_scheduler.OneCycleLR`, which also cycles
    AdamW's beta1 between 0.95 and 0.85; the MiniLM benchmark's schedule).

``benchmarks/bench_train_schedule.py`` compares them. A resumed run must give the interrupted
run's schedule and, unless constant, its ``steps`` (:func:`saved_schedule` reads them back).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["SCHEDULES", "make_scheduler", "saved_schedule"]

#: The schedules' names, the first the default.
SCHEDULES = ("constant", "cosine", "onecycle")


def make_scheduler(schedule: str, opt: torch.optim.Optimizer, *, lr: float, steps: int, warmup: float) -> Any:
    """The ``torch.optim.lr_scheduler`` of a :data:`SCHEDULES` name over ``steps`` (None for constant)."""
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    if schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=warmup,
                                                   anneal_strategy="cos")
    return None


def saved_schedule(state: dict[str, Any] | None) -> tuple[str, int | None]:
    """(schedule name, steps it was laid out over) of a trainer state's saved scheduler state (None: constant)."""
    if state is None:
        return "constant", None
    if "total_steps" in state:
        return "onecycle", state["total_steps"]
    return "cosine", state.get("T_max")
