"""The elasticize file format: the checked safetensors header (:mod:`~elasticize.fileformat.header`)
and the checked manifest with its per-preset tables (:mod:`~elasticize.fileformat.manifest`).
Reading never builds a model or imports code a file names."""
