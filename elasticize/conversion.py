"""Conversion as explicit passes: analyze -> plan -> sort -> verify -> apply.

:func:`run` is the pipeline behind :func:`elasticize.elasticize`; every pass is a plain function:

1. :func:`analyze`: the model family's known structure (:meth:`elasticize.adapters.Adapter.plan`,
   e.g. transformers), or else the traced graph (:func:`elasticize.graph.analyze`).
2. :func:`make_plan`: the :class:`~elasticize.plan.Plan` of that analysis under the options.
3. :func:`sort_units`: each coupling group's importance and the function-preserving permutation
   that puts its most important units first (:mod:`elasticize.importance`).
4. :func:`check_function` (verify): the full model's output compared with the original's; the
   fallback :func:`keep_order` puts back the order of each kind of group whose sorting changed it.
5. :func:`apply`: the surgery, giving the :class:`~elasticize.ElasticModel`.
6. :func:`check_smallest` (verify): the smallest sub-network run once on the example inputs; the
   fallback :func:`keep_whole` keeps the groups and stages that make it fail at full size (undoes
   the surgery, plans again without them, applies again and checks again).

The options are one :class:`~elasticize.options.ConvertOptions`. The passes run and the fallback
steps taken are recorded in :attr:`ElasticModel.conversion` (and ``report()["conversion"]``); each
fallback also leaves its reason in ``plan.not_elastic``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn

from .adapters import Adapter, adapter_for_model, get_adapter
from .batches import float_tensors, same_outputs
from .elastic import ElasticModel
from .graph import Analysis
from .graph import analyze as trace_and_analyze
from .importance import activation_importance, magnitude_importance, sort_by_importance
from .modules import SWITCH_PREFIX
from .options import ConvertOptions
from .plan import KIND_DIM, NotElastic, Plan, build_plan, remove_elastic
from .rules import find_rule

__all__ = ["run", "check_model", "as_tuple", "analyze", "make_plan", "sort_units", "check_function", "keep_order",
           "apply", "check_smallest", "keep_whole"]

# --------------------------------------------------------------------------- the pipeline
@dataclass
class _Found:
    """What :func:`analyze` found: the family's plan, or the traced analysis to plan from."""

    family: Adapter | None
    analysis: Analysis | None
    plan: Plan | None


@dataclass
class _Log:
    """The passes run and the fallback steps taken (:attr:`ElasticModel.conversion`)."""

    passes: list[str] = field(default_factory=list)
    fallbacks: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"passes": list(self.passes), "fallbacks": [dict(f) for f in self.fallbacks]}


def run(model: nn.Module, example_inputs: Any, options: ConvertOptions, *, calibration: Iterable[Any] | None = None,
        recipe: dict[str, Any] | None = None) -> ElasticModel:
    """Every pass in order, with the fallbacks; what :func:`elasticize.elasticize` does (errors there)."""
    check_model(model)
    sort = _resolve_sort(options.sort, calibration)
    inputs = _inputs(model, example_inputs)
    was_training = model.training
    model.eval()
    log = _Log()
    found = analyze(model, inputs, options)
    log.passes.append("analyze")
    plan = make_plan(found, model, inputs, options)
    log.passes.append("plan")
    _require_elastic(model, plan)
    order: dict[str, Any] = {"order": sort if plan.groups else None}
    kept: list[str] = []
    if sort is not None and plan.groups:
        if sort == "activation":
            calibration = list(calibration)  # type: ignore[arg-type]  # counted for the manifest, then read once
            order["calibration_batches"] = len(calibration)
        ref, scores, perms = sort_units(model, plan, inputs, sort, calibration)
        log.passes += ["sort", "check_function"]
        kept = check_function(model, plan, inputs, ref, scores, perms)
    if kept:
        log.fallbacks.append({"step": "keep_order", "kinds": list(kept)})
    plan = keep_order(plan, kept)
    em = apply(model, plan, inputs, recipe=recipe, importance=order)
    log.passes += ["apply", "check_smallest"]
    failing = check_smallest(em, inputs)
    if failing:  # never ship a sub-network that cannot run
        log.passes.append("keep_whole")
        log.fallbacks.append({"step": "keep_whole", "kept": dict(failing)})
        em = keep_whole(em, found, inputs, options, failing, kept)
        log.passes += ["plan", "apply", "check_smallest"]  # what keep_whole ran again
    em.conversion = log.to_json()
    em.train(was_training)
    return em


