"""``elasticize(model)`` and the :class:`ElasticModel` it returns."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .adapters import Adapter, adapter_for_model, get_adapter
from .batches import float_tensors
from .export import LiveTensors, extract
from .graph import analyze
from .importance import activation_importance, magnitude_importance, sort_by_importance
from .modules import SWITCH_PREFIX
from .plan import KIND_DIM, Plan, apply_plan, build_plan, remove_elastic
from .rules import find_rule
from .space import Config, SearchSpace
from .tensorfile import load_weights_file

__all__ = ["ElasticModel", "elasticize"]

SubnetLike = str | Mapping[str, Any] | None


class ElasticModel(nn.Module):
    """A super-network: the original model with elastic modules swapped in place.

    ``model`` is the original module object (its parameters are reused, not copied);
    ``state_dict`` names of the original are ``model.<name>`` here.

    Attributes:
        model: the converted model.
        plan: what is elastic (:class:`elasticize.plan.Plan`).
        space: the search space (:class:`elasticize.space.SearchSpace`).
        recipe: how to rebuild the base model (``{"adapter", "name", "kwargs"}``), or ``{}``.
        input_shapes: shapes of the example inputs used for the analysis.
        importance: how the units were ordered at conversion, ``{"order": "magnitude" |
            "activation" | None}`` plus ``"calibration_batches"`` (a count) for activation
            importance; ``{}`` when unknown (a model built before this was recorded).
        metrics: measured metric per preset name (filled by training), JSON-native.
        bn_stats: calibrated BatchNorm running statistics per preset (BN recalibration, filled by
            :func:`elasticize.train.recalibrate_bn` or loaded from a file): preset name -> buffer name
            (as in ``model.state_dict()``, the tensor that preset reads) -> its dense values ``(channels,)``.
            Setting a calibrated preset installs its statistics; any other sub-network runs with the
            trained statistics. Set with :meth:`set_bn_stats`.
        files: small files that travel with the model, file name -> contents: a Hugging Face model's
            tokenizer, generation and preprocessor files (:data:`elasticize.adapters.hf.TOKENIZER_FILES`),
            read from its folder by :func:`convert`, kept inside the saved file and written into
            exported Hugging Face folders (:meth:`save_pretrained`).
        source_dir: the Hugging Face folder :func:`convert` built this model from in this process
            (None otherwise; never saved): :meth:`save_pretrained` refuses to write into it, and copies
            its tokenizer files from it when they were too large to store (:data:`~elasticize.adapters.hf.FILES_CAP`).
    """

    def __init__(self, model: nn.Module, plan: Plan, *, recipe: dict[str, Any] | None = None,
                 input_shapes: Sequence[Sequence[int]] = (), importance: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.importance = dict(importance or {})
        self.model = model
        self.plan = plan
        self.space = SearchSpace(plan)
        self.recipe = dict(recipe or {})
        self.input_shapes = [list(s) for s in input_shapes]
        self.metrics: dict[str, dict[str, float]] = {}
        self.source_path: str | None = None  # the file this model was loaded from; never overwritten
        self.files: dict[str, bytes] = {}
        self.source_dir: str | None = None
        self._state = apply_plan(model, plan)
        self._active: Config = self.space.full()
        self._resolved: dict[str, Config] = {}
        self.bn_stats: dict[str, dict[str, torch.Tensor]] = {}
        self._bn_live: str | None = None  # preset whose statistics are in the buffers now
        self._bn_trained: dict[str, torch.Tensor] = {}  # the trained values they replaced

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the active sub-network; inputs and outputs are the original model's."""
        return self.model(*args, **kwargs)

    # ------------------------------------------------------------ sub-networks
    @property
    def presets(self) -> dict[str, Config]:
        """Named sub-networks, sorted from largest to smallest MACs (``full`` is the original)."""
        return self.space.presets

    @property
    def active(self) -> Config:
        """The active sub-network's configuration."""
        return {d: dict(v) for d, v in self._active.items()}

    def resolve(self, subnet: SubnetLike) -> Config:
        """A validated full configuration; see :meth:`elasticize.space.SearchSpace.resolve` for errors."""
        if isinstance(subnet, str):
            cfg = self._resolved.get(subnet)
            if cfg is None:
                cfg = self._resolved[subnet] = self.space.resolve(subnet)
            return cfg
        return self.space.resolve(subnet)

    def add_preset(self, name: str, subnet: SubnetLike, *, replace: bool = False) -> Config:
        """Name ``subnet`` as a preset: selectable by name, measured by the trainer, saved in the
        manifest with its tensor table (so :func:`elasticize.load_subnet` reads just its slice).

        Returns:
            The resolved configuration.

        Raises:
            ValueError: an empty or taken name (``replace=True`` gives a taken name to ``subnet``,
                dropping its measured metrics and calibrated statistics; ``full`` never).
            KeyError, TypeError: a sub-network outside the search space.
        """
        cfg = self.space.add_preset(name, subnet, replace=replace)
        self._resolved.pop(name, None)
        self.metrics.pop(name, None)
        if name in self.bn_stats:  # calibrated for the sub-network the name meant before
            self.set_bn_stats({n: t for n, t in self.bn_stats.items() if n != name})
        return cfg

    def set_subnet(self, subnet: SubnetLike) -> Config:
        """Make ``subnet`` (a preset name, a config, or None for full) the active sub-network.

        Costs a few integer stores per group and stage; no tensor is touched.

        Raises:
            KeyError, ValueError, TypeError: for a sub-network outside the search space.
        """
        cfg = self.resolve(subnet)
        self.space.apply(self._state, cfg)
        self._active = cfg
        if self.bn_stats or self._bn_live is not None:
            name = subnet if isinstance(subnet, str) and subnet in self.bn_stats else self._calibrated_name(cfg)
            self._install_bn(name)
        return cfg

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
        buffers = dict(self.model.named_buffers())
        clean: dict[str, dict[str, torch.Tensor]] = {}
        for name, table in stats.items():
            if name not in self.presets:
                raise KeyError(f"BN statistics for unknown preset {name!r}; presets: {list(self.presets)}")
            clean[name] = {}
            for fqn, t in table.items():
                if fqn not in buffers:
                    raise KeyError(f"BN statistics of preset {name!r} name {fqn!r}, which is not a buffer of the model")
                if t.dim() != 1 or t.shape[0] > buffers[fqn].shape[0]:
                    raise ValueError(f"BN statistics {fqn!r} of preset {name!r} have shape {list(t.shape)}; expected "
                                     f"(n,) with n <= {buffers[fqn].shape[0]}")
                clean[name][fqn] = t.detach().to(buffers[fqn].device, buffers[fqn].dtype).clone()
        self.bn_stats = clean
        self._install_bn(self._calibrated_name(self._active))

    @contextlib.contextmanager
    def trained_bn_stats(self) -> Iterator["ElasticModel"]:
        """Context manager: the buffers hold the trained BatchNorm statistics inside (for saving, training)."""
        live = self._bn_live
        self._install_bn(None)
        try:
            yield self
        finally:
            self._install_bn(live)

    def _calibrated_name(self, cfg: Config) -> str | None:
        for name in self.bn_stats:
            if self.resolve(name) == cfg:
                return name
        return None

    def _install_bn(self, name: str | None) -> None:
        if name == self._bn_live:
            return
        buffers = dict(self.model.named_buffers())
        with torch.no_grad():
            for fqn, t in self._bn_trained.items():
                buffers[fqn].copy_(t)
            self._bn_trained = {}
            if name is not None:
                for fqn, t in self.bn_stats[name].items():
                    self._bn_trained[fqn] = buffers[fqn].clone()
                    buffers[fqn][: t.shape[0]].copy_(t)
        self._bn_live = name

    @contextlib.contextmanager
    def subnet(self, subnet: SubnetLike) -> Iterator["ElasticModel"]:
        """Context manager: run at ``subnet`` inside, back to the previous sub-network after."""
        previous = self._active
        self.set_subnet(subnet)
        try:
            yield self
        finally:
            self.set_subnet(previous)

    def macs(self, subnet: SubnetLike = None) -> int:
        """MACs per sample of ``subnet`` (conv, linear, attention matmuls; FLOPs = 2 x MACs)."""
        return self.space.macs(self.resolve(subnet))

    def params(self, subnet: SubnetLike = None) -> int:
        """Parameter count of ``subnet`` once extracted."""
        return self.space.params(self.resolve(subnet))

    def select(self, *, max_macs: int | None = None, max_params: int | None = None,
               max_latency_s: float | None = None, metric: str | None = None) -> Config:
        """A sub-network within the budget, without search.

        Without ``metric`` and ``max_latency_s``: the largest nested sub-network within the
        MACs/params budget (:meth:`SearchSpace.select`, SortedNet's search-free extraction).
        With ``metric`` (a key of :attr:`metrics`, higher is better, e.g. ``"accuracy"``): the
        measured preset with the best value among those within every bound (ties: more MACs).
        ``max_latency_s`` bounds the measured ``"latency_s"`` metric (seconds per batch, as
        measured by :meth:`elasticize.train.Trainer.evaluate`).

        Raises:
            ValueError: no bound given, or no (measured) sub-network meets them; the message
                says which presets were measured.
        """
        if metric is None and max_latency_s is None:
            return self.space.select(max_macs=max_macs, max_params=max_params)
        if max_macs is None and max_params is None and max_latency_s is None:
            raise ValueError("give max_macs, max_params and/or max_latency_s")
        need = [k for k in (metric, "latency_s" if max_latency_s is not None else None) if k]
        measured = [n for n in self.presets if all(k in self.metrics.get(n, {}) for k in need)]
        ok = [n for n in measured
              if (max_macs is None or self.macs(n) <= max_macs) and (max_params is None or self.params(n) <= max_params)
              and (max_latency_s is None or self.metrics[n]["latency_s"] <= max_latency_s)]
        if not ok:
            raise ValueError(f"no measured preset meets max_macs={max_macs}, max_params={max_params}, "
                             f"max_latency_s={max_latency_s}; presets measured for {need}: {measured or 'none'} "
                             "(measure them with elasticize.train.Trainer.evaluate)")
        key = (lambda n: (self.metrics[n][metric], self.macs(n))) if metric else (lambda n: self.macs(n))
        return self.resolve(max(ok, key=key))

    # ------------------------------------------------------------ extraction
    def extract(self, subnet: SubnetLike = None) -> nn.Module:
        """A plain dense module of ``subnet``, made of the original layer classes.

        Numerically equal to this model at ``subnet`` (fp32, max abs diff <= 1e-5); its
        tensors are new (training it does not change this model). Non-tensor state is the
        family adapter's (timm ``num_features``, a Hugging Face ``config``), as for
        :func:`elasticize.load_subnet`, which runs the same extraction (:func:`elasticize.export.extract`).

        Raises:
            KeyError, ValueError, TypeError: for a sub-network outside the search space.
        """
        cfg = self.resolve(subnet)
        with self.subnet(cfg):
            dense = extract(self.model, self.plan, self.space, self._state, cfg, LiveTensors(self.model),
                            recipe=self.recipe)
        return dense.train(self.model.training)

    def save_pretrained(self, directory: str, subnet: SubnetLike = None, *, overwrite: bool = False) -> str:
        """Save ``subnet`` of a transformers model as a plain Hugging Face folder.

        The folder (``model.safetensors``, a ``config.json`` that describes the sub-network, and the
        original folder's tokenizer files, from :attr:`files`) loads with ``AutoModel.from_pretrained``
        (or the model's own class) in a program that has never heard of elasticize, and computes what
        this model computes at ``subnet``. Without tokenizer files (a model made from a model object,
        or a file of an older elasticize) a ``UserWarning`` says that the folder has no tokenizer.

        Args:
            directory: the folder to write; it is built beside it and swapped into place (see
                :func:`~elasticize.adapters.hf.save_hf`: the old or the new folder is always there).
            subnet: a preset name, a config, or None for the largest sub-network.
            overwrite: replace an existing folder (never the input model's folder).

        Returns:
            The folder's path.

        Raises:
            TypeError: if this is not a transformers model.
            ValueError: if the family's config cannot describe the sub-network (e.g. BERT derives
                head_dim from hidden_size / num_attention_heads, so fewer heads at full hidden width
                do not fit it; Gemma's embedding scale comes from hidden_size, so a narrower hidden
                size does not); the message lists the presets that can be saved.
            FileExistsError: if ``directory`` exists and ``overwrite`` is False, or is a file.
            FileNotFoundError: a parent of ``directory`` is a file.
            PermissionError: ``directory`` cannot be written (checked before the extraction).
            OSError: writing failed; an old folder stays.
        """
        from ._files import check_output
        from .adapters.hf import export_problem, is_hf_model, save_hf

        if not is_hf_model(self.model):
            raise TypeError(f"save_pretrained needs a transformers model, not {type(self.model).__name__}; use "
                            "elasticize.save_subnet for a safetensors file")
        check_output(directory, kind="folder", overwrite=overwrite, inputs=(self.source_dir,))
        dense = self.extract(subnet)
        try:
            return str(save_hf(dense, directory, files=self.files, source=self.source_dir, overwrite=overwrite))
        except ValueError as e:
            if "cannot be saved" not in str(e):
                raise
            ok = [n for n in self.presets if export_problem(self.extract(n)) is None]
            raise ValueError(f"{e}. Presets that can be saved as a transformers folder: {ok or 'none'}; convert with "
                             "dims=('width', 'depth') to make every preset fit the family's config") from None

    def report(self) -> dict[str, Any]:
        """What became elastic and what did not, as JSON-native values (what ``elasticize inspect`` prints)."""
        return {
            "tracer": self.plan.tracer,
            **self.space.dimensions,
            "not_elastic": [list(x) for x in self.plan.not_elastic],
            "presets": {n: {"macs": self.macs(n), "params": self.params(n)} for n in self.presets},
        }


