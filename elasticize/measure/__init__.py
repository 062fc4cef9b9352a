"""Measured choice: calibrate and measure sub-networks without training, and solve for budgets.

- :mod:`.data`: ``--data`` as calibration and held-out batches (:func:`eval_data`).
- :mod:`.evaluate`: BN recalibration, bias compensation, metric, latency, params, MACs and peak memory
  of every preset, candidate and solver pick (:func:`evaluate`, ``elasticize eval``).
- :mod:`.solver`: per-group sensitivities and a mixed-integer program per budget (:func:`solve`).
- :mod:`.report`: the table, CSV, JSON and Pareto plot of a record.
"""

from .data import EvalData, eval_data
from .evaluate import calibrate, evaluate
from .solver import sensitivities, solve

__all__ = ["EvalData", "eval_data", "calibrate", "evaluate", "sensitivities", "solve"]
