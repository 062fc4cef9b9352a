"""Crafted elasticize files, made from small real checkpoints, that a loader must refuse.

Three base files are written by today's code: timm's ``test_resnet`` CNN with per-preset
calibrated BatchNorm statistics (format 2), a tiny Hugging Face BERT rebuilt from its config
(format 1), and an LSTM tagger converted from ``rnn_models:TokenTagger`` (an ``import`` recipe).
Each case then rewrites one base file's header: a recipe that would run or fetch code, a JSON
bomb, a header past safetensors' limits, bad offsets, shapes, dtypes, choices, tables, missing
keys. ``python tests/hostile/make_hostile.py OUT`` writes them all into OUT; the tests call
:func:`make` on a temporary folder.

Each case names the text its error must contain, so a test can tell that the file was refused
for the right reason, and ``loads``: whether reading the manifest alone may succeed (a file that
is well formed but may not be built without the user's opt-in, or whose tensors disagree with
the model only in ways the manifest cannot state, such as a float dtype).
"""

from __future__ import annotations

import copy
import json
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # rnn_models, for the import recipe


@dataclass
class Case:
    """One crafted file."""

    name: str
    base: str
    expect: str  # a regular expression the error message matches
    mutate: Callable[["Parts"], None]
    reads: bool = False  # read_manifest / inspect may accept it (only building must refuse)


class Parts:
    """A file taken apart: its tensor entries, manifest, per-preset tables and data, to edit and write back."""

    def __init__(self, path: Path) -> None:
        raw = path.read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        self.header: dict[str, Any] = json.loads(raw[8:8 + n])
        meta = self.header.pop("__metadata__")
        self.manifest: dict[str, Any] = json.loads(meta.pop("elasticize"))
        self.tables: dict[str, Any] | None = json.loads(meta.pop("elasticize.presets")) if "elasticize.presets" in meta else None
        self.extra_meta = meta
        self.data = raw[8 + n:]
        self.raw_manifest: str | None = None  # set to write the manifest text verbatim
        self.raw_header: bytes | None = None  # set to write the header bytes verbatim
        self.length: int | None = None  # set to claim another header length

    def write(self, path: Path) -> None:
        if self.raw_header is None:
            meta = dict(self.extra_meta)
            meta["elasticize"] = self.raw_manifest if self.raw_manifest is not None else json.dumps(self.manifest)
            if self.tables is not None:
                meta["elasticize.presets"] = json.dumps(self.tables)
            head = json.dumps({"__metadata__": meta, **self.header}).encode()
            head += b" " * (-len(head) % 8)
        else:
            head = self.raw_header
        n = len(head) if self.length is None else self.length
        path.write_bytes(struct.pack("<Q", n) + head + self.data)

    # small helpers for the cases
    @property
    def plan(self) -> dict[str, Any]:
        return self.manifest["plan"]

    def group(self, kind: str = "width") -> dict[str, Any]:
        return next(g for g in self.plan["groups"] if g["kind"] == kind)

    def a_tensor(self, param: bool = True) -> str:
        return next(n for n, i in self.plan["tensors"].items() if i["param"] == param and i["axes"] and n in self.header)


# --------------------------------------------------------------------------- base files
def _bases(out: Path) -> dict[str, Path]:
    import elasticize
    from elasticize.train import recalibrate_bn
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    paths = {}
    em = elasticize.convert("test_resnet", pretrained=False)
    digits = torch.tensor(load_digits().images[:64], dtype=torch.float32) / 16  # real images, 8x8
    imgs = torch.nn.functional.interpolate(digits[:, None].repeat(1, 3, 1, 1), size=(64, 64), mode="bilinear")
    recalibrate_bn(em, [imgs[i:i + 16] for i in range(0, 64, 16)], num_batches=4)
    paths["cnn"] = elasticize.save(em, out / "base_cnn.safetensors")

    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=40)).eval()
    em = elasticize.elasticize(bert, (torch.randint(0, 99, (1, 12)),),
                               recipe=elasticize.adapters.get_adapter("hf").recipe(bert, "tiny-bert", {}))
    paths["bert"] = elasticize.save(em, out / "base_bert.safetensors")

    from rnn_models import TokenTagger

    em = elasticize.elasticize(TokenTagger().eval(), recipe={"adapter": "import", "name": "rnn_models:TokenTagger",
                                                            "kwargs": {}})
    paths["lstm"] = elasticize.save(em, out / "base_lstm.safetensors")
    return paths


