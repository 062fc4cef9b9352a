"""Coverage of the transformers adapter: which families convert, what becomes elastic, and whether it is exact.

For each model type (a tiny random config: hidden 64, 4 layers, 4 heads of 16, FFN 96, vocabulary
128; 2 key/value heads where the family's config has ``num_key_value_heads``), built with
``AutoModel.from_config`` and converted with ``dims=("width", "heads", "depth", "hidden")``: the
groups per kind, the depth stages, the largest difference between the converted model at full
size and the original (importance sorting must not change the function), the largest difference
between the elastic model and its extraction over every preset, and the first thing kept whole
with its reason. One markdown row per family; a family that fails prints its error and the run
goes on.

    python benchmarks/bench_hf_coverage.py [--threads 2] [MODEL_TYPE ...]   # e.g. qwen3 gpt_neox
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_coverage import failed, print_table  # noqa: E402

import elasticize  # noqa: E402

FAMILIES = [
    "bert", "roberta", "distilbert", "electra", "xlm-roberta", "camembert", "ernie", "megatron-bert", "deberta-v2",
    "nystromformer", "mpnet", "modernbert", "mobilebert", "gpt2", "gptj", "opt", "biogpt", "xglm", "phi", "phi3",
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2", "starcoder2", "granite",
    "stablelm", "cohere", "glm", "exaone4", "smollm3", "gpt_neox", "bloom", "falcon", "persimmon", "mixtral",
    "qwen2_moe", "qwen3_moe", "olmoe",
]
#: the same sizes under each family's own names
SIZES = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 96,
         "n_embd": 64, "n_layer": 4, "n_head": 4, "d_model": 64, "dim": 64, "n_layers": 4, "n_heads": 4,
         "hidden_dim": 96, "ffn_dim": 96, "n_inner": 96, "embedding_size": 64, "rotary_dim": 8}


def tiny(model_type: str) -> torch.nn.Module:
    """A randomly initialised model of ``model_type`` at the sizes above."""
    import transformers as T

    default = T.AutoConfig.for_model(model_type)
    kw = dict(vocab_size=128, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kw.update({k: v for k, v in SIZES.items() if hasattr(default, k)})
    if hasattr(default, "num_key_value_heads"):
        kw["num_key_value_heads"] = 2
    if "head_dim" in default.to_dict():
        kw["head_dim"] = 16
    return T.AutoModel.from_config(T.AutoConfig.for_model(model_type, **kw)).eval()


def first(out):
    return out[0] if isinstance(out, (tuple, list)) or hasattr(out, "to_tuple") else out


def row(model_type: str) -> list[str]:
    t0 = time.perf_counter()
    try:
        torch.manual_seed(0)
        model = tiny(model_type)
        ids = torch.randint(3, 120, (2, 10), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref = first(model(ids)).clone()
        em = elasticize.elasticize(model, dims=("width", "heads", "depth", "hidden"))
        kinds = [g.kind for g in em.plan.groups]
        with torch.no_grad():
            full = (first(em(ids)) - ref).abs().max().item()
            worst = 0.0
            for p in em.presets:
                with em.subnet(p):
                    y = first(em(ids))
                worst = max(worst, (first(em.extract(p)(ids)) - y).abs().max().item())
        fixed = next((f"{n.where}: {n.why}" for n in em.plan.not_elastic if "channel order the user sees" not in n.why), "")
        return [model_type, str(kinds.count("heads")), str(kinds.count("width")), str(kinds.count("hidden")),
                str(len(em.plan.stages)), f"{full:.0e}", f"{worst:.0e}", fixed[:110], f"{time.perf_counter() - t0:.1f}"]
    except Exception as e:  # noqa: BLE001 - report the failure and go on
        return failed(model_type, e)


def main() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    print_table(__doc__, FAMILIES, row, ["model type", "heads groups", "width groups", "hidden", "depth stages",
                                         "full vs original", "extraction max diff", "first thing kept whole", "s"],
                f", transformers {transformers.__version__}", script=__file__)


if __name__ == "__main__":
    main()