def _as_tuple(example_inputs: Any) -> tuple:
    if example_inputs is None:
        return ()
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(f"example_inputs must be a tensor or a tuple of tensors, not {type(example_inputs).__name__}")


def elasticize(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    *,
    dims: Sequence[str] = ("width", "heads", "depth", "modules"),
    depth_mode: str = "prefix",
    width_ratios: Sequence[float] = (1.0, 0.75, 0.5, 0.25),
    heads_ratios: Sequence[float] = (1.0, 0.75, 0.5, 0.25),
    modules_ratios: Sequence[float] | None = None,
    exclude: Sequence[str] = (),
    sort: str | None = "auto",
    calibration: Iterable[Any] | None = None,
    recipe: dict[str, Any] | None = None,
) -> ElasticModel:
    """Turn a trained model into an elastic super-network, in place.

    The model's parameters are reused (not copied); after conversion the largest
    sub-network computes what the original did (fp32, max abs diff <= 1e-5). The smallest
    sub-network is run once on the example inputs; a group or stage whose smallest choice
    makes that fail (a rule that claims more than its module can run) is kept at full size,
    with the error as its reason in ``plan.not_elastic``.

    Args:
        model: any ``nn.Module`` (timm, torchvision, your own).
        example_inputs: positional inputs for tracing, e.g. a ``(1, 3, 224, 224)`` tensor;
            optional for timm, torchvision and models with an ``example_inputs`` attribute.
        dims: elastic dimensions: ``"width"`` (channels/features per coupling group),
            ``"heads"`` (attention heads), ``"depth"`` (residual blocks per stage), ``"modules"``
            (parallel modules of :class:`elasticize.tac.TACLinear` blocks; Subnetwork-to-go's width).
        depth_mode: ``"prefix"`` (SortedNet, arXiv 2309.00255: keep the first k blocks of each
            stage) or ``"skippable"`` (Adaptive Depth Networks, arXiv 2312.16392: each stage's
            second half is one skippable sub-path; norms in the mandatory half are switchable).
            Transformers also take ``"spaced"`` (a depth-k sub-network drops layers evenly and
            keeps the last, :mod:`elasticize.adapters.hf`; better for sentence encoders).
        width_ratios: fractions of each width group offered (SortedNet Table 1 uses 100/75/50/25%).
        heads_ratios: fractions of each attention's heads offered.
        modules_ratios: fractions of each TAC block's modules offered; None offers every ``w <= W``.
        exclude: ``fnmatch`` patterns of group or stage names to keep at full size.
        sort: how each group is permuted, most important unit first (function-preserving), so
            that small sub-networks keep the important units: ``"magnitude"`` (data-free weight
            norms), ``"activation"`` (each unit's contribution to the layers that read it on
            ``calibration``; better untrained transformer sub-networks, see
            :mod:`elasticize.importance`), ``"auto"`` (activation when ``calibration`` is given,
            else magnitude), or None (keep the order). The output on the example inputs is
            compared before and after; a kind of group whose sorting changed it keeps its order
            (``"sort": false`` and the reason in ``plan.not_elastic``).
        calibration: batches for ``sort="activation"`` (a tensor, ``(x, y)`` tuple or mapping
            of keyword inputs per batch, as the trainer takes them), e.g. 8 batches of 32.
        recipe: how to rebuild the base model on load, ``{"adapter", "name", "kwargs"}``;
            filled in by ``elasticize convert`` and :func:`elasticize.convert`.

    Returns:
        The :class:`ElasticModel` (wrapping ``model``).

    Raises:
        TypeError: if ``model`` is not an ``nn.Module`` or is already elastic.
        ValueError: if no example inputs can be found, the model cannot be traced, an option is
            unknown, ``sort="activation"`` comes without calibration batches (or calibration
            batches with another explicit ``sort``), or nothing could be made elastic (the
            message lists why, per module), also when every group and stage failed to run at
            its smallest.
        RuntimeError: if the smallest sub-network fails to run although every group and
            stage runs at its smallest alone (the message says what to exclude).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"elasticize() takes an nn.Module, not {type(model).__name__}")
    if isinstance(model, ElasticModel) or any(hasattr(m, "_el_tensors") for m in model.modules()):
        raise TypeError("this model is already elastic; elasticize the original model once")
    if sort not in ("auto", "magnitude", "activation", None):
        raise ValueError(f"sort must be 'auto', 'magnitude', 'activation' or None, not {sort!r}")
    if sort == "auto":
        sort = "magnitude" if calibration is None else "activation"
    if calibration is not None and sort != "activation":
        raise ValueError(f"calibration data is used only by sort='activation', and sort={sort!r} was asked for: "
                         "drop one of the two")
    if sort == "activation" and calibration is None:
        raise ValueError("sort='activation' ranks units on calibration data: pass calibration=[batch, ...] (a few "
                         "batches of real inputs), or use sort='magnitude'")
    inputs = _as_tuple(example_inputs)
    if not inputs:
        adapter: Adapter = adapter_for_model(model) or get_adapter("import")
        inputs = adapter.example_inputs(model)
    was_training = model.training
    model.eval()
    options = dict(dims=tuple(dims), depth_mode=depth_mode, width_ratios=tuple(width_ratios),
                   heads_ratios=tuple(heads_ratios), exclude=tuple(exclude))
    family = adapter_for_model(model)
    plan = family.plan(model, inputs, **options) if family is not None else None
    analysis = None
    if plan is None:
        analysis = analyze(model, inputs, find_rule)
        plan = build_plan(analysis, **options, modules_ratios=None if modules_ratios is None else tuple(modules_ratios))
    if not plan.groups and not plan.stages:
        reasons = "; ".join(f"{w}: {r}" for w, r in plan.not_elastic[:12]) or "no convolution, linear layer or block"
        raise ValueError(f"nothing in {type(model).__name__} could be made elastic ({reasons}). Add a rule for its "
                         "modules (see README, 'Your own rule') or choose other dims")
    order: dict[str, Any] = {"order": sort if plan.groups else None}
    if sort is not None and plan.groups:
        if sort == "activation":
            calibration = list(calibration)  # counted for the manifest, then read once
            order["calibration_batches"] = len(calibration)
        with torch.no_grad():
            ref = float_tensors(model(*inputs))
        scores = (activation_importance(model, plan, calibration) if sort == "activation"
                  else magnitude_importance(model, plan))
        perms = sort_by_importance(model, plan, scores)
        order_kept = _keep_function(model, plan, inputs, ref, scores, perms)
    else:
        order_kept = []
    _mark_unsorted(plan, order_kept)
    shapes = [list(t.shape) for t in inputs if isinstance(t, torch.Tensor)]
    em = ElasticModel(model, plan, recipe=recipe, input_shapes=shapes, importance=order)
    failing = _failing_dims(em, inputs)
    if failing:  # never ship a sub-network that cannot run: keep those groups and stages at full size
        _undo_surgery(model, plan)
        options["exclude"] = tuple(options["exclude"]) + tuple(failing)
        plan = (family.plan(model, inputs, **options) if analysis is None else
                build_plan(analysis, **options, modules_ratios=None if modules_ratios is None else tuple(modules_ratios)))
        for entry in plan.not_elastic:
            if entry[0] in failing:
                entry[1] = f"a sub-network with it at its smallest failed to run on the example inputs ({failing[entry[0]]})"
        _mark_unsorted(plan, order_kept)
        if not plan.groups and not plan.stages:
            reasons = "; ".join(f"{w}: {r}" for w, r in plan.not_elastic[:12])
            raise ValueError(f"nothing in {type(model).__name__} could be made elastic: every group and stage failed "
                             f"to run at its smallest ({reasons})")
        em = ElasticModel(model, plan, recipe=recipe, input_shapes=shapes, importance=order)
        still = _failing_dims(em, inputs)
        if still:
            raise RuntimeError(f"the smallest sub-network of {type(model).__name__} fails to run ({still}) although "
                               "each elastic group and stage runs alone; pass exclude=[...] to keep some at full "
                               "size, and please report it")
    em.train(was_training)
    return em


def _failing_dims(em: ElasticModel, inputs: tuple) -> dict[str, str]:
    """Groups and stages whose smallest choice makes the example forward fail, name -> error.

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
        dim = KIND_DIM.get(g["kind"], "width")
        smallest.setdefault(dim, {})[g["name"]] = g["choices"][-1]
        singles[g["name"]] = {dim: {g["name"]: g["choices"][-1]}}
    for st in em.plan.stages:
        smallest.setdefault("depth", {})[st["name"]] = st["choices"][-1]
        singles[st["name"]] = {"depth": {st["name"]: st["choices"][-1]}}
    first = error(smallest)
    if first is None:
        return {}
    blamed = {name: err for name, cfg in singles.items() if (err := error(cfg)) is not None}
    return blamed or {"<all at their smallest>": first}


