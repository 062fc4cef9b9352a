"""The calibrated tensors of an :class:`~elasticize.ElasticModel`: per-preset BatchNorm statistics (BN
recalibration) and compensated biases (bias compensation, :mod:`elasticize.calibration`), installed
into the live model when their preset is set and taken out for saving and training."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

import torch

from .batches import forward_batch, to_device
from .calibration import Compensation, consumer_means, preset_biases

__all__ = ["CalibratedTensors"]


class CalibratedTensors:
    """Mixin of :class:`~elasticize.ElasticModel`: its ``bn_stats`` and ``compensation``.

    Uses the model's ``model``, ``plan``, ``space``, ``presets``, ``resolve`` and ``_active``.
    """

    model: Any
    bn_stats: dict[str, dict[str, torch.Tensor]]
    compensation: Compensation
    _bn_live: str | None
    _bn_trained: dict[str, torch.Tensor]
    _active: Any

    # ------------------------------------------------------------ BN recalibration
    def set_bn_stats(self, stats: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Use per-preset calibrated BatchNorm statistics (BN recalibration; see :attr:`bn_stats`).

        Args:
            stats: preset name -> buffer name -> dense tensor ``(channels,)``, the leading
                channels of that buffer at the preset; an empty mapping goes back to the trained statistics.

        Raises:
            KeyError: an unknown preset or buffer name.
            ValueError: a tensor longer than its buffer or not 1-D.
        """
        self._install_bn(None)
        self.bn_stats = _checked_bn_stats(stats, self.presets, dict(self.model.named_buffers()))
        self._install_bn(self._calibrated_name(self._active))

    def set_compensation(self, means: Mapping[str, torch.Tensor]) -> None:
        """Use bias compensation with these consumer means (:attr:`compensation`; ``{}`` turns it off).

        Every preset's compensated biases are computed from them (:func:`elasticize.calibration.preset_biases`).
        """
        self._install_bn(None)
        self.compensation.means = {k: v.detach().float().cpu() for k, v in means.items()}
        self.compensation.presets = preset_biases(self.model, self.plan, self.space, self.presets, means)
        self._install_bn(self._calibrated_name(self._active))

    def calibrate_compensation(self, batches: Any, *, device: Any = None) -> None:
        """Take the bias compensation means afresh at the full network (trained BatchNorm statistics) on
        ``batches`` and recompute every preset's compensated biases: after conversion with data, and
        after training, whose weight changes make the stored means stale (FLAP, arXiv 2312.11983, Eq. 5).

        Args:
            batches: calibration batches (a tensor, a tuple or a mapping of inputs each).
            device: where to run them (default: the model's).

        Raises:
            ValueError: ``batches`` yields no batch.
        """
        dev = device if device is not None else next(self.model.parameters()).device
        with self.subnet(None), self.trained_bn_stats():  # type: ignore[attr-defined]
            means, _ = consumer_means(self.model, self.plan, [to_device(b, dev) for b in batches], forward_batch)
        self.set_compensation(means)

    @contextlib.contextmanager
    def trained_bn_stats(self) -> Iterator[Any]:
        """Context manager: the buffers hold the trained BatchNorm statistics inside (for saving, training)."""
        live = self._bn_live
        self._install_bn(None)
        try:
            yield self
        finally:
            self._install_bn(live)

    def _calibrated_name(self, cfg: Any) -> str | None:
        for name in [*self.bn_stats, *self.compensation.presets]:
            if self.resolve(name) == cfg:
                return name
        return None

    def _install_bn(self, name: str | None) -> None:
        if name == self._bn_live:
            return
        buffers = {**dict(self.model.named_parameters()), **dict(self.model.named_buffers())}
        with torch.no_grad():
            for fqn, t in self._bn_trained.items():
                buffers[fqn].copy_(t)
            self._bn_trained = {}
            if name is not None:
                for fqn, t in {**self.bn_stats.get(name, {}), **self.compensation.presets.get(name, {})}.items():
                    self._bn_trained[fqn] = buffers[fqn].clone()
                    buffers[fqn][: t.shape[0]].copy_(t)
        self._bn_live = name


def _checked_bn_stats(stats: Mapping[str, Mapping[str, torch.Tensor]], presets: Mapping[str, Any],
                      buffers: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Per-preset BatchNorm statistics checked against the presets and buffers, each copied to its buffer's
    device and dtype.

    Raises:
        KeyError: an unknown preset or buffer name.
        ValueError: a tensor longer than its buffer or not 1-D.
    """
    clean: dict[str, dict[str, torch.Tensor]] = {}
    for name, table in stats.items():
        if name not in presets:
            raise KeyError(f"BN statistics for unknown preset {name!r}; presets: {list(presets)}")
        clean[name] = {}
        for fqn, t in table.items():
            if fqn not in buffers:
                raise KeyError(f"BN statistics of preset {name!r} name {fqn!r}, which is not a buffer of the model")
            if t.dim() != 1 or t.shape[0] > buffers[fqn].shape[0]:
                raise ValueError(f"BN statistics {fqn!r} of preset {name!r} have shape {list(t.shape)}; expected "
                                 f"(n,) with n <= {buffers[fqn].shape[0]}")
            clean[name][fqn] = t.detach().to(buffers[fqn].device, buffers[fqn].dtype).clone()
    return clean
