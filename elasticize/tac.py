"""Subnetwork-to-go's dynamic width: parallel linear modules combined by TAC reweighting.

Subnetwork-to-go (Luo et al., arXiv 2312.03464, Section 2) makes the *width* of a layer the
number ``w`` of parallel FC modules that run, out of ``W``. The modules' outputs are combined
with input- and configuration-dependent reweighting scalars from a TAC
(transform-average-concatenate) module, so any ``w <= W`` can run at inference and the first
``w`` modules form the sub-network (nested, as in SortedNet).

:class:`TACLinear` is that block; :func:`linear_to_tac` turns chosen ``nn.Linear`` layers of a
trained model into it, function-preserving for every ``w``; :class:`ResidualRNN` is the
paper's residual RNN layer (norm, bidirectional LSTM, ``W`` parallel FC modules with TAC,
residual add), whose stacks elasticize finds as stages of prefix depth.

The project's summaries of the paper give the structure (transform, mean over the active
modules, concatenate, shared FC to one scalar per module and frame) but not every detail, and
the arXiv text could not be consulted offline; what this module decides, taking the TAC
layout of Luo et al. 2020 (arXiv 1910.14104) where it needed one:

* transform: a shared ``Linear(out_features -> tac_features)`` with PReLU on each module's
  output; average: the mean over the ``w`` *active* modules only (so the scalars depend on
  the configuration); concatenate: each module's transformed output with the mean, then a
  shared ``Linear(2 * tac_features -> 1)``: one scalar per module per position (frame).
* the scalars are normalised with a softmax over the ``w`` active modules, so the block
  output is a weighted *average* of the module outputs. This choice makes the conversion
  from a ``Linear`` exact for every ``w`` (every module starts as a copy of the layer, and
  any average of equal outputs is that output), and keeps the output's scale independent of
  ``w``.
* ``reweight="mean"`` replaces the scalars by ``1 / w`` (the paper's "without TAC" ablation).
"""

from __future__ import annotations

import fnmatch
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TACLinear", "ResidualRNN", "linear_to_tac"]