def check_model(model: Any) -> None:
    """Refuse what cannot be converted.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, is already elastic, or holds PEFT adapter
            layers (a ``PeftModel``: its LoRA layers hide the base layers from the analysis).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"elasticize() takes an nn.Module, not {type(model).__name__}")
    if isinstance(model, ElasticModel) or any(hasattr(m, "_el_tensors") for m in model.modules()):
        raise TypeError("this model is already elastic; elasticize the original model once")
    peft = [type(m).__name__ for m in model.modules() if type(m).__module__.split(".")[0] == "peft"]
    if peft:
        raise TypeError(f"this model holds PEFT adapter layers ({peft[0]}); convert first: merge them "
                        "(model = model.merge_and_unload()), elasticize the merged model, then add LoRA to the "
                        "elastic model with elasticize.integrations.peft.add_lora(em, config)")


def _resolve_sort(sort: str | None, calibration: Any) -> str | None:
    """``sort`` with ``"auto"`` decided (activation with calibration data, else magnitude), checked against
    ``calibration``.

    Raises:
        ValueError: calibration data with a sort other than activation, or activation without it.
    """
    if sort == "auto":
        sort = "magnitude" if calibration is None else "activation"
    if calibration is not None and sort != "activation":
        raise ValueError(f"calibration data is used only by sort='activation', and sort={sort!r} was asked for: "
                         "drop one of the two")
    if sort == "activation" and calibration is None:
        raise ValueError("sort='activation' ranks units on calibration data: pass calibration=[batch, ...] (a few "
                         "batches of real inputs), or use sort='magnitude'")
    return sort


def as_tuple(example_inputs: Any) -> tuple:
    """Example inputs as a tuple of positional inputs (a tensor, or a tuple/list of them; None: empty).

    Raises:
        TypeError: anything else.
    """
    if example_inputs is None:
        return ()
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(f"example_inputs must be a tensor or a tuple of tensors, not {type(example_inputs).__name__}")


def _inputs(model: nn.Module, example_inputs: Any) -> tuple:
    """The given example inputs, or the family adapter's (the ``import`` adapter's: ``model.example_inputs``)."""
    inputs = as_tuple(example_inputs)
    if not inputs:
        adapter: Adapter = adapter_for_model(model) or get_adapter("import")
        inputs = adapter.example_inputs(model)
    return inputs


def _require_elastic(model: nn.Module, plan: Plan, *, after_fallback: bool = False) -> None:
    if plan.groups or plan.stages:
        return
    if after_fallback:
        reasons = "; ".join(f"{n.where}: {n.why}" for n in plan.not_elastic[:12])
        raise ValueError(f"nothing in {type(model).__name__} could be made elastic: every group and stage failed "
                         f"to run at its smallest ({reasons})")
    reasons = "; ".join(f"{n.where}: {n.why}" for n in plan.not_elastic[:12]) or "no convolution, linear layer or block"
    raise ValueError(f"nothing in {type(model).__name__} could be made elastic ({reasons}). Add a rule for its "
                     "modules (see README, 'Your own rule') or choose other dims")


# --------------------------------------------------------------------------- the passes
def analyze(model: nn.Module, inputs: tuple, options: ConvertOptions) -> _Found:
    """Pass 1: the family adapter's plan from the model's known structure, or else the traced analysis.

    Raises:
        ValueError: the model cannot be traced (see :func:`elasticize.graph.analyze`).
    """
    family = adapter_for_model(model)
    plan = family.plan(model, inputs, **options.plan_options()) if family is not None else None
    if plan is not None:
        return _Found(family, None, plan)
    return _Found(family, trace_and_analyze(model, inputs, find_rule), None)


def make_plan(found: _Found, model: nn.Module, inputs: tuple, options: ConvertOptions,
              exclude: Sequence[str] = ()) -> Plan:
    """Pass 2: the plan, with the groups and stages matching ``exclude`` (more patterns) kept at full size.

    The family's plan is the one :func:`analyze` made unless ``exclude`` adds patterns (then the
    family plans again); a traced analysis is planned by :func:`elasticize.plan.build_plan`.
    """
    if exclude:
        options = options.replace(exclude=options.exclude + tuple(exclude))
    if found.analysis is not None:
        return build_plan(found.analysis, **options.plan_options(), modules_ratios=options.modules_ratios)
    if not exclude and found.plan is not None:
        return found.plan
    return found.family.plan(model, inputs, **options.plan_options())  # type: ignore[union-attr]


def sort_units(model: nn.Module, plan: Plan, inputs: tuple, sort: str, calibration: list[Any] | None
               ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor], dict[str, list[int]]]:
    """Pass 3: permute every group's units in place, most important first (function-preserving).

    Returns:
        (the original model's floating-point outputs on ``inputs``, taken before the permutation;
        the importance per group; the permutation applied per group).
    """
    with torch.no_grad():
        ref = float_tensors(model(*inputs))
    scores = (activation_importance(model, plan, calibration if calibration is not None else []) if sort == "activation"
              else magnitude_importance(model, plan))
    perms = sort_by_importance(model, plan, scores)
    return ref, scores, perms


def _same_function(model: nn.Module, inputs: tuple, ref: list[torch.Tensor], rtol: float = 1e-4) -> bool:
    """Whether ``model(*inputs)`` still gives ``ref``, within ``rtol`` of its largest magnitude."""
    with torch.no_grad():
        return same_outputs(float_tensors(model(*inputs)), ref, rtol)


@contextlib.contextmanager
def _in_double(model: nn.Module) -> Iterator[None]:
    """``model``'s floating tensors in float64 for the duration (a lossless round trip from fp32/bf16/fp16)."""
    dtypes = {}
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point() and id(t) not in dtypes:
            dtypes[id(t)] = (t, t.dtype)
            t.data = t.data.double()
    try:
        yield
    finally:
        for t, dtype in dtypes.values():
            t.data = t.data.to(dtype)