# --------------------------------------------------------------------------- the cases
def _recipe(r: dict[str, Any]) -> Callable[[Parts], None]:
    def f(p: Parts) -> None:
        p.manifest["recipe"] = r
    return f


def _kwargs(**kw: Any) -> Callable[[Parts], None]:
    def f(p: Parts) -> None:
        p.manifest["recipe"]["kwargs"].update(kw)
    return f


def _hf_config(**kw: Any) -> Callable[[Parts], None]:
    def f(p: Parts) -> None:
        p.manifest["recipe"]["kwargs"]["config"].update(kw)
    return f


def _set(path: tuple, value: Any) -> Callable[[Parts], None]:
    """Set ``manifest[path...] = value`` (a callable value is given the Parts)."""
    def f(p: Parts) -> None:
        d: Any = p.manifest
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value(p) if callable(value) else value
    return f


def _drop(*path: str) -> Callable[[Parts], None]:
    def f(p: Parts) -> None:
        d: Any = p.manifest
        for k in path[:-1]:
            d = d[k]
        del d[path[-1]]
    return f


def _choices(values: Callable[[dict], list]) -> Callable[[Parts], None]:
    def f(p: Parts) -> None:
        g = p.group()
        g["choices"] = values(g)
    return f


def _bomb(p: Parts) -> None:
    p.raw_manifest = "[" * 100_000 + "]" * 100_000


