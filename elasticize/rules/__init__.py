"""Rewrite rules: which modules elasticize understands, and how their axes couple.

A rule matches modules (by type, or by its own :meth:`Rule.matches`) and, during the
analysis, says how the module's tensor axes join the axes of its inputs and outputs
(:meth:`Rule.analyze`). The elastic behaviour itself is generic (sliced views of the
module's own tensors, see :mod:`elasticize.modules`), so most rules are a few lines.
A rule that needs its own forward gives ``mixin``.

Registering your own rule takes one file and no change to elasticize::

    from elasticize.rules import Rule, register_rule

    @register_rule("scaled_linear")
    class ScaledLinearRule(Rule):
        module_types = (ScaledLinear,)

        def analyze(self, ctx, x):
            y = ctx.linear(x, weight="linear.weight", bias="linear.bias")
            ctx.couple(y[-1], ctx.tensor("scale")[0])
            return y

The plan stores each site's rule name; :func:`elasticize.load` looks the name up again,
so a checkpoint that used a rule loads wherever the module that registers it is imported.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from torch import nn

from .. import _registry
from ..graph import SiteContext

__all__ = ["Rule", "register_rule", "get_rule", "find_rule", "registered_rules", "unregister_rule"]

_REGISTRY: dict[str, "Rule"] = {}
R = TypeVar("R", bound=type)


class Rule:
    """Base class of a rewrite rule.

    Attributes:
        name: the registry name, set by :func:`register_rule`.
        module_types: module classes this rule handles (subclasses included).
        mixin: optional class put in front of the module's class, for a rule that needs
            its own ``forward``; ``None`` for the generic sliced-view behaviour.
    """

    name: str = ""
    module_types: tuple[type, ...] = ()
    mixin: type | None = None

    def matches(self, module: nn.Module) -> bool:
        """Whether this rule handles ``module``."""
        return bool(self.module_types) and isinstance(module, self.module_types)

    def analyze(self, ctx: SiteContext, *inputs: Any) -> Any:
        """Join the module's axes with its inputs' and return its output's slots.

        Args:
            ctx: the site: the module, its path, its shapes and the slot helpers (the public
                methods of :class:`elasticize.graph.SiteContext` are the whole API a rule uses).
            *inputs: slots of each positional input: a tuple of ints per tensor.

        Returns:
            The output's slots (a tuple of ints, one per axis).
        """
        raise NotImplementedError

    def densify(self, module: nn.Module) -> None:
        """Fix a dense module's derived state after extraction dropped some of its own layers.

        Called for a module whose rule declared a layer stage (:meth:`SiteContext.layers`),
        once the module has its original class back, its attributes their active values and
        the dropped layers' tensors are deleted. The default does nothing.
        """


def register_rule(name: str) -> Callable[[R], R]:
    """Class decorator that registers a :class:`Rule` subclass under ``name``.

    Rules registered later are tried first, so a user rule can take over a built-in
    module type.

    Raises:
        ValueError: if ``name`` is already registered (call :func:`unregister_rule` first).
        TypeError: if the class is not a :class:`Rule`.
    """

    def deco(cls: R) -> R:
        _registry.add(_REGISTRY, "rule", name, cls, Rule,
                      "pick another name or call elasticize.rules.unregister_rule first")
        return cls

    return deco


def unregister_rule(name: str) -> None:
    """Remove a registered rule.

    Raises:
        KeyError: if no rule has that name.
    """
    get_rule(name)
    del _REGISTRY[name]


def get_rule(name: str) -> Rule:
    """The rule registered as ``name``.

    Raises:
        KeyError: if none is; the message lists the known names and says to import the
            module that registers the rule (a checkpoint that used a user rule needs it).
    """
    return _registry.get(_REGISTRY, "rule", name, "If it is your own rule, import the module that defines it "
                         "(its @register_rule runs on import) before loading")


def registered_rules() -> dict[str, Rule]:
    """A copy of the registry, name -> rule."""
    return dict(_REGISTRY)


def find_rule(module: nn.Module) -> Rule | None:
    """The most recently registered rule that matches ``module``, or None."""
    for rule in reversed(_REGISTRY.values()):
        if rule.matches(module):
            return rule
    return None


# the built-in rules, registered in this order (find_rule prefers the latest match): torch.nn layers, timm,
# torchvision, recurrent layers, TAC blocks
from . import torch, timm, torchvision, rnn, tac  # noqa: E402,F401
