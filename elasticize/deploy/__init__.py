"""Deploying a sub-network where users run it: ONNX (:func:`to_onnx`) and sentence-transformers
folders (:func:`save_sentence_transformers`).

Both export the *dense* sub-network (:meth:`elasticize.ElasticModel.extract`), never the elastic
model; :func:`to_onnx` checks onnxruntime against eager PyTorch before it keeps the file. The
Deploy guide covers ``torch.compile`` and why there is no ``.pt2`` export.
"""

from .onnx import OnnxExport, example_inputs, to_onnx
from .sentence import save_sentence_transformers

__all__ = ["OnnxExport", "to_onnx", "example_inputs", "save_sentence_transformers"]
