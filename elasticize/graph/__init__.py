"""Graph analysis: coupling groups, residual blocks, attention heads and MAC terms.

The model is traced with ``torch.fx`` (a submodule whose ``forward`` cannot be traced
becomes a leaf, and the reason is recorded, as NVIDIA ModelOpt's tracer does); when
the top-level ``forward`` itself cannot be traced, ``torch.export`` (non-strict) is
used instead, and parameters are found through its graph signature. Shapes come
from running the graph once on the example inputs. PyTorch's ``nn.TransformerEncoder``,
``nn.TransformerDecoder`` and ``nn.Transformer`` branch on their inputs' properties; they are
traced through equivalent loops over their layers.

Every axis of every tensor is a *slot*; an op that makes two axes share one channel
index space joins their slots (union-find). A parameter axis joined to a convolution
or linear output axis, across residual adds, concatenations, depthwise convolutions,
norms and reshapes, ends in one **coupling group**: a single width decision slices
every member (the dependency-graph idea of Torch-Pruning, Fang et al., CVPR 2023).
A group that touches a model input or output, a hard-coded reshape size, or an op
elasticize does not know is *fixed*, and the reason is kept for the report.

Modules, in the order the analysis uses them:

* :mod:`.tracing`: ``torch.fx`` / ``torch.export`` tracing, the ``nn.Transformer*`` stand-ins;
* :mod:`.coupling`: the union-find over slots;
* :mod:`.propagator` and :mod:`.visit`: the propagation state and the pass over the nodes;
* :mod:`.ops`: the op handlers, one registered table (:func:`elasticize.graph.ops.registered_ops`);
* :mod:`.context`: :class:`SiteContext`, the API rules use;
* :mod:`.stages`: residual blocks and stages;
* :mod:`.macs`: MAC terms;
* :mod:`.results` and :mod:`.analysis`: what :func:`analyze` returns, and how it is collected.
"""

from __future__ import annotations

from .analysis import analyze
from .context import SiteContext
from .coupling import Coupling  # noqa: F401  (module-level names of the old graph.py, still importable)
from .ops import canonical  # noqa: F401
from .results import Analysis, GroupInfo, MacTerm, StageInfo, model_tensors

__all__ = ["Analysis", "GroupInfo", "StageInfo", "MacTerm", "SiteContext", "analyze", "model_tensors"]
