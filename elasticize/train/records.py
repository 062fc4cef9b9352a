"""Training records of ``elasticize train``: plain progress lines, a CSV log and TensorBoard scalars.

:class:`TrainLog` receives every step's record (:meth:`~elasticize.train.Trainer.train_steps`'s
``on_step``) and every measurement of the presets. With ``log_dir`` it writes
``log_dir/metrics.csv`` (columns ``step, kind, name, key, value``: ``kind`` is ``train`` for a
pass's loss, named by its pass label, or ``eval`` for a preset's measured metric) and
TensorBoard scalars (``torch.utils.tensorboard.SummaryWriter``; tags ``loss/<pass label>`` and
``<metric>/<preset>``, one per sub-network). With ``print_every`` it prints one plain line
every that many steps (for output that is not a terminal, where a progress bar shows nothing
until it ends). Only process 0 logs.
"""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

__all__ = ["TrainLog", "CSV_NAME"]

#: The CSV file :class:`TrainLog` writes in its ``log_dir``.
CSV_NAME = "metrics.csv"


class TrainLog:
    """Progress lines, CSV rows and TensorBoard scalars of a training run (see the module).

    Args:
        log_dir: a folder for ``metrics.csv`` and the TensorBoard event files (made if missing),
            or None for no files.
        print_every: print a one-line record every this many steps (0: none).
        total: the run's last step, shown as ``step N/total``.
        echo: where lines go (default ``print``).
        rank: this process's rank; only rank 0 writes or prints.

    Raises:
        FileExistsError: ``log_dir`` is a file.
        ValueError: ``print_every < 0``.
    """

    def __init__(self, log_dir: str | os.PathLike | None = None, *, print_every: int = 0, total: int = 0,
                 echo: Callable[[str], None] = print, rank: int = 0) -> None:
        if print_every < 0:
            raise ValueError(f"--log-every must be >= 0 (0: no plain records), got {print_every}")
        if log_dir is not None and Path(log_dir).exists() and not Path(log_dir).is_dir():
            raise FileExistsError(f"--log-dir {log_dir} is a file; give a folder for metrics.csv and TensorBoard")
        self.log_dir = None if log_dir is None else Path(log_dir)
        self.print_every, self.total, self.echo, self.rank = print_every, total, echo, rank
        self._csv: Any = None
        self._writer: Any = None
        self._tb: Any = None
        self._t0 = time.perf_counter()
        self._samples = 0

    def _open(self) -> None:
        if self.rank != 0 or self.log_dir is None or self._csv is not None:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir.mkdir(parents=True, exist_ok=True)
        path = self.log_dir / CSV_NAME
        new = not path.exists()
        self._csv = open(path, "a", newline="", encoding="utf-8")  # noqa: SIM115 (closed by close())
        self._writer = csv.writer(self._csv)
        if new:
            self._writer.writerow(["step", "kind", "name", "key", "value"])
        self._tb = SummaryWriter(str(self.log_dir))

    def _row(self, step: int, kind: str, name: str, key: str, value: float, tag: str) -> None:
        self._writer.writerow([step, kind, name, key, repr(float(value))])
        self._tb.add_scalar(tag, float(value), step)

    def step(self, rec: Mapping[str, Any]) -> None:
        """Log one step's record (``step``, ``losses`` per pass label, ``samples``)."""
        if self.rank != 0:
            return
        self._open()
        self._samples += int(rec.get("samples", 0))
        if self._csv is not None:
            for label, loss in rec["losses"].items():
                self._row(rec["step"], "train", label, "loss", loss, f"loss/{label}")
        if self.print_every and rec["step"] % self.print_every == 0:
            rate = self._samples / max(time.perf_counter() - self._t0, 1e-9)
            losses = " ".join(f"{k}={v:.4f}" for k, v in rec["losses"].items())
            total = f"/{self.total}" if self.total else ""
            self.echo(f"step {rec['step']}{total} {losses} samples/s={rate:.1f}")

    def measured(self, step: int, metrics: Mapping[str, Mapping[str, float]]) -> None:
        """Log each preset's measured metrics (``{preset: {metric: value}}``) at ``step``."""
        if self.rank != 0:
            return
        self._open()
        if self._csv is not None:
            for preset, m in metrics.items():
                for key, value in m.items():
                    self._row(step, "eval", preset, key, value, f"{key}/{preset}")

    def close(self) -> None:
        """Flush and close the CSV and TensorBoard files."""
        if self._csv is not None:
            self._csv.close()
            self._tb.close()
            self._csv = self._tb = None