def check_function(model: nn.Module, plan: Plan, inputs: tuple, ref: list[torch.Tensor],
                   scores: dict[str, torch.Tensor], perms: dict[str, list[int]]) -> list[str]:
    """Pass 4 (verify): undo the importance order of each kind of group whose permutation changed the model's output.

    Sorting is function-preserving when the plan lists every tensor that shares a group's
    channels. A plan made from a family's known structure can miss one (Nyströmformer's
    depthwise convolution over the heads), so the output at full size is compared with the
    original's. Reordered float32 sums alone move a deep randomly initialised network's outputs
    by up to ~1e-3 of their magnitude (timm EfficientNetV2: 0.56 at logits of 816), so a
    difference above 1e-4 is confirmed in float64, where reordering moves them by ~1e-13: each
    kind (``width``, ``heads``, ``hidden``) whose order still changes the output by more than
    1e-9 is put back.

    Returns:
        The kinds that keep the original order (for :func:`keep_order`).
    """
    if not perms or _same_function(model, inputs, ref):
        return []

    def permute(by: dict[str, torch.Tensor]) -> None:
        sort_by_importance(model, dataclasses.replace(plan, groups=tuple(g for g in plan.groups if g.name in by)), by)

    def undo(names: list[str]) -> None:  # the inverse permutation: argsort of the one applied
        permute({n: -torch.tensor(perms[n], dtype=torch.float64) for n in names})

    kinds: dict[str, list[str]] = {}
    for g in plan.groups:
        if g.name in perms:
            kinds.setdefault(g.kind, []).append(g.name)
    undo(list(perms))
    inputs64 = tuple(t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs)
    kept = []
    with _in_double(model):
        with torch.no_grad():
            ref64 = float_tensors(model(*inputs64))
        for kind, names in kinds.items():
            permute({n: scores[n] for n in names})
            if not _same_function(model, inputs64, ref64, rtol=1e-9):
                undo(names)
                kept.append(kind)
    return kept


