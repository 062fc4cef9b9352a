"""Hugging Face transformers: elastic depth, heads, FFN width and hidden width without torch.fx.

The ``hf`` adapter (:class:`HFAdapter`) builds a model from a local folder, a hub id or a file's
recipe (its class and whole config), and plans from the model's own structure instead of a traced
graph (:func:`plan_transformer`, see :mod:`~elasticize.adapters.hf.planner`). The package:

* :mod:`~elasticize.adapters.hf.roles`: the layer stack, projections and norms found by name;
* :mod:`~elasticize.adapters.hf.trace`: one forward pass with hooks (MACs, the residual stream);
* :mod:`~elasticize.adapters.hf.planner`: the plan, written through :class:`elasticize.plan.PlanBuilder`;
* :mod:`~elasticize.adapters.hf.config`: a dense sub-network's config made true (:func:`sync_config`);
* :mod:`~elasticize.adapters.hf.export`: saving it as a plain transformers folder (:func:`save_hf`);
* :mod:`~elasticize.adapters.hf.files`: the tokenizer files that travel inside an elasticize file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import Adapter, register_adapter
from .config import sync_config
from .export import export_problem, save_hf
from .files import (FILES_CAP, TOKENIZER_FILES, check_file_name, folder_files, has_tokenizer, hub_folder,
                    tokenizer_from_files, write_files)
from .planner import plan_transformer
from .sentence import is_sentence_model, sentence_files

__all__ = ["HFAdapter", "plan_transformer", "is_hf_model", "save_hf", "folder_files", "write_files",
           "check_file_name", "has_tokenizer", "tokenizer_from_files", "TOKENIZER_FILES", "FILES_CAP",
           "export_problem", "sync_config", "sentence_files", "is_sentence_model"]


def is_hf_model(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` (without importing transformers)."""
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers.")
               for c in type(model).__mro__)


#: config keys that name an attention implementation; transformers may fetch a hub kernel by name.
_ATTN_KEYS = ("attn_implementation", "_attn_implementation", "_attn_implementation_internal")


def _check_config(cfg: Any, key: str, depth: int = 0) -> None:
    """Refuse a recipe's config (and its sub-configs) that would run or fetch code."""
    if depth > 8:
        raise ValueError(f"{key} nests too deep")
    for k, v in cfg.items():
        if k in ("auto_map", "trust_remote_code", "quantization_config"):
            raise ValueError(f"{key}.{k}: a config with custom code or quantization is not built from a file; "
                             "build the model yourself and pass it as model=")
        if k in _ATTN_KEYS and v not in (None, "eager", "sdpa"):
            raise ValueError(f"{key}.{k}: {v!r:.80} is not 'eager' or 'sdpa'")
        if isinstance(v, dict):
            _check_config(v, f"{key}.{k}", depth + 1)


