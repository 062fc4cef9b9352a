"""The audited op table: every op of ``torch.nn.functional`` and every op a sweep of real models meets, with
what the analysis does with it.

``audit.json`` (written by ``scripts/op_sweep.py``) lists the ops and the sources each was seen in; each op
gets a :class:`Row`: *handled* (a handler in :func:`elasticize.graph.ops.registered_ops`, and how it couples
axes), *passed by* (a value that is not a tensor: sizes, asserts), *fixed* (the op fixes its axes, for the
reason given) or *unsupported* (no handler yet, with what one would need). The docs' op table
(``docs/reference/ops.md``) is rendered from :func:`rows`, and the tests check every audited op has one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

from .registry import registered_ops
from .sizes import NON_TENSOR, SIZE_ARITHMETIC

__all__ = ["Row", "rows", "audited_ops", "FIXED", "UNSUPPORTED"]

_LOSS = "a loss: it reduces its inputs to a scalar, which is a model output (never sliced); its inputs are fixed"
_INDEX = ("indexing or building a tensor from indices (positions, masks, ids): its axes are not channels and "
          "are fixed")
#: ops that fix their inputs' and output's axes, and why (the op is understood; fixing is the right answer)
FIXED: dict[str, str] = {
    **{n: _LOSS for n in ("binary_cross_entropy", "binary_cross_entropy_with_logits", "cosine_embedding_loss",
                          "cross_entropy", "ctc_loss", "gaussian_nll_loss", "hinge_embedding_loss", "huber_loss",
                          "kl_div", "l1_loss", "linear_cross_entropy", "margin_ranking_loss", "mse_loss",
                          "multi_margin_loss", "multilabel_margin_loss", "multilabel_soft_margin_loss", "nll_loss",
                          "poisson_nll_loss", "smooth_l1_loss", "soft_margin_loss", "triplet_margin_loss",
                          "triplet_margin_with_distance_loss")},
    **{n: _INDEX for n in ("arange", "index", "index_select", "gather", "scatter", "scatter_add", "nonzero",
                           "argmax", "argmin", "argsort", "sort", "topk", "new_ones", "new_zeros", "new_full",
                           "new_empty", "new_tensor", "zeros", "ones", "full", "empty", "zeros_like", "ones_like",
                           "full_like", "empty_like", "rand", "randn", "randn_like", "rand_like", "tensor",
                           "triu", "tril", "diff", "slice", "select", "masked_select", "bucketize", "searchsorted",
                           "meshgrid", "linspace", "outer", "any", "all", "logical_not", "logical_and",
                           "logical_or", "bitwise_not", "and", "or", "invert", "xor", "isinf", "isnan", "isfinite",
                           "floor", "ceil", "round", "trunc", "frac", "long", "int", "bool", "item", "tolist",
                           "flatten_indices", "diagonal", "diag", "eye", "unique", "repeat_interleave", "histc",
                           "index_put")},
    "affine_grid": "builds sampling coordinates from an affine matrix: its last axis is (x, y), not channels",
    "max_pool1d_with_indices": "returns (values, indices): the indices are positions, fixed",
    "max_pool3d_with_indices": "returns (values, indices): the indices are positions, fixed",
    "adaptive_max_pool1d_with_indices": "returns (values, indices): the indices are positions, fixed",
    "adaptive_max_pool2d_with_indices": "returns (values, indices): the indices are positions, fixed",
    "adaptive_max_pool3d_with_indices": "returns (values, indices): the indices are positions, fixed",
    "fractional_max_pool2d_with_indices": "returns (values, indices): the indices are positions, fixed",
    "fractional_max_pool3d_with_indices": "returns (values, indices): the indices are positions, fixed",
}
#: ops with no handler yet: they fix their axes as ``unsupported op <name>``; what a handler would need
UNSUPPORTED: dict[str, str] = {
    "bilinear": "F.bilinear's weight (out, in1, in2) couples two inputs with one output; no handler yet",
    "conv_tbc": "time-batch-channel convolution (fairseq): no handler yet",
    "cosine_similarity": "reduces two broadcast tensors along an axis; no handler yet",
    "pairwise_distance": "reduces two broadcast tensors along the last axis; no handler yet",
    "pdist": "pairwise distances of the rows: its output's size is n (n - 1) / 2, not an axis of the input",
    "grouped_mm": "grouped (mixture-of-experts) matmul over ragged groups: no handler yet",
    "scaled_mm": "fp8 scaled matmul: no handler yet",
    "scaled_grouped_mm": "fp8 grouped matmul: no handler yet",
    "max_unpool1d": "scatters values to positions given by indices: no handler yet",
    "max_unpool2d": "scatters values to positions given by indices: no handler yet",
    "max_unpool3d": "scatters values to positions given by indices: no handler yet",
    "addmm": "torch.addmm(b, x, W) (GPT-2's Conv1D, export graphs): no handler yet; transformers models are "
             "planned by their family adapter, not traced",
    "baddbmm": "batched addmm (BLOOM's attention scores): no handler yet; planned by the transformers adapter",
    "grouped_mm_fallback": "mixture-of-experts grouped matmul (transformers): no handler yet",
    "numpy_T": "Tensor.T as export records it: no handler yet",
    "multi_head_attention_forward": "the functional form of nn.MultiheadAttention, whose module a rule handles "
                                    "(multihead_attention); the function alone has no handler",
}


@dataclass(frozen=True)
class Row:
    """One audited op.

    Attributes:
        status: ``"handled"``, ``"passed by"``, ``"fixed"`` or ``"unsupported"``.
        how: how it couples axes (handled), or why it is fixed or unsupported.
        handler: the handler's qualified name, for a handled op; else ``""``.
    """

    status: str
    how: str
    handler: str = ""


def audited_ops() -> dict[str, list[str]]:
    """The sweep's ops (``audit.json``): canonical op name -> the sources it was seen in."""
    return json.loads(resources.files(__package__).joinpath("audit.json").read_text())["ops"]


def rows() -> dict[str, Row]:
    """Every audited and every registered op -> its :class:`Row`, sorted by name; an audited op with no
    handler and no entry in :data:`FIXED` or :data:`UNSUPPORTED` is unsupported with no reason (which the
    tests refuse)."""
    handled = registered_ops()
    out: dict[str, Row] = {}
    for name in sorted(set(audited_ops()) | set(handled) | set(FIXED) | set(UNSUPPORTED)):
        if name in handled:
            out[name] = Row("handled", handled[name].couples, handled[name].handler)
        elif name in NON_TENSOR or name in SIZE_ARITHMETIC:
            out[name] = Row("passed by", "not a tensor (a size, a dimension count or an assert): no axes to couple")
        elif name in FIXED:
            out[name] = Row("fixed", FIXED[name])
        else:
            out[name] = Row("unsupported", UNSUPPORTED.get(name, ""))
    return out
