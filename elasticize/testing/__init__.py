"""Check that a model, or your own rule, keeps elasticize's invariants, in one call.

::

    from elasticize.testing import check_conformance, check_rule

    check_conformance(MyNet(), (torch.randn(2, 3, 32, 32),))   # raises ConformanceError listing what failed
    check_rule("scaled_linear", TinyMLP(), (torch.randn(4, 16),))  # and that the rule handled a site

The invariants (the project's DESIGN): the largest sub-network computes what the original did;
every preset's extraction computes what the elastic model does at that preset; ``load(save(m))``
gives identical outputs at every preset, and ``load_subnet`` gives the extraction's; the plan's
MACs of every preset equal ``torch.utils.flop_counter.FlopCounterMode``'s FLOPs / 2 per sample,
measured on the extracted sub-network (math attention, as the counter does not see fused kernels).

:mod:`elasticize.testing.zoo` holds one tiny model per built-in rule; the project's conformance
suite runs this checker over every registered rule with them, as timm tests its registry and
PEFT its methods.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..batches import default_output as output_tensor

__all__ = ["ConformanceError", "ConformanceReport", "check_conformance", "check_rule", "math_attention"]


class ConformanceError(AssertionError):
    """An invariant does not hold; the message lists every failed check, one per line."""


@dataclass
class ConformanceReport:
    """What :func:`check_conformance` measured.

    Attributes:
        presets: the preset names checked.
        max_diff: check name -> largest absolute difference seen (``identity``, ``extract``,
            ``load``, ``load_subnet``).
        macs: preset -> (plan MACs per sample, FlopCounterMode MACs per sample).
        sites: module path -> rule name, the rules the plan used.
        elastic: the module paths with at least one tensor of an elastic axis.
        failures: one line per failed check (empty when all hold).
    """

    presets: list[str]
    max_diff: dict[str, float] = field(default_factory=dict)
    macs: dict[str, tuple[float, float]] = field(default_factory=dict)
    sites: dict[str, str] = field(default_factory=dict)
    elastic: set[str] = field(default_factory=set)
    failures: list[str] = field(default_factory=list)


def math_attention(module: nn.Module) -> nn.Module:
    """``module`` with timm's fused attention turned off (FlopCounterMode does not count the CPU kernel)."""
    for m in module.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    return module