def keep_order(plan: Plan, kinds: list[str]) -> Plan:
    """Fallback of :func:`check_function`: the plan with the groups of ``kinds`` keeping their original order
    (``sort`` False), and why."""
    for kind in kinds:
        plan = dataclasses.replace(plan, groups=tuple(dataclasses.replace(g, sort=False) if g.kind == kind else g
                                                      for g in plan.groups))
        plan = plan.noted(kind, "kept in the original order: sorting by importance changed the full model's "
                                "output on the example inputs (a tensor outside the plan shares these channels)")
    return plan


def apply(model: nn.Module, plan: Plan, inputs: tuple, *, recipe: dict[str, Any] | None,
          importance: dict[str, Any]) -> ElasticModel:
    """Pass 5: the surgery (:func:`elasticize.plan.apply_plan`, in place), as an :class:`ElasticModel`."""
    shapes = [list(t.shape) for t in inputs if isinstance(t, torch.Tensor)]
    return ElasticModel(model, plan, recipe=recipe, input_shapes=shapes, importance=importance)


def check_smallest(em: ElasticModel, inputs: tuple) -> dict[str, str]:
    """Pass 6 (verify): groups and stages whose smallest choice makes the example forward fail, name -> error.

    Runs the smallest sub-network on ``inputs`` once (no gradients); only when that fails,
    each group and stage at its smallest alone (the rest full) to find the ones to blame.
    Empty when the smallest sub-network runs, or there is nothing elastic.
    """
    def error(cfg: Any) -> str | None:
        try:
            with torch.no_grad(), em.subnet(cfg):
                em(*inputs)
        except Exception as e:  # noqa: BLE001 - any failure of a sub-network counts
            return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        return None

    if not em.plan.groups and not em.plan.stages:
        return {}
    em.eval()
    smallest: dict[str, dict[str, int]] = {}
    singles: dict[str, dict[str, dict[str, int]]] = {}
    for g in em.plan.groups:
        dim = KIND_DIM.get(g.kind, "width")
        smallest.setdefault(dim, {})[g.name] = g.choices[-1]
        singles[g.name] = {dim: {g.name: g.choices[-1]}}
    for st in em.plan.stages:
        smallest.setdefault("depth", {})[st.name] = st.choices[-1]
        singles[st.name] = {"depth": {st.name: st.choices[-1]}}
    first = error(smallest)
    if first is None:
        return {}
    blamed = {name: err for name, cfg in singles.items() if (err := error(cfg)) is not None}
    return blamed or {"<all at their smallest>": first}


def keep_whole(em: ElasticModel, found: _Found, inputs: tuple, options: ConvertOptions, failing: dict[str, str],
               kept_order: list[str]) -> ElasticModel:
    """Fallback of :func:`check_smallest`: keep the ``failing`` groups and stages at full size, with the error as
    their reason in ``plan.not_elastic``: undo the surgery, plan again without them, apply, check again.

    Raises:
        ValueError: nothing is left elastic.
        RuntimeError: the smallest sub-network still fails although each group and stage runs
            at its smallest alone.
    """
    model = em.model
    _undo_surgery(model, em.plan)
    plan = make_plan(found, model, inputs, options, exclude=tuple(failing))
    why = "a sub-network with it at its smallest failed to run on the example inputs ({})"
    plan = dataclasses.replace(plan, not_elastic=tuple(
        NotElastic(n.where, why.format(failing[n.where])) if n.where in failing else n for n in plan.not_elastic))
    plan = keep_order(plan, kept_order)
    _require_elastic(model, plan, after_fallback=True)
    em = apply(model, plan, inputs, recipe=em.recipe, importance=em.importance)
    still = check_smallest(em, inputs)
    if still:
        raise RuntimeError(f"the smallest sub-network of {type(model).__name__} fails to run ({still}) although "
                           "each elastic group and stage runs alone; pass exclude=[...] to keep some at full "
                           "size, and please report it")
    return em


def _undo_surgery(model: nn.Module, plan: Plan) -> None:
    """Give ``model`` back its plain modules, dropping the switchable-norm tensors ``plan`` added."""
    remove_elastic(model, freeze=False)
    for module in plan.switchable:
        m = model.get_submodule(module)
        for d in (m._parameters, m._buffers):
            for k in [k for k in d if k.startswith(SWITCH_PREFIX)]:
                del d[k]
