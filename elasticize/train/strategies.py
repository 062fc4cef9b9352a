"""Training strategies: which sub-networks one optimizer step trains, and against what.

A strategy turns the sampler's draws into a list of :class:`Pass` es for one optimizer
update. Each pass is one forward and backward of one sub-network on one micro-batch; the
gradients of all passes accumulate, then the optimizer steps once. A pass's target is

* ``"task"``: the user's task loss on the batch's target; when the trainer distills from the
  frozen original model, the distillation loss to the original's output is added (the only
  loss when the batch has no target);
* ``"inplace"``: in-place distillation from the output of this step's largest sub-network,
  detached (Universally Slimmable Networks; Adaptive Depth's self-distillation).

Strategies, by name (:func:`make_strategy`):

``sortednet``
    SortedNet (arXiv 2309.00255, Eq. 1 and Section 1.2): each of ``accumulate`` micro-batches
    draws a sub-network ``θ*_t`` with ``b_j ~ P_{B_j}`` per dimension and the gradients of all
    of them are accumulated before one update. ``objective="stochastic-loss"`` trains
    ``L(y, f(x, θ*_t))``; ``"stochastic-summation"`` trains ``Σ_{θ ∈ Θ⊥(θ*_t)} L(y, f(x, θ))``,
    ``Θ⊥`` being ``θ*_t`` and its truncations along each dimension (see
    :meth:`SubnetSampler.nested_along_dims`; the paper leaves the set's exact extent open).
``subnetwork-to-go``
    Subnetwork-to-go (arXiv 2312.03464, Section 3.3): ``L = L(full) + L(random sub-network)`` per step.
``sandwich``
    The sandwich rule with in-place distillation (Universally Slimmable Networks, Yu & Huang,
    ICCV 2019, Section 3): the largest sub-network trained on the task, the smallest and ``n``
    random ones trained to match the largest's detached output (KL).
``skip-aware``
    Skip-aware self-distillation (Adaptive Depth Networks, arXiv 2312.16392, Section 3.2 and
    Algorithm 1): only the super-net and the base-net (the smallest sub-network) are trained,
    ``L = L_task(f_super(x), y) + KL(softmax(f_super(x)) ‖ softmax(f_base(x)))`` with the
    super-net's output detached; pair it with ``depth_mode="skippable"`` conversion, which gives
    the mandatory sub-paths switchable BatchNorm/LayerNorm. The paper's earlier version
    distils stage features; this is the output-level form of its final version.
``full``
    Only the largest sub-network: plain training, the baseline of the benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..space import Config
from .sampler import SubnetSampler

__all__ = ["Pass", "Strategy", "SortedNet", "SubnetworkToGo", "Sandwich", "SkipAware", "FullOnly", "STRATEGIES",
           "make_strategy"]


@dataclass(frozen=True)
class Pass:
    """One forward and backward of one sub-network inside an optimizer step.

    Attributes:
        config: the sub-network.
        label: short name for progress and logs (``"full"``, ``"min"``, ``"sampled"``...).
        target: ``"task"`` or ``"inplace"`` (see the module docstring).
        micro: index of the micro-batch it runs on (0 .. ``micro_batches - 1``).
        weight: factor on its loss before backward.
        keep: its detached output is the in-place distillation teacher of later passes on the same micro-batch.
    """

    config: Config
    label: str
    target: str = "task"
    micro: int = 0
    weight: float = 1.0
    keep: bool = False


class Strategy:
    """Base class: how many micro-batches one update consumes, and which passes it runs."""

    name: ClassVar[str] = ""
    micro_batches: int = 1

    def passes(self, sampler: SubnetSampler) -> list[Pass]:
        """The passes of one optimizer step, drawing from ``sampler``."""
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """The strategy's settings, JSON-native (stored with the trainer state)."""
        return {}