def _diff(a: Any, b: Any) -> float:
    a, b = output_tensor(a), output_tensor(b)
    if a.shape != b.shape:
        return float("inf")
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _counted(module: nn.Module, inputs: Sequence[torch.Tensor]) -> tuple[Any, float]:
    """Output and MACs (FLOPs / 2) of one forward, with the math attention kernels FlopCounterMode counts
    (gradients on: without them ``nn.MultiheadAttention`` takes a fused fast path the counter cannot see)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc, sdpa_kernel(SDPBackend.MATH), torch.enable_grad():
        y = math_attention(module)(*inputs)
    return y, fc.get_total_flops() / 2


def check_conformance(model: nn.Module, example_inputs: Sequence[torch.Tensor], *, rtol: float = 1e-5,
                      macs_rtol: float = 1e-9, check_macs: bool = True, folder: str | Path | None = None,
                      **options: Any) -> ConformanceReport:
    """Convert ``model`` and check every invariant; raise :class:`ConformanceError` if one fails.

    ``model`` is not changed: a deep copy is converted, and another copy is the architecture
    passed to :func:`elasticize.load` / :func:`elasticize.load_subnet` (``model=``).

    Args:
        model: the original model, in eval mode (random weights are fine).
        example_inputs: its inputs, batch first; MACs are per sample (divided by the batch).
        rtol: allowed difference, relative to ``max(1, |output|)``, for identity and extraction
            (importance sorting reorders float32 sums); loading must be exact.
        macs_rtol: allowed relative difference between the plan's MACs and FlopCounterMode's (they are
            equal in exact arithmetic; the default only absorbs float rounding).
        check_macs: compare MACs (off for layers FlopCounterMode does not count, e.g. LSTMs).
        folder: where to write the temporary files (default: a temporary folder, removed).
        **options: passed to :func:`elasticize.elasticize` (``dims``, ``depth_mode``...).

    Returns:
        The :class:`ConformanceReport`.

    Raises:
        ConformanceError: some invariant does not hold (every failure listed).
    """
    import elasticize

    inputs = tuple(example_inputs)
    original = copy.deepcopy(model).eval()
    fresh = copy.deepcopy(model).eval()
    with torch.no_grad():
        ref = original(*inputs)
    em = elasticize.elasticize(copy.deepcopy(model).eval(), inputs, **options)
    rep = ConformanceReport(presets=list(em.presets), sites=dict(em.plan.sites),
                            elastic={fqn.rpartition(".")[0] for fqn, info in em.plan.tensors.items() if info.axes})
    scale = max(1.0, output_tensor(ref).abs().max().item())

    def note(check: str, value: float, limit: float, what: str) -> None:
        rep.max_diff[check] = max(rep.max_diff.get(check, 0.0), value)
        if not value <= limit:
            rep.failures.append(f"{what}: differs by {value:.3g} (allowed {limit:.3g})")

    with torch.no_grad():
        note("identity", _diff(em(*inputs), ref), rtol * scale, "the largest sub-network vs the original")
        outs = {}
        for p in rep.presets:
            with em.subnet(p):
                outs[p] = em(*inputs)
            dense = em.extract(p).eval()
            y, macs = _counted(dense, inputs)
            note("extract", _diff(y, outs[p]), rtol * scale, f"extract({p!r}) vs the elastic model at {p!r}")
            batch = inputs[0].shape[0] if inputs and inputs[0].dim() else 1
            rep.macs[p] = (float(em.macs(p)), macs / batch)
            plan_macs = float(em.macs(p))
            if check_macs and abs(plan_macs - macs / batch) > macs_rtol * max(1.0, macs / batch):
                rep.failures.append(f"MACs of {p!r}: the plan says {plan_macs:.6g}, FlopCounterMode {macs / batch:.6g}")
    try:
        _check_files(em, fresh, inputs, outs, folder, note)
    except (ValueError, KeyError, TypeError) as e:  # a file the invariants should have made loadable
        rep.failures.append(f"save -> load: {e}")
    if rep.failures:
        raise ConformanceError("\n".join(rep.failures))
    return rep


def _check_files(em: Any, fresh: nn.Module, inputs: tuple, outs: dict, folder: Any, note: Callable) -> None:
    """``load(save(m))`` at every preset, and ``load_subnet`` against the extraction, exactly."""
    import elasticize

    with tempfile.TemporaryDirectory(dir=folder) as d:
        path = Path(d) / "conformance.safetensors"
        elasticize.save(em, path)
        loaded = elasticize.load(path, model=copy.deepcopy(fresh))
        with torch.no_grad():
            for p, y in outs.items():
                with loaded.subnet(p):
                    note("load", _diff(loaded(*inputs), y), 0.0, f"load(save(m)) at {p!r}")
                sub = elasticize.load_subnet(path, p, model=copy.deepcopy(fresh))
                note("load_subnet", _diff(sub(*inputs), em.extract(p).eval()(*inputs)), 0.0,
                     f"load_subnet(path, {p!r}) vs extract({p!r})")


def check_rule(rule: str, model: nn.Module, example_inputs: Sequence[torch.Tensor], **kwargs: Any) -> ConformanceReport:
    """:func:`check_conformance`, and that rule ``rule`` handled at least one module of ``model``
    and made something elastic (a site whose tensors have an elastic axis).

    Raises:
        KeyError: ``rule`` is not registered (the message lists the registered rules).
        ConformanceError: the rule handled nothing elastic, or an invariant does not hold.
    """
    from ..rules import get_rule

    get_rule(rule)
    rep = check_conformance(model, example_inputs, **kwargs)
    handled = [path for path, name in rep.sites.items() if name == rule]
    if not any(e == path or e.startswith(path + ".") for path in handled for e in rep.elastic):
        raise ConformanceError(f"rule {rule!r} made no module of {type(model).__name__} elastic (it handled "
                               f"{handled or 'none'}; the plan used {sorted(set(rep.sites.values()))})")
    return rep
