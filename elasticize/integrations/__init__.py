"""Train elastic models where users already train: Hugging Face ``Trainer``, Lightning, accelerate, PEFT.

Each module needs its own optional dependency and is imported on its own; nothing here is
imported by :mod:`elasticize` itself.

* :mod:`elasticize.integrations.transformers`: :class:`~elasticize.integrations.transformers.ElasticCallback`
  and :class:`~elasticize.integrations.transformers.ElasticTrainer` for ``transformers.Trainer``;
* :mod:`elasticize.integrations.lightning`: :class:`~elasticize.integrations.lightning.ElasticLightningCallback`
  and :class:`~elasticize.integrations.lightning_io.SafetensorsCheckpointIO` (Lightning checkpoints
  without pickle, over :mod:`elasticize.integrations.checkpoint_dict`, which saves any resume dict
  as safetensors + JSON and needs no optional dependency);
* :mod:`elasticize.integrations.peft`: LoRA adapters that follow the coupling groups of the layers
  they adapt (:func:`~elasticize.integrations.peft.add_lora`, :func:`~elasticize.integrations.peft.merge_lora`).

The sampling, the passes of each strategy and their losses are those of :mod:`elasticize.train`
(:class:`~elasticize.integrations.session.ElasticSession` holds them for the callbacks).
"""
