"""The :class:`ElasticModel`: a super-network, its sub-networks, and what it tells about them."""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from .calibrated import CalibratedTensors
from .calibration import Compensation
from .export import LiveTensors, extract
from .plan import KIND_DIM, Plan, apply_plan
from .space import Config, SearchSpace

__all__ = ["ElasticModel", "SubnetLike"]

SubnetLike = str | Mapping[str, Any] | None


class _WrappedSignature:
    """Method descriptor: ``em.forward`` runs the method, and its signature is ``em.model.forward``'s, so
    tools that pick a batch's columns by it (Hugging Face ``Trainer``'s ``remove_unused_columns``) see the
    original model's inputs."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.__doc__ = fn.__doc__

    def __get__(self, em: Any, owner: type | None = None) -> Any:
        return self.fn if em is None else _BoundForward(self.fn, em)


class _BoundForward:
    """``em.forward`` bound to one model; ``__signature__`` is computed when asked for."""

    __slots__ = ("_fn", "_em")

    def __init__(self, fn: Any, em: Any) -> None:
        self._fn, self._em = fn, em

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(self._em, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        try:
            return inspect.signature(self._em.model.forward)
        except (TypeError, ValueError):  # a builtin forward: the method's own (*args, **kwargs)
            return inspect.signature(functools.partial(self._fn, self._em))


class ElasticModel(CalibratedTensors, nn.Module):
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
        compensation: bias compensation (FLAP, :mod:`elasticize.calibration`): the consumers' calibration
            means and each preset's compensated biases, installed with its BN statistics. Set with
            :meth:`set_compensation`.
        measurements: what ``elasticize eval`` / :func:`elasticize.evaluate` measured (:mod:`elasticize.measured`), keyed by
            device and batch size.
        files: small files that travel with the model, file name -> contents: a Hugging Face model's
            tokenizer, generation and preprocessor files (:data:`elasticize.adapters.hf.TOKENIZER_FILES`),
            read from its folder by :func:`elasticize.convert`, kept inside the saved file and written into
            exported Hugging Face folders (:meth:`save_pretrained`).
        source_dir: the Hugging Face folder :func:`elasticize.convert` built this model from in this process
            (None otherwise; never saved): :meth:`save_pretrained` refuses to write into it, and copies
            its tokenizer files from it when they were too large to store (:data:`~elasticize.adapters.hf.FILES_CAP`).
        conversion: the passes :func:`elasticize.elasticize` ran and the fallback steps it took
            (:func:`elasticize.conversion.run`), JSON-native; None for a model loaded from a file
            (whose plan still gives each fallback's reason in ``not_elastic``). Never saved.
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
        self.conversion: dict[str, Any] | None = None
        self._state = apply_plan(model, plan)
        self._active: Config = self.space.full()
        self._resolved: dict[str, Config] = {}
        self.bn_stats: dict[str, dict[str, torch.Tensor]] = {}
        self._bn_live: str | None = None  # preset whose statistics are in the buffers now
        self._bn_trained: dict[str, torch.Tensor] = {}  # the trained values they replaced
        self.compensation = Compensation()
        self.measurements: dict[str, Any] = {}
        # Set by a training loop's integration (ElasticCallback in a plain transformers.Trainer): a call
        # in training mode with gradients on runs a whole step's passes instead of one forward.
        self.step_forward: Any = None

    @_WrappedSignature
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the active sub-network; inputs, outputs and ``inspect.signature`` are the original model's.

        While a training integration has set :attr:`step_forward` (see
        :class:`elasticize.integrations.transformers.ElasticCallback`), a call in training mode with
        gradients enabled runs that step's passes instead and returns their summed loss.
        """
        if self.step_forward is not None and self.training and torch.is_grad_enabled():
            return self.step_forward(*args, **kwargs)
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
        if self.compensation.means or name in self.compensation.presets:  # recomputed for the new sub-network
            self.set_compensation(self.compensation.means)
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
        if self.bn_stats or self.compensation.presets or self._bn_live is not None:
            name = subnet if isinstance(subnet, str) and subnet in self.presets else self._calibrated_name(cfg)
            self._install_bn(name)
        return cfg

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
               max_latency_s: float | None = None, metric: str | None = None, measurement: str | None = None,
               with_name: bool = False) -> Any:
        """A sub-network within the budget: the best measured one when there are measurements.

        With :attr:`measurements` (``elasticize eval``): the measured sub-network (preset, candidate or
        solver pick) with the best metric within every bound, latency from the same measurement
        (:func:`elasticize.measured.best_measured`; ``measurement`` picks a device/batch-size key, default
        the first). Without: with ``metric`` or ``max_latency_s``, the measured preset with the best
        value in :attr:`metrics` (ties: more MACs); else the largest nested sub-network within the
        MACs/params budget (:meth:`SearchSpace.select`, SortedNet's search-free extraction).

        Returns:
            The configuration, or ``(preset name or None, configuration)`` with ``with_name``.

        Raises:
            ValueError: no bound given, or no (measured) sub-network meets them; the message
                says what was measured.
        """
        from .measured import best_measured, best_preset

        if self.measurements:
            cfg = best_measured(self, max_macs=max_macs, max_params=max_params, max_latency_s=max_latency_s,
                                metric=metric, key=measurement)
        elif metric is None and max_latency_s is None:
            cfg = self.space.select(max_macs=max_macs, max_params=max_params)
        else:
            cfg = self.resolve(best_preset(self, max_macs, max_params, max_latency_s, metric))
        return (self.preset_name(cfg), cfg) if with_name else cfg

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
        """What became elastic and what did not, as JSON-native values (what ``elasticize inspect`` prints).

        ``conversion`` names the passes of the conversion and the fallback steps taken
        (see :attr:`conversion`; None for a loaded model).
        """
        return {
            "tracer": self.plan.tracer,
            **self.space.dimensions,
            "not_elastic": [x.to_json() for x in self.plan.not_elastic],
            "presets": {n: {"macs": self.macs(n), "params": self.params(n)} for n in self.presets},
            "conversion": self.conversion,
        }

    # ------------------------------------------------------------ display
    def active_name(self) -> str | None:
        """The name of the preset that the active sub-network is, if any (``full`` for the largest)."""
        return self.preset_name(self._active)

    def preset_name(self, cfg: Config) -> str | None:
        """The name of the preset that the resolved ``cfg`` is, if any."""
        return next((n for n in self.presets if self.resolve(n) == cfg), None)

    def extra_repr(self) -> str:
        """The active sub-network, its MACs and params; the modules below print their active sizes."""
        name = self.active_name()
        which = repr(name) if name is not None else f"custom {self._active}"
        return (f"active={which}, macs={self.macs(self._active):,} of {self.macs('full'):,}, "
                f"params={self.params(self._active):,} of {self.params('full'):,}")

    def summary(self, subnet: SubnetLike = None) -> Any:
        """A rich table of ``subnet`` (default: the active sub-network): every coupling group and
        stage with its size there, its full size and its choices; MACs per sample (FLOPs = 2 x MACs)
        and params in the caption. Print it with ``rich.print(em.summary())``.

        Returns:
            A :class:`rich.table.Table`.

        Raises:
            KeyError, ValueError, TypeError: for a sub-network outside the search space.
        """
        return _summary_table(self, self._active if subnet is None else self.resolve(subnet))


