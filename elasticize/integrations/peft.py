"""LoRA on elastic models: PEFT adapters whose ranks follow the coupling groups of the layers they adapt.

A LoRA layer (Hu et al., LoRA, arXiv 2106.09685, Eq. 3) computes ``h = W x + (α/r) · B A x``
with ``A`` of shape ``(r, in_features)`` and ``B`` of shape ``(out_features, r)``. PEFT wraps
the elastic ``nn.Linear`` and adds ``B A x`` at full size, so at any smaller sub-network the
sliced base output (``(..., 48)`` of a 64-wide layer at 75% of its heads) and the LoRA output
(``(..., 64)``) no longer add: "size mismatch 48 vs 64". Here the columns of ``A`` follow the
coupling group of the base layer's input axis and the rows of ``B`` (and its bias) that of its
output axis, with the same chunks (fused q/k/v rows) and divisors (grouped-query attention):
at every sub-network the LoRA layer reads the same prefix of input features and writes the
same prefix of output features as its base layer, so

``h_sub = W[:o, :i] x[:i] + (α/r) · B[:o] A[:, :i] x[:i] = (W + (α/r) B A)[:o, :i] x[:i]``:

the LoRA model at a sub-network is the elastic model at that sub-network with its LoRA delta
added, and merging (at the full sub-network, where every view is the whole tensor) gives an
elastic model whose sub-networks equal the unmerged ones. The rank ``r`` itself is not elastic.

    >>> from peft import LoraConfig
    >>> from elasticize.integrations.peft import add_lora, merge_lora
    >>> lora = add_lora(em, LoraConfig(r=8, target_modules=["query", "value"]))
    >>> ...                                   # train: em(**batch) at any sub-network
    >>> merge_lora(em, lora)                  # em is a plain elastic model again: save, extract

``elasticize(peft_model)`` refuses with a message that says to merge and convert first.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..model import ElasticModel
from ..modules import is_elastic, make_elastic
from ._optional import require

__all__ = ["add_lora", "follow_coupling", "merge_lora"]


def add_lora(em: ElasticModel, config: Any, *, adapter_name: str = "default") -> Any:
    """Add PEFT LoRA adapters to ``em``'s model in place, elastic along their layers' coupling groups.

    Builds ``peft.LoraModel(em.model, config, adapter_name)`` at the full sub-network (PEFT
    reads the base layers' full sizes) and then calls :func:`follow_coupling`. ``em`` runs the
    adapted model at every sub-network; only the adapters are trainable (PEFT's default).
    Saving or extracting needs :func:`merge_lora` first (the adapters rename the base layers).

    Args:
        em: the elastic model.
        config: a ``peft.LoraConfig``.
        adapter_name: the adapter's name.

    Returns:
        The ``peft.LoraModel`` (its ``model`` is ``em.model``).

    Raises:
        ImportError: peft is not installed.
        TypeError: ``em`` is not an :class:`ElasticModel`, ``config`` is not a ``LoraConfig``, or
            an adapted layer is not supported (see :func:`follow_coupling`).
    """
    peft = require("peft", "integrations")
    if not isinstance(em, ElasticModel):
        raise TypeError(f"add_lora takes an ElasticModel, not {type(em).__name__}; elasticize the model first")
    if not isinstance(config, peft.LoraConfig):
        raise TypeError(f"add_lora takes a peft.LoraConfig, not {type(config).__name__}")
    with em.subnet(None):
        lora = peft.LoraModel(em.model, config, adapter_name)
    follow_coupling(em)
    return lora


def follow_coupling(em: ElasticModel) -> list[str]:
    """Make the ``A`` and ``B`` matrices of every LoRA layer in ``em`` follow their base layer's groups.

    For a base weight ``(out, in)`` (``(in, out)`` for ``fan_in_fan_out`` layers such as GPT-2's
    ``Conv1D``), ``A``'s columns take the base's input-axis slicing and ``B``'s rows (and bias)
    its output-axis slicing. Call it again after adding another adapter with PEFT's own API
    (``add_adapter``); layers already done are left as they are.

    Returns:
        The paths of the LoRA layers over elastic base layers (done now or before).

    Raises:
        ImportError: peft is not installed.
        TypeError: a LoRA layer over an elastic base layer that is not a Linear one (LoRA on
            elastic embeddings or convolutions is not supported: target Linear layers), or one
            with DoRA (its magnitude vector is not elastic).
    """
    require("peft", "integrations")
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora import Linear as LoraLinear

    done = []
    for path, mod in em.model.named_modules():
        if not isinstance(mod, LoraLayer) or not is_elastic(mod.get_base_layer()):
            continue
        if not isinstance(mod, LoraLinear):
            raise TypeError(f"{path}: LoRA on an elastic {type(mod.get_base_layer()).__name__} is not supported; "
                            "target the Linear layers (LoraConfig(target_modules=[...]))")
        if any(mod.use_dora.values()):
            raise TypeError(f"{path}: DoRA's magnitude vector is not elastic; use plain LoRA (use_dora=False)")
        spec = mod.get_base_layer().__dict__["_el_tensors"].get("weight", ())
        out_axis, in_axis = (1, 0) if mod.fan_in_fan_out else (0, 1)
        a_spec = tuple((1, g, c, d) for axis, g, c, d in spec if axis == in_axis)
        b_spec = tuple((0, g, c, d) for axis, g, c, d in spec if axis == out_axis)
        for a in mod.lora_A.values():
            _make(a, {"weight": a_spec})
        for b in mod.lora_B.values():
            _make(b, {"weight": b_spec, **({"bias": b_spec} if b.bias is not None else {})})
        done.append(path)
    return done


def _make(layer: nn.Module, tensors: dict[str, tuple]) -> None:
    """Give ``layer`` the sliced views of ``tensors`` (nothing when no axis is elastic or it already is)."""
    if not is_elastic(layer) and any(tensors.values()):
        make_elastic(layer, tensors=tensors)


def merge_lora(em: ElasticModel, lora: Any) -> ElasticModel:
    """Merge the LoRA adapters into ``em``'s weights (``W += (α/r) B A``) and remove them.

    Runs PEFT's ``merge_and_unload`` at the full sub-network, where each elastic view is the
    whole tensor, so the whole weight is updated; every sub-network of the merged model then
    equals the unmerged one at that sub-network (see the module docstring). The base layers get
    their names back, so ``em`` can be saved, extracted and trained as before.

    Args:
        em: the elastic model :func:`add_lora` adapted.
        lora: the ``peft.LoraModel`` (or ``PeftModel``) :func:`add_lora` returned.

    Returns:
        ``em``, with the active sub-network it had.

    Raises:
        ValueError: ``lora`` does not wrap ``em.model``.
    """
    base = lora.get_base_model() if hasattr(lora, "get_base_model") else getattr(lora, "model", None)
    if base is not em.model:
        raise ValueError("this LoRA model does not wrap em.model; pass the object add_lora(em, ...) returned")
    with em.subnet(None):
        merged = lora.merge_and_unload()
    if merged is not em.model:
        raise ValueError("merge_and_unload returned another model than em.model; merge in place")
    return em