class TACLinear(nn.Module):
    """``W`` parallel linear modules, combined by TAC reweighting (Subnetwork-to-go, Section 2.2).

    For input ``x`` and the first ``w`` modules ``y_i = x W_i^T + b_i``:
    ``z_i = PReLU(T y_i)``, ``m = mean_{i<=w} z_i``, ``s_i = C [z_i, m]``,
    ``a = softmax(s_1..s_w)``, output ``sum_i a_i y_i``.

    Args:
        in_features: input features ``I``.
        out_features: output features ``O``.
        num_modules: number of parallel modules ``W`` (the full width).
        tac_features: hidden size of the TAC transform (default ``max(1, O // 4)``).
        bias: whether the modules have biases.
        reweight: ``"tac"`` (reweighting scalars from TAC) or ``"mean"`` (plain average).

    Shapes:
        input ``(..., I)``, output ``(..., O)``; ``weight`` is ``(W, O, I)``, ``bias`` ``(W, O)``.
        The active width is ``weight.shape[0]`` (elasticize slices it).

    Raises:
        ValueError: ``num_modules < 1`` or an unknown ``reweight``.
    """

    def __init__(self, in_features: int, out_features: int, num_modules: int, *, tac_features: int | None = None,
                 bias: bool = True, reweight: str = "tac", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if num_modules < 1:
            raise ValueError(f"num_modules must be >= 1, got {num_modules}")
        if reweight not in ("tac", "mean"):
            raise ValueError(f"reweight must be 'tac' or 'mean', not {reweight!r}")
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.num_modules = in_features, out_features, num_modules
        self.reweight = reweight
        self.weight = nn.Parameter(torch.empty(num_modules, out_features, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(num_modules, out_features, **kw)) if bias else None
        tac = tac_features or max(1, out_features // 4)
        self.transform = nn.Linear(out_features, tac, **kw)
        self.act = nn.PReLU(**kw)
        self.score = nn.Linear(2 * tac, 1, **kw)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each module initialised like an ``nn.Linear`` of its own (independent draws)."""
        bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(cls, linear: nn.Linear, num_modules: int, *, tac_features: int | None = None,
                    reweight: str = "tac") -> "TACLinear":
        """A block whose every module is a copy of ``linear``: it computes ``linear(x)`` for every width.

        Raises:
            TypeError: if ``linear`` is not an ``nn.Linear``.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear takes an nn.Linear, not {type(linear).__name__}")
        w = linear.weight
        block = cls(linear.in_features, linear.out_features, num_modules, tac_features=tac_features,
                    bias=linear.bias is not None, reweight=reweight, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            block.weight.copy_(w.detach().expand(num_modules, -1, -1))
            if linear.bias is not None:
                block.bias.copy_(linear.bias.detach().expand(num_modules, -1))
        block.train(linear.training)
        return block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        n, out = w.shape[0], w.shape[1]
        b = self.bias.flatten() if self.bias is not None else None
        y = F.linear(x, w.flatten(0, 1), b).unflatten(-1, (n, out))  # (..., w, O)
        if self.reweight == "mean":
            return y.mean(-2)
        z = self.act(self.transform(y))  # (..., w, tac)
        m = z.mean(-2, keepdim=True).expand_as(z)
        a = self.score(torch.cat([z, m], -1)).squeeze(-1).softmax(-1)  # (..., w)
        return (a.unsqueeze(-2) @ y).squeeze(-2)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"num_modules={self.num_modules}, reweight={self.reweight!r}")


def linear_to_tac(model: nn.Module, targets: str | Sequence[str], *, num_modules: int,
                  tac_features: int | None = None, reweight: str = "tac") -> list[str]:
    """Replace chosen ``nn.Linear`` layers of ``model`` by :class:`TACLinear` blocks, in place.

    Every module of a new block is a copy of the layer it replaces, so the model computes
    what it did for every width ``w <= num_modules`` (fp32, up to rounding of the average).
    Run it before :func:`elasticize.elasticize`; the blocks' ``num_modules`` becomes the
    ``"modules"`` dimension of the search space. A checkpoint's base model must contain the
    blocks too (build them in the builder function that the recipe names).

    Args:
        model: the model to change.
        targets: module paths or ``fnmatch`` patterns (``"layers.*.proj"``).
        num_modules: parallel modules per block (``W``).
        tac_features: TAC hidden size (default ``out_features // 4``).
        reweight: ``"tac"`` or ``"mean"``.

    Returns:
        The paths replaced, in model order.

    Raises:
        ValueError: if no ``nn.Linear`` matches (the message lists the linear layers).
        TypeError: if a pattern names a module that is not an ``nn.Linear``.
    """
    pats = [targets] if isinstance(targets, str) else list(targets)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen: list[str] = []
    for name, m in list(model.named_modules()):
        if not name or not any(fnmatch.fnmatchcase(name, p) for p in pats):
            continue
        if type(m) is not nn.Linear:
            raise TypeError(f"{name!r} is a {type(m).__name__}, not an nn.Linear; only nn.Linear layers convert")
        chosen.append(name)
    if not chosen:
        raise ValueError(f"no nn.Linear matches {pats}; the linear layers are {linears[:20]}")
    for name in chosen:
        parent, _, attr = name.rpartition(".")
        host = model.get_submodule(parent)
        setattr(host, attr, TACLinear.from_linear(getattr(host, attr), num_modules, tac_features=tac_features,
                                                  reweight=reweight))
    return chosen


class ResidualRNN(nn.Module):
    """Subnetwork-to-go's dynamic-width residual RNN layer: ``x + TAC-FC(BLSTM(norm(x)))``.

    Norm (LayerNorm over features), a bidirectional LSTM of ``hidden`` units, and a
    :class:`TACLinear` of ``num_modules`` parallel FC modules mapping ``2 * hidden`` back to
    ``features``, added to the input. A stack of these is a stage of prefix depth for
    elasticize (Subnetwork-to-go's dynamic depth, ``d <= D``).

    Args:
        features: feature size ``N`` (last axis).
        hidden: LSTM hidden size per direction.
        num_modules: parallel FC modules ``W``.
        seq_dim: the axis the LSTM runs along: ``-2`` (e.g. time in ``(batch, time, N)``
            or ``(batch, bands, time, N)``) or ``-3`` (bands in ``(batch, bands, time, N)``).
        reweight: ``"tac"`` or ``"mean"`` (see :class:`TACLinear`).
        tac_features: TAC hidden size.

    Shapes:
        input and output ``(..., seq, N)`` (``seq_dim=-2``) or ``(batch, seq, other, N)``.

    Raises:
        ValueError: ``seq_dim`` not -2 or -3.
    """

    def __init__(self, features: int, hidden: int, num_modules: int, *, seq_dim: int = -2, reweight: str = "tac",
                 tac_features: int | None = None) -> None:
        super().__init__()
        if seq_dim not in (-2, -3):
            raise ValueError(f"seq_dim must be -2 or -3, got {seq_dim}")
        self.seq_dim = seq_dim
        self.norm = nn.LayerNorm(features)
        self.rnn = nn.LSTM(features, hidden, batch_first=True, bidirectional=True)
        self.fc = TACLinear(2 * hidden, features, num_modules, tac_features=tac_features, reweight=reweight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        if self.seq_dim != -2:
            h = h.transpose(self.seq_dim, -2)
        shape = h.shape
        y = self.rnn(h.reshape(-1, shape[-2], shape[-1]))[0]
        y = self.fc(y).view(shape)
        if self.seq_dim != -2:
            y = y.transpose(self.seq_dim, -2)
        return x + y