def _header_bomb(p: Parts) -> None:
    p.raw_header = (b'{"__metadata__": {}, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}").ljust(200_008, b" ")


def _huge_header(p: Parts) -> None:
    head = json.dumps({"__metadata__": {"elasticize": json.dumps(p.manifest)}, **p.header}).encode()
    p.raw_header = head + b" " * (100_000_008 - len(head))


def _offsets(fn: Callable[[list[int]], list[int]]) -> Callable[[Parts], None]:
    def f(p: Parts) -> None:
        name = p.a_tensor()
        p.header[name]["data_offsets"] = fn(p.header[name]["data_offsets"])
    return f


def _dtype(dtype: str) -> Callable[[Parts], None]:
    def f(p: Parts) -> None:  # same element size, so offsets still tile the data
        p.header[p.a_tensor()]["dtype"] = dtype
    return f


def _f16_weight(p: Parts) -> None:
    """A float32 weight stored as float16 (offsets rewritten): well formed, but not the model's dtype."""
    name = p.a_tensor()
    a, b = p.header[name]["data_offsets"]
    half = (b - a) // 2
    p.data = p.data[:a] + p.data[a:a + half] + p.data[b:]
    p.header[name].update(dtype="F16", data_offsets=[a, a + half])
    for other in p.header.values():
        if other["data_offsets"][0] >= b:
            other["data_offsets"] = [x - half for x in other["data_offsets"]]


def _plan_shape(p: Parts) -> None:
    name = next(n for n, i in p.plan["tensors"].items() if not i["axes"] and n in p.header)
    p.plan["tensors"][name]["shape"] = [1]


def _group_size(p: Parts) -> None:
    g = p.group()
    g["size"] *= 2
    g["choices"] = [c * 2 for c in g["choices"]]
    p.manifest["search_space"]["width"][g["name"]] = g["choices"]


def _table(edit: Callable[[dict], None]) -> Callable[[Parts], None]:
    def f(p: Parts) -> None:
        edit(p.tables)
    return f


def _first_sliced(tables: dict) -> dict:
    return next(e for e in tables["small"].values() if e["slices"])


def _shift_slice(tables: dict) -> None:
    e = _first_sliced(tables)
    a, b = e["slices"][0][0]
    e["slices"][0][0] = [a + 1, b + 1]


def _attr(name: str) -> Callable[[Parts], None]:
    def f(p: Parts) -> None:
        module, attrs = next(iter(p.plan["attrs"].items()))
        attrs[name] = next(iter(attrs.values()))
    return f


def _drop_tensor(p: Parts) -> None:
    name = p.a_tensor()
    a, b = p.header.pop(name)["data_offsets"]
    p.data = p.data[:a] + p.data[b:]
    for t in p.header.values():
        if t["data_offsets"][0] >= b:
            t["data_offsets"] = [x - (b - a) for x in t["data_offsets"]]


def _extra_tensor(p: Parts) -> None:
    end = len(p.data)
    p.header["planted"] = {"dtype": "U8", "shape": [8], "data_offsets": [end, end + 8]}
    p.data += b"\0" * 8


def _bn_missing(p: Parts) -> None:
    table = p.manifest["bn_stats"]["small"]
    fqn = next(iter(table))
    table[fqn] = "elastic_bn.small.nowhere"


def _bn_shape(p: Parts) -> None:
    stored = next(iter(p.manifest["bn_stats"]["small"].values()))
    t = p.header[stored]
    t["shape"] = [t["shape"][0] // 2]
    t["data_offsets"][1] = t["data_offsets"][0] + 4 * t["shape"][0]
    # a gap is itself an error; fill it with a second small tensor so only the shape is wrong
    p.header["elastic_bn.small.gap"] = {"dtype": "F32", "shape": [t["shape"][0]],
                                        "data_offsets": [t["data_offsets"][1], t["data_offsets"][1] + 4 * t["shape"][0]]}


def _stage(key: str, value: Callable[[dict], Any]) -> Callable[[Parts], None]:
    def f(p: Parts) -> None:
        s = p.plan["stages"][0]
        s[key] = value(s)
    return f


CASES = [
    # recipes: code, files, network
    Case("import_os_system", "cnn", "trust_remote_code", _recipe({"adapter": "import", "name": "os:system",
                                                                  "kwargs": {"command": "touch {sentinel}"}}), reads=True),
    Case("import_subprocess", "lstm", "trust_remote_code", _recipe({"adapter": "import", "name": "subprocess:call",
                                                                    "kwargs": {"args": ["touch", "{sentinel}"]}}),
         reads=True),
    Case("import_not_a_path", "cnn", "not an import path", _recipe({"adapter": "import", "name": "os.system('x')",
                                                                    "kwargs": {}})),
    Case("unknown_adapter", "cnn", "adapter 'pickle'", _recipe({"adapter": "pickle", "name": "x", "kwargs": {}})),
    Case("recipe_extra_key", "cnn", r"unknown key\(s\) \['code'\]", _set(("recipe", "code"), "print(1)")),
    Case("recipe_not_object", "cnn", "a recipe is", _set(("recipe",), "os:system")),
    Case("timm_checkpoint_path", "cnn", "kwargs.checkpoint_path", _kwargs(checkpoint_path="/etc/passwd")),
    Case("timm_pretrained_cfg_overlay", "cnn", "kwargs.pretrained_cfg_overlay",
         _kwargs(pretrained_cfg_overlay={"file": "/tmp/x.pth"})),
    Case("timm_path_in_string", "cnn", "not a plain value", _kwargs(global_pool="../../x.pth")),
    Case("timm_nested_kwarg", "cnn", "not a plain value", _kwargs(img_size=[[64, 64]])),
    Case("torchvision_weights_backbone", "cnn", "kwargs.weights_backbone",
         _recipe({"adapter": "torchvision", "name": "fcn_resnet50", "kwargs": {"weights_backbone": "DEFAULT"}})),
    Case("torchvision_weights", "cnn", "kwargs.weights",
         _recipe({"adapter": "torchvision", "name": "resnet18", "kwargs": {"weights": "DEFAULT"}})),
    Case("hf_class_not_a_model", "bert", "kwargs.class", _kwargs(**{"class": "pipeline"})),
    Case("hf_class_tokenizer", "bert", "not a PreTrainedModel", _kwargs(**{"class": "AutoTokenizer"}), reads=True),
    Case("hf_auto_map", "bert", "auto_map", _hf_config(auto_map={"AutoModel": "evil.Model"})),
    Case("hf_hub_kernel", "bert", "attn_implementation", _hf_config(attn_implementation="kernels-community/evil")),
    Case("hf_quantization", "bert", "quantization_config", _hf_config(quantization_config={"quant_method": "x"})),
    Case("hf_no_config", "bert", "kwargs of an hf recipe", _drop("recipe", "kwargs", "config")),
    # JSON and header limits
    Case("json_bomb_manifest", "cnn", "nests deeper", _bomb),
    Case("json_bomb_header", "cnn", "nests deeper", _header_bomb),
    Case("header_over_limit", "cnn", "over safetensors' limit", _huge_header),
    Case("header_longer_than_file", "cnn", "truncated", lambda p: setattr(p, "length", 50_000_000)),
    Case("truncated_data", "cnn", "truncated", lambda p: setattr(p, "data", p.data[:-100])),
    Case("manifest_not_json", "cnn", "not valid JSON", lambda p: setattr(p, "raw_manifest", "{'kind': 1")),
    Case("manifest_5000_digits", "cnn", "not valid JSON", lambda p: setattr(p, "raw_manifest", '{"x": ' + "9" * 5000 + "}")),
    Case("manifest_nan", "cnn", "not valid JSON", _set(("presets", "full", "macs"), float("nan"))),
    Case("negative_offsets", "cnn", "data_offsets", _offsets(lambda o: [-8, o[1]])),
    Case("overlapping_offsets", "cnn", "overlap|data_offsets", _offsets(lambda o: [o[0] - 4, o[1] - 4])),
    Case("offsets_size_mismatch", "cnn", "holds", _offsets(lambda o: [o[0], o[1] - 4])),
    Case("unknown_dtype", "cnn", "not a safetensors dtype", _dtype("PICKLE")),
    # the manifest's shape
    Case("missing_kind", "cnn", "missing 'kind'", _drop("kind")),
    Case("missing_plan", "cnn", "missing 'plan'", _drop("plan")),
    Case("unknown_top_key", "cnn", r"unknown key\(s\) \['hook'\]", _set(("hook",), "x")),
    Case("unknown_plan_key", "cnn", r"unknown key\(s\) \['code'\]", _set(("plan", "code"), "x")),
    Case("newer_format", "cnn", "Upgrade", _set(("format_version",), 99)),
    Case("not_elasticize", "cnn", "not 'elasticize'", _set(("format",), "pickle")),
    Case("unknown_kind", "cnn", "kind", _set(("kind",), "script")),
    # sizes, choices, tables
    Case("choices_negative", "cnn", "choices", _choices(lambda g: [g["size"], -16])),
    Case("choices_zero", "cnn", "choices", _choices(lambda g: [g["size"], 0])),
    Case("choices_not_from_full", "cnn", "choices", _choices(lambda g: [g["size"] // 2])),
    Case("choices_increasing", "cnn", "choices", _choices(lambda g: [g["size"], g["size"] // 4, g["size"] // 2])),
    Case("group_size_disagrees", "cnn", "axis has", _group_size),
    Case("plan_shape_disagrees", "cnn", "the file stores", _plan_shape),
    Case("param_stored_as_int", "cnn", "dtype", _dtype("I32")),
    Case("param_stored_as_f16", "cnn", "bytes", _f16_weight),
    Case("param_stored_as_f16_no_bytes", "cnn", "dtype|float16", lambda p: (_f16_weight(p), [
        e.pop("bytes") for e in p.manifest["presets"].values()]), reads=True),
    Case("missing_tensor", "cnn", "missing 1", _drop_tensor),
    Case("extra_tensor", "cnn", "unexpected 1", _extra_tensor),
    Case("table_shifted_slice", "cnn", "differs from what the plan computes", _table(_shift_slice)),
    Case("table_missing_preset", "cnn", "per-preset tables", _table(lambda t: t.pop("small"))),
    Case("preset_macs_wrong", "cnn", "macs", _set(("presets", "small", "macs"), 1)),
    Case("preset_bytes_wrong", "cnn", "bytes", _set(("presets", "small", "bytes"), 1)),
    Case("preset_outside_space", "cnn", "outside the search space",
         _set(("presets", "small", "config"), lambda p: {**p.manifest["presets"]["small"]["config"], "width": {"nope": 1}})),
    Case("preset_full_not_full", "cnn", "'full' must be",
         _set(("presets", "full"), lambda p: copy.deepcopy(p.manifest["presets"]["small"]))),
    Case("preset_name_path", "cnn", "not a valid name",
         _set(("presets", "../../x"), lambda p: copy.deepcopy(p.manifest["presets"]["small"]))),
    Case("metric_not_number", "cnn", "finite number", _set(("presets", "small", "metrics"), {"accuracy": "1"})),
    Case("search_space_disagrees", "cnn", "search_space", _set(("search_space", "depth"), {})),
    Case("bn_stats_missing_tensor", "cnn", "does not hold", _bn_missing),
    Case("bn_stats_wrong_shape", "cnn", "stored with shape|unexpected", _bn_shape),
    Case("alias_to_nowhere", "cnn", "aliases", _set(("aliases",), {"x.weight": "nowhere"})),
    Case("attr_shadows_method", "cnn", "not a size", _attr("forward"), reads=True),
    Case("attr_private", "cnn", "private", _attr("_parameters")),
    Case("stage_choices_wrong", "cnn", "stages", _stage("choices", lambda s: [len(s["blocks"]) + 1])),
    Case("stage_order_not_permutation", "cnn", "permutation", _stage("order", lambda s: [0] * len(s["blocks"]))),
    Case("unknown_dimension", "cnn", "not a dimension", _set(("plan", "dims"), ["width", "pickle"])),
    Case("mac_term_negative", "cnn", "negative", _set(("plan", "mac_terms"), lambda p: [[m[0], -1, m[2]] for m in
                                                                                         p.plan["mac_terms"]])),
    Case("input_shape_huge", "cnn", "too large", _set(("input_shapes",), [[10 ** 6, 10 ** 6]])),
    Case("bert_heads_choices_zero", "bert", "choices", lambda p: p.group("heads").update(choices=[4, 0])),
    Case("lstm_hidden_size_disagrees", "lstm", "axis has", _group_size),
]


def make(out: str | Path, sentinel: str | Path = "/tmp/elasticize-hostile-sentinel") -> dict[str, tuple[Case, Path]]:
    """Write the base files and every case into ``out``; return ``{case name: (case, path)}``.

    A recipe that would run a command runs ``touch SENTINEL``: a test asserts that file never appears.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bases = _bases(out)
    made = {}
    for case in CASES:
        parts = Parts(bases[case.base])
        case.mutate(parts)
        parts.manifest = json.loads(json.dumps(parts.manifest).replace("{sentinel}", str(sentinel)))
        path = out / f"{case.name}.safetensors"
        parts.write(path)
        made[case.name] = (case, path)
    return made


if __name__ == "__main__":  # pragma: no cover
    made = make(sys.argv[1] if len(sys.argv) > 1 else "hostile-files")
    print(f"wrote {len(made)} crafted files and 3 base files")
