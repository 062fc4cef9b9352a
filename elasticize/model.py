"""The public entry points of conversion: ``elasticize(model)`` and ``convert(name)``.

They check and gather the options (:class:`~elasticize.options.ConvertOptions`) and run the passes of
:mod:`elasticize.conversion`; the :class:`ElasticModel` they return lives in
:mod:`elasticize.elastic` (re-exported here).
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from .adapters import get_adapter, resolve_spec
from .conversion import as_tuple, check_model, run
from .elastic import ElasticModel, SubnetLike
from .options import ConvertOptions, options_from
from .tensorfile import load_weights_file

__all__ = ["ElasticModel", "ConvertOptions", "SubnetLike", "elasticize", "convert"]


#: The keyword options' defaults of :func:`elasticize` and :func:`convert`: those of :class:`ConvertOptions`.
_DEFAULT = ConvertOptions()


def elasticize(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    options: ConvertOptions | None = None,
    *,
    dims: Sequence[str] = _DEFAULT.dims,
    depth_mode: str = _DEFAULT.depth_mode,
    width_ratios: Sequence[float] = _DEFAULT.width_ratios,
    heads_ratios: Sequence[float] = _DEFAULT.heads_ratios,
    modules_ratios: Sequence[float] | None = _DEFAULT.modules_ratios,
    exclude: Sequence[str] = _DEFAULT.exclude,
    sort: str | None = _DEFAULT.sort,
    calibration: Iterable[Any] | None = None,
    recipe: dict[str, Any] | None = None,
) -> ElasticModel:
    """Turn a trained model into an elastic super-network, in place.

    The model's parameters are reused (not copied); after conversion the largest
    sub-network computes what the original did (fp32, max abs diff <= 1e-5). The smallest
    sub-network is run once on the example inputs; a group or stage whose smallest choice
    makes that fail (a rule that claims more than its module can run) is kept at full size,
    with the error as its reason in ``plan.not_elastic``.

    Conversion runs as explicit passes (analyze -> plan -> sort -> verify -> apply, see
    :mod:`elasticize.conversion`); :attr:`ElasticModel.conversion` names the passes run and the
    fallback steps taken.

    Args:
        model: any ``nn.Module`` (timm, torchvision, your own).
        example_inputs: positional inputs for tracing, e.g. a ``(1, 3, 224, 224)`` tensor;
            optional for timm, torchvision and models with an ``example_inputs`` attribute.
        options: the options below as one :class:`~elasticize.ConvertOptions` (then leave the
            keyword options at their defaults).
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
        TypeError: if ``model`` is not an ``nn.Module`` or is already elastic, an option has the
            wrong type (a string for ``dims``), or ``options`` comes with keyword options.
        ValueError: if no example inputs can be found, the model cannot be traced, an option is
            unknown, ``sort="activation"`` comes without calibration batches (or calibration
            batches with another explicit ``sort``), or nothing could be made elastic (the
            message lists why, per module), also when every group and stage failed to run at
            its smallest.
        RuntimeError: if the smallest sub-network fails to run although every group and
            stage runs at its smallest alone (the message says what to exclude).
    """
    check_model(model)
    opts = options_from(options, dims=dims, depth_mode=depth_mode, width_ratios=width_ratios,
                        heads_ratios=heads_ratios, modules_ratios=modules_ratios, exclude=exclude, sort=sort)
    return run(model, example_inputs, opts, calibration=calibration, recipe=recipe)


def convert(
    spec: str,
    *,
    pretrained: bool = True,
    kwargs: dict[str, Any] | None = None,
    weights: str | None = None,
    example_inputs: Any = None,
    options: ConvertOptions | None = None,
    dims: Sequence[str] = _DEFAULT.dims,
    depth_mode: str = _DEFAULT.depth_mode,
    width_ratios: Sequence[float] = _DEFAULT.width_ratios,
    heads_ratios: Sequence[float] = _DEFAULT.heads_ratios,
    modules_ratios: Sequence[float] | None = _DEFAULT.modules_ratios,
    exclude: Sequence[str] = _DEFAULT.exclude,
    sort: str | None = _DEFAULT.sort,
    calibration: Iterable[Any] | str | os.PathLike | None = None,
) -> ElasticModel:
    """Build a model by name and elasticize it, recording the recipe so ``load`` can rebuild it.

    Args:
        spec: ``resnet50`` (timm), ``torchvision:resnet50``, ``package.module:builder`` (imported with
            the current folder first on the import path, or the :func:`elasticize.adapters.app_dir`
            folder), a Hugging Face folder or ``hf:HUB_ID`` (its tokenizer files go into :attr:`ElasticModel.files`).
        pretrained: fetch pretrained weights (fails offline with a message naming the way out).
        kwargs: keyword arguments for the builder (JSON-native, stored in the recipe).
        weights: a ``.safetensors`` state dict to load into the model before conversion.
        example_inputs: as in :func:`elasticize`.
        options: a :class:`~elasticize.options.ConvertOptions`, as in :func:`elasticize`.
        dims: as in :func:`elasticize`.
        depth_mode: as in :func:`elasticize`.
        width_ratios: as in :func:`elasticize`.
        heads_ratios: as in :func:`elasticize`.
        modules_ratios: as in :func:`elasticize`.
        exclude: as in :func:`elasticize`.
        sort: as in :func:`elasticize`.
        calibration: as in :func:`elasticize`, or the path of an image folder or a text file (one
            sample per line), of which 8 batches of 32 rank the units.

    Raises:
        TypeError, ValueError: as :func:`elasticize`.
        KeyError: unknown model name (with close matches).
        RuntimeError: pretrained weights unavailable.
        ValueError: a weights file that is not safetensors or does not fit the model.
        FileNotFoundError, ValueError: a calibration path that is missing or holds no usable
            data (see :func:`elasticize.train.data.calibration_batches`).
    """
    opts = options_from(options, dims=dims, depth_mode=depth_mode, width_ratios=width_ratios,
                        heads_ratios=heads_ratios, modules_ratios=modules_ratios, exclude=exclude, sort=sort)
    adapter_name, name = resolve_spec(spec)
    adapter = get_adapter(adapter_name)
    kw = dict(kwargs or {})
    model = adapter.build(name, pretrained=pretrained and weights is None, kwargs=kw)
    if weights is not None:
        load_weights_file(model, weights)
    recipe = adapter.recipe(model, name, kw)
    recipe["pretrained"] = bool(pretrained or weights is not None)  # the trainer distills from the original then
    files = adapter.files(name)
    if isinstance(calibration, (str, os.PathLike)):
        from .train.data import calibration_batches

        shapes = [list(t.shape) for t in (as_tuple(example_inputs) or adapter.example_inputs(model))
                  if isinstance(t, torch.Tensor)]
        calibration = calibration_batches(calibration, input_shapes=shapes, recipe=recipe, files=files)
    em = elasticize(model.eval(), example_inputs, opts, calibration=calibration, recipe=recipe)
    em.files = files
    if adapter_name == "hf" and os.path.isdir(name):
        em.source_dir = os.path.abspath(name)
    return em