def _same_function(model: nn.Module, inputs: tuple, ref: list[torch.Tensor], rtol: float = 1e-4) -> bool:
    """Whether ``model(*inputs)`` still gives ``ref``, within ``rtol`` of its largest magnitude."""
    with torch.no_grad():
        got = float_tensors(model(*inputs))
    return len(got) == len(ref) and all(
        a.shape == b.shape and bool((a - b).abs().max() <= rtol * max(1.0, b.abs().max().item())) for a, b in zip(got, ref))


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


def _keep_function(model: nn.Module, plan: Plan, inputs: tuple, ref: list[torch.Tensor],
                   scores: dict[str, torch.Tensor], perms: dict[str, list[int]]) -> list[str]:
    """Undo the importance order of each kind of group whose permutation changed the model's output.

    Sorting is function-preserving when the plan lists every tensor that shares a group's
    channels. A plan made from a family's known structure can miss one (Nyströmformer's
    depthwise convolution over the heads), so the output at full size is compared with the
    original's. Reordered float32 sums alone move a deep randomly initialised network's outputs
    by up to ~1e-3 of their magnitude (timm EfficientNetV2: 0.56 at logits of 816), so a
    difference above 1e-4 is confirmed in float64, where reordering moves them by ~1e-13: each
    kind (``width``, ``heads``, ``hidden``) whose order still changes the output by more than
    1e-9 is put back.

    Returns:
        The kinds that keep the original order.
    """
    if not perms or _same_function(model, inputs, ref):
        return []

    def permute(by: dict[str, torch.Tensor]) -> None:
        sort_by_importance(model, dataclasses.replace(plan, groups=[g for g in plan.groups if g["name"] in by]), by)

    def undo(names: list[str]) -> None:  # the inverse permutation: argsort of the one applied
        permute({n: -torch.tensor(perms[n], dtype=torch.float64) for n in names})

    kinds: dict[str, list[str]] = {}
    for g in plan.groups:
        if g["name"] in perms:
            kinds.setdefault(g["kind"], []).append(g["name"])
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


