"""Training strategies: which sub-networks one optimizer step trains, and against what.

A strategy turns the sampler's draws into a list of :class:`Pass` es for one optimizer
update. Each pass is one forward and backward of one sub-network on one micro-batch; the
gradients of all passes accumulate, then the optimizer steps once. A pass's target is

* ``"task"``: the user's task loss on the batch's target; when the trainer distills from the
  frozen original model, the distillation loss to the original's output is added (the only
  loss when the batch has no target);
* ``"inplace"``: in-place distillation from the output of this step's largest sub-network,
  detached (Universally Slimmable Networks; Adaptive Depth's self-distillation).

Strategies are registered by name with :func:`register_strategy` (a duplicate name raises);
:func:`make_strategy` and ``elasticize train --strategy`` (with each strategy's
:attr:`Strategy.cli_options`) are built from that registry, :data:`STRATEGIES`. Adding one is
one decorated class::

    @register_strategy("largest-and-smallest")
    class LargestAndSmallest(Strategy):
        def passes(self, sampler):
            return [Pass(sampler.largest(), "max"), Pass(sampler.smallest(), "min")]

The built-in strategies:

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

import inspect

import re
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, TypeVar

from ..space import Config
from .sampler import SubnetSampler

__all__ = ["Pass", "Strategy", "StrategyOption", "SortedNet", "SubnetworkToGo", "Sandwich", "SkipAware", "FullOnly",
           "STRATEGIES", "register_strategy", "make_strategy", "strategy_cli_options"]


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


@dataclass(frozen=True)
class StrategyOption:
    """A setting of a strategy that ``elasticize train`` offers as a command-line option.

    The option is left out (the strategy's default applies) unless given; given with another
    strategy, that strategy refuses it (see :func:`make_strategy`).

    Attributes:
        flag: the option, e.g. ``"--accumulate"``. Strategies that declare the same flag share
            the option, so they must give it the same ``key``, ``type`` and ``choices``.
        key: the keyword argument of the strategy's constructor it sets.
        help: one line for ``elasticize train --help``, after the strategy's name.
        type: the value's type: ``int``, ``float`` or ``str``.
        choices: the values a ``str`` option allows (empty: any).
    """

    flag: str
    key: str
    help: str
    type: type = int
    choices: tuple[str, ...] = ()


class Strategy:
    """Base class: how many micro-batches one update consumes, and which passes it runs.

    Attributes:
        name: the name it is registered under (set by :func:`register_strategy`).
        micro_batches: batches one optimizer update consumes.
        cli_options: the constructor's settings that ``elasticize train`` offers as options.
    """

    name: ClassVar[str] = ""
    micro_batches: int = 1
    cli_options: ClassVar[tuple[StrategyOption, ...]] = ()

    def passes(self, sampler: SubnetSampler) -> list[Pass]:
        """The passes of one optimizer step, drawing from ``sampler``."""
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """The strategy's settings, JSON-native (stored with the trainer state)."""
        return {}


#: Registered strategy classes by name, in registration order (see :func:`register_strategy`).
STRATEGIES: dict[str, type[Strategy]] = {}

_S = TypeVar("_S", bound=type[Strategy])
_FLAG = re.compile(r"--[a-z0-9][a-z0-9-]*")


def register_strategy(name: str) -> Callable[[_S], _S]:
    """Class decorator: register a :class:`Strategy` subclass under ``name`` (and set its ``name``).

    The class is then what :func:`make_strategy` builds for ``name``, a choice of ``elasticize
    train --strategy``, and its :attr:`Strategy.cli_options` are options of that command.
    The registry is loud: nothing is replaced silently.

    Raises:
        TypeError: the decorated object is not a subclass of :class:`Strategy`.
        ValueError: ``name`` is empty or already registered, the class is already registered
            under another name, or one of its ``cli_options`` has a malformed flag or key, or
            a flag that another strategy declares with another key, type or choices.
    """
    def register(cls: _S) -> _S:
        if not (isinstance(cls, type) and issubclass(cls, Strategy)):
            raise TypeError(f"registering strategy {name!r} needs a subclass of {Strategy.__module__}.Strategy, "
                            f"got {cls!r}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"a strategy's name is a non-empty string, got {name!r}")
        if name in STRATEGIES:
            raise ValueError(f"strategy {name!r} is already registered ({STRATEGIES[name].__qualname__}); "
                             "pick another name")
        taken = [n for n, c in STRATEGIES.items() if c is cls]
        if taken:
            raise ValueError(f"{cls.__qualname__} is already registered as strategy {taken[0]!r}; register a "
                             "subclass under another name")
        for opt in cls.cli_options:
            _check_option(name, opt)
        cls.name = name
        STRATEGIES[name] = cls
        return cls
    return register


def _check_option(name: str, opt: StrategyOption) -> None:
    """Raise ValueError if ``opt`` is malformed or clashes with another strategy's option of the same flag."""
    if not _FLAG.fullmatch(opt.flag) or not opt.key.isidentifier():
        raise ValueError(f"strategy {name!r}: option {opt.flag!r} needs a flag like '--n-random' and a keyword "
                         f"argument name as its key, got key {opt.key!r}")
    if opt.type not in (int, float, str) or (opt.choices and opt.type is not str):
        raise ValueError(f"strategy {name!r}: option {opt.flag} takes type int, float or str (choices only with "
                         f"str), got {opt.type!r} with choices {opt.choices}")
    for other, cls in STRATEGIES.items():
        for o in cls.cli_options:
            if o.flag == opt.flag and (o.key, o.type, o.choices) != (opt.key, opt.type, opt.choices):
                raise ValueError(f"strategy {name!r}: option {opt.flag} is strategy {other!r}'s with key {o.key!r}, "
                                 f"type {o.type.__name__} and choices {o.choices}; declare it alike or use another "
                                 "flag")


def strategy_cli_options() -> list[tuple[StrategyOption, tuple[str, ...]]]:
    """Every registered strategy's command-line options, each flag once, with the strategies that declare it.

    In registration order; an option's ``help`` is that of the first strategy that declares it.
    """
    out: dict[str, tuple[StrategyOption, tuple[str, ...]]] = {}
    for name, cls in STRATEGIES.items():
        for opt in cls.cli_options:
            first, names = out.get(opt.flag, (opt, ()))
            out[opt.flag] = (first, (*names, name))
    return list(out.values())


def make_strategy(name: str | Strategy, **options: Any) -> Strategy:
    """A strategy by name with its options (``make_strategy("sortednet", accumulate=4)``).

    Raises:
        KeyError: no strategy is registered under ``name`` (the message lists the registered ones).
        TypeError: an option the strategy does not take, or options with a :class:`Strategy` instance.
        ValueError: an option value the strategy refuses (see each strategy).
    """
    if isinstance(name, Strategy):
        if options:
            raise TypeError("options are for a strategy given by name")
        return name
    if name not in STRATEGIES:
        raise KeyError(f"no strategy {name!r} is registered; known strategies: {sorted(STRATEGIES)}. If it is your "
                       "own, import the module that registers it with @register_strategy")
    cls = STRATEGIES[name]
    takes = inspect.signature(cls).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in takes.values()):
        unknown = sorted(set(options) - set(takes))
        if unknown:
            raise TypeError(f"strategy {name!r} takes no option {', '.join(map(repr, unknown))} (its options: "
                            f"{', '.join(takes) or 'none'}); choose the strategy that has it with --strategy")
    try:
        return cls(**options)
    except TypeError as e:
        raise TypeError(f"strategy {name!r}: {e}") from None


@register_strategy("sortednet")
class SortedNet(Strategy):
    """SortedNet (arXiv 2309.00255): Eq. 1 sampling, gradient accumulation, stochastic loss or summation.

    Args:
        accumulate: micro-batches (each with its own sampled sub-network) per optimizer update (``gacc``).
        objective: ``"stochastic-loss"`` or ``"stochastic-summation"``.

    Raises:
        ValueError: ``accumulate < 1`` or an unknown objective.
    """

    #: The objectives, the first the default.
    OBJECTIVES: ClassVar[tuple[str, ...]] = ("stochastic-loss", "stochastic-summation")
    cli_options = (StrategyOption("--accumulate", "accumulate", "sampled sub-networks per update (gradient "
                                  "accumulation)."),
                   StrategyOption("--objective", "objective", "objective (default stochastic-loss).", str, OBJECTIVES))

    def __init__(self, *, accumulate: int = 1, objective: str = OBJECTIVES[0]) -> None:
        if accumulate < 1:
            raise ValueError(f"accumulate must be >= 1, got {accumulate}")
        if objective not in self.OBJECTIVES:
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


@register_strategy("subnetwork-to-go")
class SubnetworkToGo(Strategy):
    """Subnetwork-to-go (arXiv 2312.03464): the full network plus one random sub-network per step.

    The paper's loss is ``L(full) + L(random)``; ``full_weight`` scales the first term
    (``full_weight * L(full) + L(random)``), which holds the full network closer to where it was
    when many smaller sub-networks share its weights (``always`` presets).

    Args:
        full_weight: factor on the full network's loss, > 0 (1: the paper's).

    Raises:
        ValueError: ``full_weight`` not a finite number > 0.
    """

    cli_options = (StrategyOption("--full-weight", "full_weight", "factor on the full network's loss "
                                  "(elasticize train's default: 3; the paper's: 1).", float),)

    def __init__(self, *, full_weight: float = 1.0) -> None:
        w = float(full_weight)
        if not (w > 0 and w != float("inf")):
            raise ValueError(f"full_weight must be a finite number > 0, got {full_weight}")
        self.full_weight = w

    def passes(self, sampler: SubnetSampler) -> list[Pass]:
        return [Pass(sampler.largest(), "full", weight=self.full_weight), Pass(sampler.sample(), "random")]

    def options(self) -> dict[str, Any]:
        return {} if self.full_weight == 1.0 else {"full_weight": self.full_weight}


@register_strategy("sandwich")
class Sandwich(Strategy):
    """Sandwich rule + in-place distillation (Universally Slimmable Networks, Yu & Huang 2019).

    Args:
        n: random sub-networks between the largest and the smallest.

    Raises:
        ValueError: ``n < 0``.
    """

    cli_options = (StrategyOption("--n-random", "n", "random sub-networks between largest and smallest."),)

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


@register_strategy("skip-aware")
class SkipAware(Strategy):
    """Skip-aware self-distillation (Adaptive Depth Networks, arXiv 2312.16392): super-net and base-net only.

    Args:
        self_distill: False trains the base-net on the task loss instead of the KL term (the ablation).
    """

    def __init__(self, *, self_distill: bool = True) -> None:
        self.self_distill = bool(self_distill)

    def passes(self, sampler: SubnetSampler) -> list[Pass]:
        return [Pass(sampler.largest(), "super", keep=True),
                Pass(sampler.smallest(), "base", target="inplace" if self.self_distill else "task")]

    def options(self) -> dict[str, Any]:
        return {"self_distill": self.self_distill}


@register_strategy("full")
class FullOnly(Strategy):
    """Only the largest sub-network (plain training)."""

    def passes(self, sampler: SubnetSampler) -> list[Pass]:
        return [Pass(sampler.largest(), "full")]