def _summary_table(em: ElasticModel, cfg: Config) -> Any:
    """The table of :meth:`ElasticModel.summary` for the resolved ``cfg``."""
    from rich.table import Table

    name = next((n for n in em.presets if em.resolve(n) == cfg), None)
    full_macs, full_params = em.macs("full"), em.params("full")
    macs, params = em.macs(cfg), em.params(cfg)
    table = Table(title=f"ElasticModel({type(em.model).__name__}) at {repr(name) if name else 'a custom sub-network'}",
                  caption=f"MACs per sample {macs:,} of {full_macs:,} ({100 * macs / max(full_macs, 1):.1f}%); "
                          f"params {params:,} of {full_params:,} ({100 * params / max(full_params, 1):.1f}%)")
    for col in ("group or stage", "kind", "active", "full", "choices"):
        table.add_column(col, justify="right" if col in ("active", "full") else "left")
    rows = [(g.name, g.kind, KIND_DIM.get(g.kind, "width"), g.choices) for g in em.plan.groups]
    rows += [(st.name, "depth", "depth", st.choices) for st in em.plan.stages]
    for name_, kind, dim, choices in rows:  # sizes in the units of the choices: channels, heads, blocks, modules
        table.add_row(name_, kind, str(cfg[dim][name_]), str(choices[0]), ", ".join(map(str, choices)))
    return table