class SortedNet(Strategy):
    """SortedNet (arXiv 2309.00255): Eq. 1 sampling, gradient accumulation, stochastic loss or summation.

    Args:
        accumulate: micro-batches (each with its own sampled sub-network) per optimizer update (``gacc``).
        objective: ``"stochastic-loss"`` or ``"stochastic-summation"``.

    Raises:
        ValueError: ``accumulate < 1`` or an unknown objective.
    """

    name = "sortednet"

    def __init__(self, *, accumulate: int = 1, objective: str = "stochastic-loss") -> None:
        if accumulate < 1:
            raise ValueError(f"accumulate must be >= 1, got {accumulate}")
        if objective not in ("stochastic-loss", "stochastic-summation"):
            raise ValueError(f"objective must be 'stochastic-loss' or 'stochastic-summation', not {objective!r}")
        self.micro_batches = int(accumulate)
        self.objective = objective

    def passes(self, sampler: SubnetSampler) -> list[Pass]:
        out: list[Pass] = []
        w = 1.0 / self.micro_batches
        for i in range(self.micro_batches):
            if self.objective == "stochastic-loss":
                out.append(Pass(sampler.sample(), "sampled", micro=i, weight=w))
            else:
                for j, cfg in enumerate(sampler.nested_along_dims(sampler.sample_index())):
                    out.append(Pass(cfg, "sampled" if j == 0 else f"nested{j}", micro=i, weight=w))
        return out

    def options(self) -> dict[str, Any]:
        return {"accumulate": self.micro_batches, "objective": self.objective}


class SubnetworkToGo(Strategy):
    """Subnetwork-to-go (arXiv 2312.03464): the full network plus one random sub-network per step."""

    name = "subnetwork-to-go"

    def passes(self, sampler: SubnetSampler) -> list[Pass]:
        return [Pass(sampler.largest(), "full"), Pass(sampler.sample(), "random")]


class Sandwich(Strategy):
    """Sandwich rule + in-place distillation (Universally Slimmable Networks, Yu & Huang 2019).

    Args:
        n: random sub-networks between the largest and the smallest.

    Raises:
        ValueError: ``n < 0``.
    """

    name = "sandwich"

    def __init__(self, *, n: int = 2) -> None:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self.n = int(n)

    def passes(self, sampler: SubnetSampler) -> list[Pass]:
        out = [Pass(sampler.largest(), "max", keep=True), Pass(sampler.smallest(), "min", target="inplace")]
        out += [Pass(sampler.sample(), f"rand{i + 1}", target="inplace") for i in range(self.n)]
        return out

    def options(self) -> dict[str, Any]:
        return {"n": self.n}


class SkipAware(Strategy):
    """Skip-aware self-distillation (Adaptive Depth Networks, arXiv 2312.16392): super-net and base-net only.

    Args:
        self_distill: False trains the base-net on the task loss instead of the KL term (the ablation).
    """

    name = "skip-aware"

    def __init__(self, *, self_distill: bool = True) -> None:
        self.self_distill = bool(self_distill)

    def passes(self, sampler: SubnetSampler) -> list[Pass]:
        return [Pass(sampler.largest(), "super", keep=True),
                Pass(sampler.smallest(), "base", target="inplace" if self.self_distill else "task")]

    def options(self) -> dict[str, Any]:
        return {"self_distill": self.self_distill}


class FullOnly(Strategy):
    """Only the largest sub-network (plain training)."""

    name = "full"

    def passes(self, sampler: SubnetSampler) -> list[Pass]:
        return [Pass(sampler.largest(), "full")]


#: Strategy classes by name.
STRATEGIES: dict[str, type[Strategy]] = {c.name: c for c in (SortedNet, SubnetworkToGo, Sandwich, SkipAware, FullOnly)}


def make_strategy(name: str | Strategy, **options: Any) -> Strategy:
    """A strategy by name with its options (``make_strategy("sortednet", accumulate=4)``).

    Raises:
        KeyError: unknown name (the message lists the known ones).
        TypeError: an option the strategy does not take.
    """
    if isinstance(name, Strategy):
        if options:
            raise TypeError("options are for a strategy given by name")
        return name
    if name not in STRATEGIES:
        raise KeyError(f"no strategy {name!r}; strategies: {sorted(STRATEGIES)}")
    try:
        return STRATEGIES[name](**options)
    except TypeError as e:
        raise TypeError(f"strategy {name!r}: {e}") from None