@register_adapter("hf")
class HFAdapter(Adapter):
    """Hugging Face transformers models: a local folder or a hub id (``hf:bert-base-uncased``).

    The recipe stores the model class and the full config, so a checkpoint rebuilds the
    architecture without the original folder or the network; the folder's tokenizer files
    travel inside the checkpoint (:meth:`files`). From a file, the class must be a
    ``PreTrainedModel`` subclass that transformers exports, and the config may not ask for custom
    code (``auto_map``), quantization, or an attention implementation other than ``eager``/``sdpa``
    (transformers can fetch kernels from the hub by that name).
    """

    def check_kwargs(self, name: str, kwargs: dict[str, Any]) -> None:
        if not isinstance(name, str) or len(name) > 1024:
            raise ValueError("name must be a string")
        extra = sorted(set(kwargs) - {"class", "config"})
        if extra or not isinstance(kwargs.get("config"), dict):
            raise ValueError(f"kwargs of an hf recipe are 'class' and 'config' (a config dict){'; not ' + str(extra[:5]) if extra else ''}")
        cls = kwargs.get("class")
        if not isinstance(cls, str) or not re.fullmatch(r"[A-Z][A-Za-z0-9_]{0,100}", cls):
            raise ValueError(f"kwargs.class: {cls!r:.80} is not a transformers model class name")
        if not isinstance(kwargs["config"].get("model_type"), str):
            raise ValueError("kwargs.config has no model_type")
        _check_config(kwargs["config"], "kwargs.config")

    def build(self, name: str, *, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
        import transformers

        cls_name = kwargs.get("class")
        config = kwargs.get("config")
        if config is not None:
            cls = getattr(transformers, cls_name or "AutoModel", None)
            if cls_name and not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
                raise ValueError(f"kwargs.class: {cls_name!r} is not a PreTrainedModel class that transformers exports")
            try:
                cfg = transformers.AutoConfig.for_model(**dict(config))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"kwargs.config: transformers cannot build a config from it ({str(e)[:200]})") from None
            model = cls._from_config(cfg) if cls_name else transformers.AutoModel.from_config(cfg)
            return model.eval()
        local = Path(name).is_dir()
        if local and not (Path(name) / "config.json").is_file():
            raise KeyError(f"{name} is a folder without config.json; give a Hugging Face model folder or hub id")
        try:
            cfg = transformers.AutoConfig.from_pretrained(name)
            if cls_name is None:  # the class the folder was saved from, e.g. LlamaForCausalLM
                archs = [a for a in (getattr(cfg, "architectures", None) or []) if hasattr(transformers, a)]
                cls_name = archs[0] if archs else "AutoModel"
            cls = getattr(transformers, cls_name, None)
            if cls is None:
                raise KeyError(f"transformers has no class {cls_name!r}; use e.g. AutoModel or AutoModelForCausalLM")
            if pretrained:
                return cls.from_pretrained(name).eval()
            return (cls.from_config(cfg) if cls_name.startswith("Auto") else cls._from_config(cfg)).eval()
        except OSError as e:
            if local:
                raise
            raise RuntimeError(
                f"could not get Hugging Face model {name!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
                "It is not a local folder and no cached copy was found. If this machine is offline, download it "
                f"where there is a network (`hf download {name} --local-dir DIR`), then pass that folder; or set "
                "HF_HUB_OFFLINE=1 to use the local cache without waiting for the network") from e

    def owns(self, model: nn.Module) -> bool:
        return is_hf_model(model)

    def recipe(self, model: nn.Module, name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Class and config (``_name_or_path`` blanked); ``name`` is informational and holds no local path:
        the folder's own name (``origin: "folder"``) or the hub id (``origin: "hub"``)."""
        config = model.config.to_dict()
        if "_name_or_path" in config:
            config["_name_or_path"] = ""
        local = Path(name).is_dir()
        return {"adapter": self.name, "name": Path(name).resolve().name if local else name,
                "origin": "folder" if local else "hub", "kwargs": {"class": type(model).__name__, "config": config}}

    def files(self, name: str) -> dict[str, bytes]:
        """The tokenizer, generation and preprocessor files of the folder ``name``, or of hub id
        ``name``'s snapshot in the local cache (:func:`folder_files`; nothing is downloaded), and its
        sentence-transformers modules' files (:func:`~elasticize.adapters.hf.sentence.sentence_files`)."""
        folder = Path(name) if Path(name).is_dir() else hub_folder(name)
        return {} if folder is None else {**folder_files(folder), **sentence_files(folder)}

    def example_inputs(self, model: nn.Module) -> tuple[torch.Tensor, ...]:
        cfg = model.config
        if getattr(model, "main_input_name", "input_ids") == "pixel_values":
            size = getattr(cfg, "image_size", 224)
            return (torch.randn(1, getattr(cfg, "num_channels", 3), size, size),)
        n = min(128, int(getattr(cfg, "max_position_embeddings", 130) or 130) - 2)  # RoBERTa offsets positions by 2
        vocab = int(getattr(cfg, "vocab_size", 1000) or 1000)
        return (torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(0)),)

    def plan(self, model: nn.Module, inputs: tuple, **options: Any):
        return plan_transformer(model, inputs, **options)

    def after_extract(self, dense: nn.Module) -> None:
        if is_hf_model(dense):
            sync_config(dense)