def _mark_unsorted(plan: Plan, kinds: list[str]) -> None:
    """Record that the groups of ``kinds`` keep their original order, and why."""
    for kind in kinds:
        for g in plan.groups:
            if g["kind"] == kind:
                g["sort"] = False
        plan.not_elastic.append([kind, "kept in the original order: sorting by importance changed the full model's "
                                       "output on the example inputs (a tensor outside the plan shares these channels)"])


def _undo_surgery(model: nn.Module, plan: Plan) -> None:
    """Give ``model`` back its plain modules, dropping the switchable-norm tensors ``plan`` added."""
    remove_elastic(model, freeze=False)
    for module in plan.switchable:
        m = model.get_submodule(module)
        for d in (m._parameters, m._buffers):
            for k in [k for k in d if k.startswith(SWITCH_PREFIX)]:
                del d[k]


def convert(spec: str, *, pretrained: bool = True, kwargs: dict[str, Any] | None = None,
            weights: str | None = None, example_inputs: Any = None, **options: Any) -> ElasticModel:
    """Build a model by name and elasticize it, recording the recipe so ``load`` can rebuild it.

    Args:
        spec: ``resnet50`` (timm), ``torchvision:resnet50``, ``package.module:builder`` (imported with
            the current folder first on the import path, or the :func:`elasticize.adapters.app_dir`
            folder), a Hugging Face folder or ``hf:HUB_ID`` (its tokenizer files go into :attr:`ElasticModel.files`).
        pretrained: fetch pretrained weights (fails offline with a message naming the way out).
        kwargs: keyword arguments for the builder (JSON-native, stored in the recipe).
        weights: a ``.safetensors`` state dict to load into the model before conversion.
        example_inputs: as in :func:`elasticize`.
        **options: the keyword options of :func:`elasticize`; ``calibration`` may also be the
            path of an image folder or a text file (one sample per line), of which 8 batches of
            32 rank the units.

    Raises:
        KeyError: unknown model name (with close matches).
        RuntimeError: pretrained weights unavailable.
        ValueError: a weights file that is not safetensors or does not fit the model.
        FileNotFoundError, ValueError: a calibration path that is missing or holds no usable
            data (see :func:`elasticize.train.data.calibration_batches`).
    """
    from .adapters import resolve_spec

    adapter_name, name = resolve_spec(spec)
    adapter = get_adapter(adapter_name)
    kw = dict(kwargs or {})
    model = adapter.build(name, pretrained=pretrained and weights is None, kwargs=kw)
    if weights is not None:
        load_weights_file(model, weights)
    recipe = adapter.recipe(model, name, kw)
    recipe["pretrained"] = bool(pretrained or weights is not None)  # the trainer distills from the original then
    files = adapter.files(name)
    if isinstance(options.get("calibration"), (str, os.PathLike)):
        from .train.data import calibration_batches

        shapes = [list(t.shape) for t in (_as_tuple(example_inputs) or adapter.example_inputs(model))
                  if isinstance(t, torch.Tensor)]
        options["calibration"] = calibration_batches(options["calibration"], input_shapes=shapes, recipe=recipe,
                                                     files=files)
    em = elasticize(model.eval(), example_inputs, recipe=recipe, **options)
    em.files = files
    if adapter_name == "hf" and os.path.isdir(name):
        em.source_dir = os.path.abspath(name)
    return em

