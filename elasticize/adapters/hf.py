"""Hugging Face transformers: elastic depth, heads, FFN width and hidden width without torch.fx.

Transformers 5 removed torch.fx support, and tracing a whole transformer is slow and loses
the layer structure, so this adapter plans from the model's own structure instead:

* the **layer stack** is the ``nn.ModuleList`` with ``config.num_hidden_layers`` entries;
* in each layer, the projections are found by name (``query``/``q_proj``/``q_lin``,
  ``c_attn``, ``o_proj``/``attention.output.dense``/``attn.c_proj``, ``up_proj``/
  ``intermediate.dense``/``mlp.c_fc``/``ffn.lin1``, ``gate_proj``, ``down_proj``/
  ``output.dense``/``mlp.c_proj``/``ffn.lin2``...) and checked against the config's sizes;
* one **heads** coupling group per layer: query rows, key/value rows, output-projection
  columns, in whole heads; with grouped-query attention the query heads that share a
  key/value head stay together (``step``), and the key/value rows follow at
  ``1 / (query heads per key/value head)`` of the query rows;
* one **FFN width** group per layer (``width``): up and gate rows, down columns;
* opt-in **hidden** width (the residual stream): embeddings, every norm, the input columns
  of every projection that reads the stream, the output rows of those that write it, and
  the tied output head;
* **depth** over the layer stack: SortedNet prefix (``"prefix"``, arXiv 2309.00255),
  evenly spread layer dropping (``"spaced"``: keep layers in the order 0, n-1, then
  midpoints, so that the choices stay nested), or Adaptive Depth Networks' skippable
  second half with switchable norms (``"skippable"``, arXiv 2312.16392, Section 3).

MACs are counted per sample at the example sequence length (default 128 tokens): every
linear / ``Conv1D`` / convolution as measured by one forward pass with hooks, plus
``2 * tokens^2 * heads * head_dim`` per attention for the two attention matmuls.

A model of a family this adapter does not know still converts: whatever it can find is
elastic, and the plan's ``not_elastic`` lists each layer or group it could not make
elastic and why.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import stat
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from . import Adapter, register_adapter

__all__ = ["HFAdapter", "plan_transformer", "is_hf_model", "save_hf", "folder_files", "write_files",
           "check_file_name", "has_tokenizer", "tokenizer_from_files", "TOKENIZER_FILES", "FILES_CAP"]

# Role of a projection inside one layer, from its path relative to the layer (first match wins).
_ROLES: tuple[tuple[str, str], ...] = (
    ("qkv", r"(c_attn|qkv_proj|query_key_value|Wqkv|qkv)"),
    ("q", r"(query|q_proj|q_lin|query_proj)"),
    ("k", r"(key|k_proj|k_lin|key_proj)"),
    ("v", r"(value|v_proj|v_lin|value_proj)"),
    ("o", r"(o_proj|out_lin|attention\.output\.dense|attn\.c_proj|self_attn\.out_proj|attention\.out_proj|attn\.proj"
          r"|attn\.out_proj|self_attn\.dense|attention\.dense|self_attention\.dense|attn\.Wo)"),
    ("reads_hidden", r"shared_expert_gate"),
    ("gate_up", r"(gate_up_proj|mlp\.Wi)"),
    ("gate", r"(gate_proj|w1)"),
    ("up", r"(up_proj|intermediate\.dense|mlp\.c_fc|ffn\.lin1|fc1|fc_in|dense_h_to_4h|w3)"),
    ("down", r"(down_proj|output\.dense|mlp\.c_proj|ffn\.lin2|fc2|fc_out|dense_4h_to_h|w2|mlp\.Wo)"),
)
_ROLE_RE = [(role, re.compile(rf"(^|.*\.){pat}$")) for role, pat in _ROLES]
#: norms inside the attention over queries or keys (Qwen3, Gemma 3, OLMo 2, Phi): per head, or over all heads
_QK_NORM_RE = re.compile(r"(^|.*\.)(q|k|query|key)_(norm|layernorm|ln)$")
#: families whose fused q/k/v projection interleaves the heads (``(heads, 3, head_dim)`` rows, or
#: CodeGen's model-parallel blocks), not three blocks q | k | v: their heads stay fixed
_INTERLEAVED_QKV = ("gpt_neox", "bloom", "falcon", "persimmon", "codegen", "gpt_neox_japanese")
_HEADS_ATTRS = ("num_attention_heads", "num_heads", "n_heads", "n_head")
_HEAD_CHANNEL_ATTRS = ("all_head_size", "split_size", "inner_dim", "attn_dim")
_KV_ATTRS = ("num_key_value_heads", "num_kv_heads")
_FFN_ATTRS = ("intermediate_size", "ffn_dim")
_HIDDEN_ATTRS = ("hidden_size", "embed_dim", "dim", "d_model")
_FFN_CONFIG = ("intermediate_size", "n_inner", "hidden_dim", "ffn_dim")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "tokenizer.model", "spiece.model", "added_tokens.json", "chat_template.jinja",
                   "generation_config.json", "preprocessor_config.json")
#: the files of TOKENIZER_FILES that make a tokenizer or an image/audio processor (a folder without any has none)
_PROCESSOR_FILES = tuple(n for n in TOKENIZER_FILES if n != "generation_config.json")
#: the most bytes of a model folder's TOKENIZER_FILES that travel inside an elasticize file (all of them together)
FILES_CAP = 64 * 2**20


def has_tokenizer(names: Any) -> bool:
    """Whether the file names ``names`` include a tokenizer or preprocessor file (not only ``generation_config.json``)."""
    return any(n in _PROCESSOR_FILES for n in names)


def check_file_name(name: str) -> str:
    """``name``, if it may travel with an elasticize file: one of :data:`TOKENIZER_FILES`, a plain file name.

    Raises:
        ValueError: any other name (a path, ``..``, a name outside the allow-list).
    """
    if not isinstance(name, str) or name not in TOKENIZER_FILES or os.path.basename(name) != name \
            or "/" in name or "\\" in name:
        raise ValueError(f"{name!r} is not a file name elasticize stores with a model; allowed: {', '.join(TOKENIZER_FILES)}")
    return name


def _inside(target: Path, root: Path) -> bool:
    try:
        target.relative_to(root)
        return True
    except ValueError:
        return False


def folder_files(folder: str | os.PathLike, *, cap: int | None = FILES_CAP) -> dict[str, bytes]:
    """The tokenizer, generation and preprocessor files (:data:`TOKENIZER_FILES`) of a model folder.

    Only regular files are read. A symbolic link counts when it points at a regular file inside the
    folder, or, for a Hugging Face hub cache snapshot (``.../snapshots/<revision>``), inside that
    model's cache folder (the snapshot's links point at its ``blobs``); a link elsewhere is left out
    with a warning, so converting a downloaded folder never embeds some other file of this machine.

    Args:
        folder: the model folder.
        cap: the most bytes read in all; when the files are larger together, none is returned and a
            ``UserWarning`` says so (a tokenizer without some of its files would tokenize otherwise).
            None: no limit.

    Returns:
        File name -> contents, in :data:`TOKENIZER_FILES` order; empty for a folder without them.
    """
    root = Path(folder).resolve()
    allowed = root.parent.parent if root.parent.name == "snapshots" else root
    out: dict[str, bytes] = {}
    total = 0
    for name in TOKENIZER_FILES:
        f = Path(folder) / name
        try:
            st = os.stat(f)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        if f.is_symlink() and not _inside(f.resolve(), allowed):
            warnings.warn(f"{f} is a link to {f.resolve()}, outside the model folder: not stored with the model",
                          stacklevel=2)
            continue
        with open(f, "rb") as fh:
            data = fh.read() if cap is None else fh.read(cap - total + 1)
        total += len(data)
        if cap is not None and total > cap:
            warnings.warn(f"the tokenizer files of {folder} exceed {cap / 2**20:.0f} MiB together: none is stored "
                          "with the model; copy them into exported folders yourself", stacklevel=2)
            return {}
        out[name] = data
    return out


def write_files(files: Mapping[str, bytes], folder: str | os.PathLike) -> list[str]:
    """Write ``files`` (name -> contents, names checked by :func:`check_file_name`) into ``folder``.

    Returns:
        The names written.

    Raises:
        ValueError: a name outside :data:`TOKENIZER_FILES` or with a path in it.
    """
    names = [check_file_name(n) for n in files]
    for name in names:
        (Path(folder) / name).write_bytes(bytes(files[name]))
    return names


def tokenizer_from_files(files: Mapping[str, bytes], *, config: Mapping[str, Any] | None = None) -> Any:
    """The Hugging Face tokenizer that ``files`` (an elasticize file's embedded files) make.

    They are written to a temporary folder, ``AutoTokenizer.from_pretrained`` reads it, and the
    folder is removed.

    Args:
        files: file name -> contents.
        config: the model's config (the recipe's), written as ``config.json`` beside them: a
            ``tokenizer_config.json`` that names no tokenizer class leaves the choice to the model type.

    Raises:
        ValueError: no tokenizer file among ``files``, a name :func:`check_file_name` refuses, or
            files transformers cannot make a tokenizer of.
    """
    import json
    import tempfile

    from transformers import AutoTokenizer

    if not any(n in files for n in _PROCESSOR_FILES if n != "preprocessor_config.json"):
        raise ValueError("the model's file holds no tokenizer files")
    with tempfile.TemporaryDirectory(prefix="elasticize-tokenizer.") as tmp:
        write_files(files, tmp)
        if config:
            (Path(tmp) / "config.json").write_text(json.dumps(dict(config)))
        try:
            return AutoTokenizer.from_pretrained(tmp)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"the tokenizer files stored with the model do not make a tokenizer: {e}") from None


def _hub_folder(name: str) -> Path | None:
    """The local hub-cache snapshot folder of hub id ``name`` (no network), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json")
    except Exception:  # noqa: BLE001 - not a valid hub id, no cache: nothing to read
        return None
    return Path(found).parent if isinstance(found, str) else None


def is_hf_model(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` (without importing transformers)."""
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers.")
               for c in type(model).__mro__)


def _is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and hasattr(m, "nx")


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, nn.LayerNorm) or type(m).__name__.endswith(("RMSNorm", "LayerNorm"))


def _is_experts(m: nn.Module) -> bool:
    """A mixture-of-experts FFN stored as 3-D tensors (Mixtral, Qwen3-MoE, OLMoE in transformers 5):
    ``gate_up_proj (experts, 2 * intermediate, hidden)`` and ``down_proj (experts, hidden, intermediate)``."""
    gu, down = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
    return (isinstance(gu, nn.Parameter) and isinstance(down, nn.Parameter) and gu.dim() == 3 and down.dim() == 3
            and gu.shape[0] == down.shape[0] and gu.shape[1] == 2 * down.shape[2] and gu.shape[2] == down.shape[1])


def _is_router(m: nn.Module, hidden: int) -> bool:
    """A mixture-of-experts router that is not an ``nn.Linear``: one ``weight (experts, hidden)``."""
    w = getattr(m, "weight", None)
    return (not isinstance(m, nn.Linear) and isinstance(w, nn.Parameter) and w.dim() == 2 and w.shape[1] == hidden
            and type(m).__name__.endswith(("Router", "Gate")))


def _proj_axes(m: nn.Module) -> tuple[int, int]:
    """(output axis, input axis) of a projection's weight: Linear is (out, in), GPT-2 Conv1D (in, out)."""
    return (1, 0) if _is_conv1d(m) else (0, 1)


def _io(m: nn.Module) -> tuple[int, int]:
    """(in, out) features of a Linear or Conv1D."""
    return (m.nx, m.nf) if _is_conv1d(m) else (m.in_features, m.out_features)


def _find_layers(model: nn.Module, n_layers: int) -> tuple[str, nn.ModuleList] | None:
    best = None
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) == n_layers and n_layers > 0:
            if best is None or name.count(".") < best[0].count("."):
                best = (name, m)
    return best


def _spread_order(n: int) -> list[int]:
    """Keep order 0, n-1, then midpoints of the widest gaps: every prefix is spread evenly over the stack."""
    if n <= 2:
        return list(range(n))
    order = [0, n - 1]
    while len(order) < n:
        kept = sorted(order)
        gaps = [(kept[i + 1] - kept[i], -kept[i], kept[i]) for i in range(len(kept) - 1)]
        width, _, lo = max(gaps)
        order.append(lo + width // 2)
    return order


class _Planner:
    """Builds a :class:`elasticize.plan.Plan` for one transformers model."""

    def __init__(self, model: nn.Module, inputs: tuple, dims: tuple[str, ...], depth_mode: str,
                 width_ratios: tuple[float, ...], heads_ratios: tuple[float, ...], exclude: tuple[str, ...]) -> None:
        from ..plan import Plan

        self.model, self.inputs, self.dims = model, inputs, dims
        self.width_ratios, self.heads_ratios = width_ratios, heads_ratios
        self.exclude = exclude
        self.plan = Plan(tracer="structure", dims=list(dims), depth_mode=depth_mode)
        self.params = {n for n, _ in model.named_parameters()}
        self.state = model.state_dict(keep_vars=True)
        self.axes: dict[str, dict[str, list[Any]]] = {}
        self.attn_terms: list[tuple[str, str, str]] = []  # (attention path, heads group, q/qkv path)
        self.groups: dict[str, dict[str, Any]] = {}
        cfg = model.config
        self.cfg = cfg
        self.hidden = int(getattr(cfg, "hidden_size", 0) or 0)
        self.n_heads = int(getattr(cfg, "num_attention_heads", 0) or 0)
        self.n_kv = int(getattr(cfg, "num_key_value_heads", None) or self.n_heads)
        hd = getattr(cfg, "head_dim", None)
        self.head_dim = int(hd) if hd else (self.hidden // self.n_heads if self.n_heads else 0)

    # ---------------------------------------------------------------- helpers
    def excluded(self, name: str) -> bool:
        import fnmatch

        return any(fnmatch.fnmatchcase(name, p) for p in self.exclude)

    def note(self, where: str, why: str) -> None:
        self.plan.not_elastic.append([where, why])

    def group(self, name: str, kind: str, size: int, unit: int, dim: str, step: int = 1,
              constraint: str = "") -> str | None:
        if dim not in self.dims:
            self.note(name, f"{dim} not selected")
            return None
        if self.excluded(name):
            self.note(name, "excluded by the user")
            return None
        ratios = self.heads_ratios if dim == "heads" else self.width_ratios
        n = size // (unit * step)
        counts = sorted({max(1, min(n, round(r * n))) for r in ratios} | {n}, reverse=True)
        per = step if dim == "heads" else unit * step
        g = {"name": name, "kind": kind, "size": size, "unit": unit, "choices": [c * per for c in counts]}
        if step > 1:
            g["step"], g["constraint"] = step, constraint
        self.groups[name] = g
        return name

    def ax(self, fqn: str, axis: int, group: str | None, chunks: int = 1, div: int = 1) -> None:
        if group is None or fqn not in self.state:
            return
        entry = [group, chunks] if div == 1 else [group, chunks, div]
        self.axes.setdefault(fqn, {})[str(axis)] = entry

    def attr(self, path: str, name: str, group: str | None, kind: str = "int", mul: int = 1, div: int = 1) -> None:
        if group is not None:
            self.plan.attrs.setdefault(path, {})[name] = [group, kind, mul, div]

    def proj(self, path: str, m: nn.Module, *, out: str | None = None, inp: str | None = None,
             out_chunks: int = 1, out_div: int = 1) -> None:
        """Elastic rows (``out``) and/or columns (``inp``) of a Linear or Conv1D, with its size attributes."""
        o_ax, i_ax = _proj_axes(m)
        self.ax(f"{path}.weight", o_ax, out, out_chunks, out_div)
        self.ax(f"{path}.bias", 0, out, out_chunks, out_div)
        self.ax(f"{path}.weight", i_ax, inp)
        if _is_conv1d(m):
            self.attr(path, "nf", out, mul=out_chunks, div=out_div)
            self.attr(path, "nx", inp)
        else:
            self.attr(path, "out_features", out, mul=out_chunks, div=out_div)
            self.attr(path, "in_features", inp)
        if isinstance(m, nn.Linear):
            self.plan.sites[path] = "linear"

    def module_attrs(self, path: str, m: nn.Module, names: tuple[str, ...], full: int, group: str | None,
                     div: int = 1) -> None:
        for a in names:
            v = m.__dict__.get(a)
            if isinstance(v, int) and not isinstance(v, bool) and v == full:
                self.attr(path, a, group, div=div)

    # ---------------------------------------------------------------- the plan
    def build(self):
        found = _find_layers(self.model, int(getattr(self.cfg, "num_hidden_layers", 0) or 0))
        if found is None or not self.n_heads or not self.hidden:
            self.note("<model>", f"{type(self.model).__name__}: no layer stack of config.num_hidden_layers layers, or "
                      "no num_attention_heads / hidden_size in its config; nothing was made elastic")
            self.trace("\0")
            return self.finish([], None)
        stack_path, layers = found
        self.trace(stack_path)
        hidden = None
        if "hidden" in self.dims:
            hidden = self.group("hidden", "hidden", self.hidden, 1, "hidden")
            if hidden is not None and self.stream_is_output:
                self.groups[hidden]["sort"] = False
                self.note(hidden, "not sorted by importance: the model's output is the residual stream, whose "
                          "channel order the user sees")
        blocks, norms = [], []
        for i, layer in enumerate(layers):
            path = f"{stack_path}.{i}"
            blocks.append(path)
            self.layer(path, layer, hidden)
            norms += [f"{path}.{n}" for n, m in layer.named_modules() if n and _is_norm(m)]
        self.outside(stack_path, hidden)
        return self.finish(blocks, stack_path, norms)

    def layer(self, path: str, layer: nn.Module, hidden: str | None) -> None:
        roles: dict[str, tuple[str, nn.Module]] = {}
        unknown, qk_norms = [], []
        for name, m in layer.named_modules():
            if _is_experts(m):
                roles["experts"] = (f"{path}.{name}", m)
            elif _is_router(m, self.hidden):
                roles["router"] = (f"{path}.{name}", m)
            elif isinstance(m, nn.Linear) or _is_conv1d(m):
                role = next((r for r, rx in _ROLE_RE if rx.match(name)), None)
                if role is None or role in roles:
                    unknown.append(name)
                else:
                    roles[role] = (f"{path}.{name}", m)
            elif _is_norm(m) and _QK_NORM_RE.match(name):
                qk_norms.append((f"{path}.{name}", m, _QK_NORM_RE.match(name).group(2)[0]))
            elif _is_norm(m):
                self.norm(f"{path}.{name}", m, hidden)
        if unknown:
            self.note(path, f"projections {unknown} have no known role; heads and FFN width of this layer stay fixed")
            return
        self.attention(path, layer, roles, hidden, qk_norms)
        self.ffn(path, roles, hidden)

    def norm(self, path: str, m: nn.Module, hidden: str | None) -> None:
        """A norm over the residual stream: its tensors and ``normalized_shape`` follow ``hidden``."""
        w = getattr(m, "weight", None)
        if hidden is None or (isinstance(w, torch.Tensor) and w.dim() == 1 and w.shape[0] != self.hidden):
            return
        for t in ("weight", "bias"):
            self.ax(f"{path}.{t}", 0, hidden)
        if isinstance(m, nn.LayerNorm):
            self.attr(path, "normalized_shape", hidden, kind="shape")
            self.plan.sites[path] = "layernorm"

    def attention(self, path: str, layer: nn.Module, roles: dict[str, tuple[str, nn.Module]],
                  hidden: str | None, qk_norms: list[tuple[str, nn.Module, str]] = ()) -> None:
        hd, nh, nkv = self.head_dim, self.n_heads, self.n_kv
        rep = nh // nkv if nkv else 1
        q_rows, kv_rows = nh * hd, nkv * hd
        fused = "qkv" in roles
        need = ("qkv", "o") if fused else ("q", "k", "v", "o")
        if any(r not in roles for r in need):
            self.note(path, f"no attention projections found (looked for {list(need)}); heads stay fixed")
            return
        if fused:
            qp, qm = roles["qkv"]
            ok = _io(qm)[1] == 3 * q_rows and nkv == nh
        else:
            ok = _io(roles["q"][1])[1] == q_rows and all(_io(roles[r][1])[1] == kv_rows for r in "kv")
        op, om = roles["o"]
        ok = ok and _io(om)[0] == q_rows
        # a q/k norm over one head acts inside each head; one over all heads keeps a row per head channel
        sizes = {n: (getattr(m, "weight", None).shape[0] if isinstance(getattr(m, "weight", None), torch.Tensor)
                     else hd) for n, m, _ in qk_norms}
        odd = [n for n, _, which in qk_norms if sizes[n] not in (hd, q_rows if which == "q" else kv_rows)]
        model_type = getattr(self.cfg, "model_type", "")
        if fused and model_type in _INTERLEAVED_QKV:
            self.note(path, f"{model_type}'s fused query_key_value interleaves its heads; heads stay fixed")
            heads = None
        elif odd:
            self.note(path, f"query/key norms {odd} are neither per head nor over all heads; heads stay fixed")
            heads = None
        elif fused and nkv != nh:
            self.note(path, f"fused q/k/v projection with grouped-query attention ({nh} query heads, {nkv} key/value "
                      "heads): its rows are not three equal chunks; heads stay fixed")
            heads = None
        elif not ok:
            self.note(path, f"attention projections do not match the config ({nh} heads, {nkv} key/value heads, "
                      f"head_dim {hd}); heads stay fixed")
            heads = None
        else:
            why = (f"grouped-query attention: {rep} query heads share each key/value head, so heads must be a "
                   f"multiple of {rep}") if rep > 1 else ""
            heads = self.group(f"{path}:heads", "heads", q_rows, hd, "heads", step=rep, constraint=why)
        if fused:
            self.proj(qp, qm, out=heads, inp=hidden, out_chunks=3)
        else:
            self.proj(roles["q"][0], roles["q"][1], out=heads, inp=hidden)
            for r in "kv":
                self.proj(roles[r][0], roles[r][1], out=heads, inp=hidden, out_div=rep)
        for n, m, which in qk_norms:
            if sizes[n] != hd:  # over all heads (OLMo 2): one entry per head channel, like the projection rows
                for t in ("weight", "bias"):
                    self.ax(f"{n}.{t}", 0, heads, div=1 if which == "q" else rep)
                if isinstance(m, nn.LayerNorm):
                    self.attr(n, "normalized_shape", heads, kind="shape", div=1 if which == "q" else rep)
        self.proj(op, om, out=hidden, inp=heads)
        attn_path = op.rpartition(".")[0] if fused else roles["q"][0].rpartition(".")[0]
        attn = self.model.get_submodule(attn_path)
        if heads is not None:
            self.module_attrs(attn_path, attn, _HEADS_ATTRS, nh, heads, div=hd)
            self.module_attrs(attn_path, attn, _HEAD_CHANNEL_ATTRS, q_rows, heads)
            self.module_attrs(attn_path, attn, _KV_ATTRS, nkv, heads, div=hd * rep)
            self.attn_terms.append((attn_path, heads, roles["qkv" if fused else "q"][0]))
        if hidden is not None:
            self.module_attrs(attn_path, attn, _HIDDEN_ATTRS, self.hidden, hidden)

    def ffn(self, path: str, roles: dict[str, tuple[str, nn.Module]], hidden: str | None) -> None:
        if "reads_hidden" in roles:  # e.g. Qwen2-MoE's shared-expert gate: hidden columns, one output
            self.proj(*roles["reads_hidden"], inp=hidden)
        if "experts" in roles:
            self.experts(path, roles, hidden)
            if "down" not in roles:
                return
        if "down" not in roles or not ({"up", "gate_up"} & set(roles)):
            self.note(path, "no FFN up/down projections found; FFN width stays fixed")
            return
        dp, dm = roles["down"]
        inter = _io(dm)[0]
        ups = [(r, *roles[r]) for r in ("up", "gate", "gate_up") if r in roles]
        sizes = {r: _io(m)[1] // (2 if r == "gate_up" else 1) for r, _, m in ups}
        if any(s != inter for s in sizes.values()):
            self.note(path, f"FFN projections disagree on the intermediate size ({sizes}, down reads {inter}); fixed")
            ffn = None
        else:  # beside experts, a dense FFN is their shared expert (Qwen2-MoE)
            ffn = self.group(f"{path}:{'shared_ffn' if 'experts' in roles else 'ffn'}", "width", inter, 1, "width")
        for r, p, m in ups:
            self.proj(p, m, out=ffn, inp=hidden, out_chunks=2 if r == "gate_up" else 1)
        self.proj(dp, dm, out=hidden, inp=ffn)
        mlp_path = dp.rpartition(".")[0]
        if ffn is not None and all(p.rpartition(".")[0] == mlp_path for _, p, _ in ups):
            self.module_attrs(mlp_path, self.model.get_submodule(mlp_path), _FFN_ATTRS, inter, ffn)

    def experts(self, path: str, roles: dict[str, tuple[str, nn.Module]], hidden: str | None) -> None:
        """A mixture of experts: one FFN width for every expert of the layer (the same channels of
        each expert's ``gate_up_proj`` halves and ``down_proj`` columns, one importance order for
        all of them, which permutes each expert alike and keeps the function), the router's
        hidden columns, and the modules' ``intermediate_dim`` / ``hidden_dim``."""
        ep, em = roles["experts"]
        inter = em.down_proj.shape[2]
        ffn = self.group(f"{path}:ffn", "width", inter, 1, "width")
        self.ax(f"{ep}.gate_up_proj", 1, ffn, chunks=2)
        self.ax(f"{ep}.down_proj", 2, ffn)
        self.ax(f"{ep}.gate_up_proj", 2, hidden)
        self.ax(f"{ep}.down_proj", 1, hidden)
        self.module_attrs(ep, em, ("intermediate_dim", "intermediate_size"), inter, ffn)
        self.module_attrs(ep, em, ("hidden_dim", "hidden_size"), self.hidden, hidden)
        if "router" in roles:
            rp, rm = roles["router"]
            self.ax(f"{rp}.weight", 1, hidden)
            self.module_attrs(rp, rm, ("hidden_dim", "hidden_size"), self.hidden, hidden)

    def outside(self, stack_path: str, hidden: str | None) -> None:
        """Embeddings, final norms, poolers and task heads: only the hidden width reaches them."""
        if hidden is None:
            return
        for name, m in self.model.named_modules():
            if name == stack_path or name.startswith(stack_path + "."):
                continue
            if isinstance(m, nn.Embedding) and m.embedding_dim == self.hidden:
                self.ax(f"{name}.weight", 1, hidden)
                self.attr(name, "embedding_dim", hidden)
                self.plan.sites[name] = "embedding"
            elif (isinstance(m, nn.Linear) or _is_conv1d(m)) and _io(m)[0] == self.hidden:
                if self.reads.get(name) in self.stream:
                    self.proj(name, m, inp=hidden)
                else:
                    self.note(name, "reads a tensor that is not the residual stream (e.g. a pooler's output); "
                              "kept at full width")
            elif isinstance(m, nn.Conv2d) and m.out_channels == self.hidden and m.groups == 1:
                self.ax(f"{name}.weight", 0, hidden)
                self.ax(f"{name}.bias", 0, hidden)
                self.attr(name, "out_channels", hidden)
            elif _is_norm(m):
                self.norm(name, m, hidden)
            else:
                for t, p in m.named_parameters(recurse=False):
                    if p.dim() >= 1 and p.shape[-1] == self.hidden:
                        self.ax(f"{name}.{t}" if name else t, p.dim() - 1, hidden)
                self.module_attrs(name, m, _HIDDEN_ATTRS, self.hidden, hidden)

    # ---------------------------------------------------------------- finish: tensors, stages, MACs
    def finish(self, blocks: list[str], stack_path: str | None, norms: list[str] = ()):
        plan = self.plan
        plan.groups = list(self.groups.values())
        for fqn, t in self.state.items():
            plan.tensors[fqn] = {"shape": list(t.shape), "param": fqn in self.params,
                                 "axes": self.axes.get(fqn, {})}
        n = len(blocks)
        arities = set(self.tuple_layers.values())
        if "depth" in self.dims and (None in arities or len(arities) > 1):
            self.note(stack_path, "its layers return tuples with more than the hidden states (a skipped layer could "
                      "not give the rest); depth stays fixed")
        elif "depth" in self.dims and n > 1 and stack_path is not None:
            name = stack_path
            if self.excluded(name):
                self.note(name, "excluded by the user")
            else:
                mode = plan.depth_mode
                st: dict[str, Any] = {"name": name, "blocks": blocks, "n_mandatory": 1, "drop": "remove"}
                if arities:  # (hidden_states, None, ...): a skipped layer returns that shape too
                    st["skip_tuple"] = arities.pop()
                if mode == "skippable":
                    first = math.ceil(n / 2)
                    st.update(first_skippable=first, choices=[n, first])
                else:
                    st.update(first_skippable=n, choices=list(range(n, 0, -1)))
                    if mode == "spaced":
                        st["order"] = _spread_order(n)
                plan.stages.append(st)
                if mode == "skippable":
                    mandatory = set(blocks[: st["first_skippable"]])
                    for p in norms:
                        if p.rsplit(".", 1)[0] in mandatory or any(p.startswith(b + ".") for b in mandatory):
                            names = [t for t in ("weight", "bias") if f"{p}.{t}" in self.state]
                            plan.switchable[p] = {"stage": name, "tensors": names}
        elif "depth" in self.dims:
            self.note(stack_path or "<model>", "no layer stack with two or more layers; depth stays fixed")
        plan.mac_terms = self.mac_terms()
        return plan

    def trace(self, stack_path: str) -> None:
        """One forward pass with hooks: MACs and tokens per projection, and which tensors are the residual stream.

        The stream is every output of a layer of the stack, of an embedding and of a norm; a projection
        outside the stack reads the stream if its input shares storage with one of those (a view such
        as ``hidden[:, 0]`` does; a pooler's ``tanh(dense(x))`` does not).

        Token inputs longer than 16 are traced at 16 tokens, and the projections that see every token
        are counted at the full length (MACs are linear in tokens, attention matmuls quadratic).
        """
        inputs, short, full = self.inputs, 0, 0
        x0 = inputs[0] if inputs else None
        if isinstance(x0, torch.Tensor) and x0.dim() == 2 and not x0.is_floating_point() and x0.shape[1] > 16:
            short, full = 16, int(x0.shape[1])
            inputs = (x0[:, :short], *inputs[1:])
        self.seen, self.tokens, self.reads, self.stream = {}, {}, {}, set()
        self.tuple_layers: dict[str, int | None] = {}  # layer -> the arity of the tuple it returns
        hooks, alive = [], []  # tensors are kept alive so that no storage address is reused during the pass

        def storage(t: Any) -> int | None:
            if not isinstance(t, torch.Tensor):
                return None
            alive.append(t)
            return t.untyped_storage().data_ptr()

        n_batch = x0.shape[0] if isinstance(x0, torch.Tensor) and x0.dim() > 1 else 1  # MACs are per sample
        for name, m in self.model.named_modules():
            if _is_experts(m) or _is_router(m, self.hidden):
                def moe_hook(mod, args, out, name=name):  # per sample: tokens routed to an expert, or all tokens
                    if _is_experts(mod):  # args: (hidden (tokens, H), top_k_index (tokens, k), top_k_weights)
                        e, two_i, h = mod.gate_up_proj.shape
                        macs = args[1].numel() * (two_i * h + h * two_i // 2) / n_batch
                    else:
                        macs = args[0].numel() // args[0].shape[-1] * mod.weight.numel() / n_batch
                    self.seen[name] = self.seen.get(name, 0) + int(macs * (full / short if short else 1))
                hooks.append(m.register_forward_hook(moe_hook))
            elif isinstance(m, (nn.Linear, nn.Conv2d)) or _is_conv1d(m):
                def hook(mod, args, out, name=name):
                    x = args[0]
                    batch = n_batch  # not x.shape[0]: MoE blocks flatten (batch, tokens) into one axis
                    if isinstance(mod, nn.Conv2d):
                        k = mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
                        macs = out.numel() // batch * k
                    else:
                        i, o = _io(mod)
                        t = x.numel() // i // batch
                        self.tokens[name] = full if short and t == short else t
                        macs = self.tokens[name] * i * o
                    self.seen[name] = self.seen.get(name, 0) + macs
                    self.reads[name] = storage(x)
                hooks.append(m.register_forward_hook(hook))
            elif isinstance(m, nn.Embedding) or _is_norm(m) or name.startswith(stack_path + ".") and \
                    name.count(".") == stack_path.count(".") + 1:
                def out_hook(mod, args, out, name=name):
                    self.stream.add(storage(out[0] if isinstance(out, tuple) else out))
                    if name.startswith(stack_path + ".") and not isinstance(out, torch.Tensor):
                        # a tuple (hidden, None, ...) can be mimicked by a skipped layer; anything else not
                        self.tuple_layers[name] = (len(out) if isinstance(out, tuple) and out
                                                   and all(o is None for o in out[1:]) else None)
                hooks.append(m.register_forward_hook(out_hook))
        try:
            with torch.no_grad():
                out = self.model(*inputs)
        finally:
            for h in hooks:
                h.remove()
        first = out[0] if isinstance(out, (tuple, list)) or hasattr(out, "to_tuple") else out
        self.stream_is_output = storage(first) in self.stream
        alive.clear()

    def mac_terms(self) -> list[list[Any]]:
        """MACs per sample at the example inputs' size, as measured by :meth:`trace`."""
        terms = []
        for name, macs in self.seen.items():
            factors = sorted({a[0] for t in ("weight", "bias", "gate_up_proj")
                              for a in self.axes.get(f"{name}.{t}", {}).values()})
            terms.append([name, macs, factors])
        for attn_path, heads, q_path in self.attn_terms:
            n = self.tokens.get(q_path, 0)
            terms.append([attn_path, 2 * n * n * self.n_heads * self.head_dim, [heads]])
        return terms


def plan_transformer(model: nn.Module, inputs: tuple, *, dims: tuple[str, ...], depth_mode: str,
                     width_ratios: tuple[float, ...], heads_ratios: tuple[float, ...], exclude: tuple[str, ...] = ()):
    """The plan of a transformers ``PreTrainedModel``, from its structure (see the module docstring).

    Args:
        model: the model, in eval mode.
        inputs: example positional inputs, e.g. ``(input_ids,)`` of shape ``(1, tokens)``; MACs are
            counted per sample at this size.
        dims: any of ``"width"`` (FFN intermediate), ``"heads"``, ``"depth"``, ``"hidden"``.
        depth_mode: ``"prefix"``, ``"spaced"`` or ``"skippable"``.
        width_ratios: fractions of the FFN (and hidden) width offered.
        heads_ratios: fractions of the heads offered (rounded to whole key/value groups).
        exclude: ``fnmatch`` patterns of group names (``"model.layers.0:heads"``) or the stack to keep full.

    Returns:
        The :class:`elasticize.plan.Plan`.

    Raises:
        ValueError: for an unknown dimension or depth mode.
    """
    from ..plan import DIMENSIONS

    bad = [d for d in dims if d not in DIMENSIONS]
    if bad:
        raise ValueError(f"unknown dimension(s) {bad}; choose from {list(DIMENSIONS)}")
    if depth_mode not in ("prefix", "spaced", "skippable"):
        raise ValueError(f"depth_mode must be 'prefix', 'spaced' or 'skippable', not {depth_mode!r}")
    p = _Planner(model, inputs, tuple(dims), depth_mode, tuple(width_ratios), tuple(heads_ratios), tuple(exclude))
    return p.build()


# -------------------------------------------------------------------- extraction and export
def _uniform(values: list[int]) -> int | None:
    return values[0] if values and all(v == values[0] for v in values) else None


def sync_config(dense: nn.Module) -> None:
    """Make a dense sub-network's ``config`` and layer indices describe it.

    Sets ``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``, ``head_dim`` (when the
    config has it), the FFN size (``intermediate_size`` / ``n_inner`` / ``hidden_dim``) and
    ``hidden_size`` from the actual tensors, slices per-layer lists (``layer_types``), and renumbers
    ``layer_idx`` so that the KV cache has one slot per kept layer. Non-uniform values (layers of
    different sizes) are recorded in ``config.elasticize_layers`` and left out of the standard fields.

    Raises:
        ValueError: GPT-2 with ``scale_attn_by_inverse_layer_idx`` after layers were dropped (the
            scaling depends on the layer index, so the renumbered model would compute otherwise).
    """
    cfg = dense.config
    full_layers = int(cfg.num_hidden_layers)
    found = None
    for name, m in dense.named_modules():
        if isinstance(m, nn.ModuleList) and m and all(type(x) is type(m[0]) for x in m) and \
                type(m[0]).__name__.endswith(("Layer", "Block", "DecoderLayer", "EncoderLayer")):
            if found is None or name.count(".") < found[0].count("."):
                found = (name, m)
    if found is None:
        return
    _, layers = found
    n = len(layers)
    if n != full_layers and getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
        raise ValueError("this GPT-2 config scales attention by the inverse layer index, so a model with dropped "
                         "layers cannot be renumbered; convert without the depth dimension")
    lt = getattr(cfg, "layer_types", None)
    kept_idx = []
    for j, layer in enumerate(layers):
        old = None
        for m in layer.modules():
            if isinstance(m.__dict__.get("layer_idx"), int):
                old = m.layer_idx if old is None else old
                m.layer_idx = j
        kept_idx.append(old if old is not None else j)
    if isinstance(lt, list) and len(lt) == full_layers:
        cfg.layer_types = [lt[i] for i in kept_idx]
    cfg.num_hidden_layers = n
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rep = cfg.num_attention_heads // (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    heads, kv, inter, shared, per_layer = [], [], [], [], []
    for layer in layers:
        roles = {}
        for name, m in layer.named_modules():
            if _is_experts(m):
                roles.setdefault("experts", m)
            elif isinstance(m, nn.Linear) or _is_conv1d(m):
                role = next((r for r, rx in _ROLE_RE if rx.match(name)), None)
                if role is not None:
                    roles.setdefault(role, m)
        if "q" in roles:
            heads.append(_io(roles["q"])[1] // hd)
            kv.append(_io(roles["k"])[1] // hd)
        elif "qkv" in roles:  # rows: q, then k and v with one head per `rep` query heads (Phi-3's GQA)
            heads.append(_io(roles["qkv"])[1] * rep // (hd * (rep + 2)))
            kv.append(heads[-1] // rep)
        if "experts" in roles:
            inter.append(roles["experts"].down_proj.shape[2])
            if "down" in roles:
                shared.append(_io(roles["down"])[0])
        elif "down" in roles:
            inter.append(_io(roles["down"])[0])
        per_layer.append({"heads": heads[-1] if heads else None, "intermediate": inter[-1] if inter else None})
    emb = dense.get_input_embeddings() if hasattr(dense, "get_input_embeddings") else None
    hidden = emb.embedding_dim if isinstance(emb, nn.Embedding) else None
    nh, nkv, ni = _uniform(heads), _uniform(kv), _uniform(inter)
    if hidden is not None and hidden != cfg.hidden_size:
        cfg.hidden_size = hidden
    if nh is not None:
        if "head_dim" in cfg.to_dict():
            cfg.head_dim = hd
        cfg.num_attention_heads = nh
    if nkv is not None and hasattr(cfg, "num_key_value_heads"):
        cfg.num_key_value_heads = nkv
    keys = _FFN_CONFIG
    if any(l is not None and any(_is_experts(m) for m in l.modules()) for l in layers):  # experts' own keys
        keys = ("moe_intermediate_size", "intermediate_size")
        ns = _uniform(shared)
        if ns is not None and "shared_expert_intermediate_size" in cfg.to_dict():
            cfg.shared_expert_intermediate_size = ns
    if ni is not None:
        for a in keys:
            if a in cfg.to_dict() and (a != "hidden_dim" or cfg.model_type == "distilbert"):
                setattr(cfg, a, ni)
                break
    if nh is None or ni is None:
        cfg.elasticize_layers = per_layer
    if hasattr(dense, "tie_weights") and getattr(cfg, "tie_word_embeddings", False):
        out = dense.get_output_embeddings() if hasattr(dense, "get_output_embeddings") else None
        if out is not None and emb is not None and out.weight.shape == emb.weight.shape and \
                torch.equal(out.weight, emb.weight):
            out.weight = emb.weight


def export_problem(dense: nn.Module) -> str | None:
    """Why ``dense`` (a synced dense sub-network) cannot be saved as a plain transformers folder, or None.

    Builds the model class from the sub-network's config on the ``meta`` device and compares every
    tensor shape: the family's config must describe the sub-network exactly. Then builds it for
    real with the sub-network's tensors and compares one short forward (see ``_reload_problem``).
    """
    cfg = dense.config
    if getattr(cfg, "elasticize_layers", None):
        return "its layers differ in heads or FFN width, and this family's config has one value for all layers"
    try:
        with torch.device("meta"):
            ref = type(dense)._from_config(cfg)
    except (ValueError, TypeError, AssertionError, RuntimeError) as e:
        return f"{type(dense).__name__} rejects the sub-network's config ({str(e).splitlines()[0]})"
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in dense.state_dict().items()}
    for k, shape in have.items():
        if k in want and want[k] != shape:
            return (f"{type(dense).__name__} built from the sub-network's config has {k} of shape {list(want[k])}, "
                    f"the sub-network {list(shape)} (e.g. {cfg.model_type} derives head_dim from hidden_size / "
                    "num_attention_heads, so its heads and hidden width can only shrink together)")
    missing = sorted(set(want) ^ set(have))
    if missing:
        return f"the tensors differ from the family's: {missing[:4]}"
    return _reload_problem(dense)


def _reload_problem(dense: nn.Module) -> str | None:
    """Whether the family, built from the sub-network's config with its tensors, computes what it computes.

    A family may derive a constant from the config at construction (Gemma's and BioGPT's
    embedding scale ``sqrt(hidden_size)``), which a narrower sub-network keeps at its full-size
    value: shapes match, outputs do not. One short input (8 token ids, or one random image)
    through both tells; the first scalar attribute or buffer that differs is named.
    """
    cfg = dense.config
    if getattr(dense, "main_input_name", "input_ids") == "pixel_values":
        size, ch = getattr(cfg, "image_size", None), getattr(cfg, "num_channels", 3)
        if not isinstance(size, int):
            return None
        x = torch.randn(1, ch, size, size, generator=torch.Generator().manual_seed(0))
    else:
        x = torch.arange(8).unsqueeze(0) % max(1, int(getattr(cfg, "vocab_size", 8) or 8))
    from ..batches import default_output  # the trainer's reading of a model output

    p = next(dense.parameters())
    try:
        ref = type(dense)._from_config(cfg).to(device=p.device, dtype=p.dtype).eval()
        ref.load_state_dict(dense.state_dict(), strict=False)
        with torch.no_grad():
            a, b = default_output(ref(x.to(p.device))), default_output(dense.eval()(x.to(p.device)))
    except Exception:  # noqa: BLE001 - a family that cannot run this probe is not judged by it
        return None
    diff = (a.float() - b.float()).abs().max().item()
    if diff <= 1e-4 * max(1.0, b.float().abs().max().item()):
        return None
    cause = ""
    mine = dict(dense.named_modules())
    for name, m in ref.named_modules():
        d = mine.get(name)
        scalars = [(k, v, getattr(d, k, None)) for k, v in vars(m).items() if isinstance(v, float)]
        scalars += [(k, v.item(), getattr(d, k).item()) for k, v in m._buffers.items()
                    if v is not None and v.dim() == 0 and isinstance(getattr(d, k, None), torch.Tensor)]
        bad = next(((k, v, w) for k, v, w in scalars if isinstance(w, float) and abs(v - w) > 1e-6 * max(1, abs(w))), None)
        if bad:
            cause = f": {name}.{bad[0]} is {bad[1]:.6g} from the config, {bad[2]:.6g} in the sub-network"
            break
    return (f"{type(dense).__name__} built from the sub-network's config computes something else (outputs differ by "
            f"{diff:.2g}{cause}); a sub-network that keeps the sizes the config derives it from can be saved")


def save_hf(dense: nn.Module, directory: str | Path, *, files: Mapping[str, bytes] | None = None,
            source: str | None = None, overwrite: bool = False) -> Path:
    """Save a dense sub-network as a Hugging Face folder (``save_pretrained``: safetensors + ``config.json``).

    Tokenizer, generation and preprocessor files (:data:`TOKENIZER_FILES`) come from ``files``
    (those an elasticize file carries, :attr:`ElasticModel.files`), or when it is empty are copied
    from ``source``, which must be the folder the model was converted from in this process (never a
    folder read from a manifest: another machine's path may hold another model). When neither gives
    a tokenizer or preprocessor file, a ``UserWarning`` says so: the folder loads as a model, but
    ``AutoTokenizer.from_pretrained`` on it fails or builds some other tokenizer.

    The folder is built next to its destination and swapped into place
    (``elasticize._files.swap_folder``): a failure leaves the old folder (or nothing) and no
    temporary folder, and replacing a folder leaves the old or the new one whole. The folder gets
    ``0o777 & ~umask`` (or the mode of the folder it replaces), its files ``0o666 & ~umask``.

    Args:
        dense: a dense sub-network from :meth:`ElasticModel.extract` of a transformers model.
        directory: the folder to write (missing parents are created).
        files: file name -> contents, names from :data:`TOKENIZER_FILES`.
        source: the folder the original model was converted from in this process.
        overwrite: replace an existing folder.

    Raises:
        ValueError: if the family's config cannot describe this sub-network (see :func:`export_problem`),
            ``directory`` is ``source`` or holds it, or a name in ``files`` is not an allowed file name
            (:func:`check_file_name`).
        FileExistsError: if ``directory`` exists and ``overwrite`` is False, or is a file.
        FileNotFoundError: a parent of ``directory`` is a file.
        PermissionError: the folder cannot be written (see :func:`elasticize._files.check_output`).
        OSError: writing failed (e.g. a full disk); the old folder stays.
    """
    from .._files import check_output, swap_folder

    out = check_output(directory, kind="folder", overwrite=overwrite, inputs=(source,))
    for name in files or {}:
        check_file_name(name)
    why = export_problem(dense)
    if why is not None:
        raise ValueError(f"this sub-network cannot be saved as a plain transformers folder: {why}")
    if not files and source is not None and Path(source).is_dir():
        files = folder_files(source, cap=None)
    written: list[str] = []

    def build(tmp: Path) -> None:
        cfg = dense.config
        extra = cfg.__dict__.pop("elasticize_layers", None)
        try:
            dense.save_pretrained(tmp)
        finally:
            if extra is not None:
                cfg.elasticize_layers = extra
        written.extend(write_files(files or {}, tmp))

    swap_folder(out, build, overwrite=overwrite, inputs=(source,))
    if not has_tokenizer(written):
        warnings.warn(f"{out} has no tokenizer: no tokenizer or preprocessor files came with the model (its "
                      "elasticize file carries none: made from a model object or a folder without them, or by an older "
                      "elasticize); save the original's into it: AutoTokenizer.from_pretrained(ORIGINAL)"
                      f".save_pretrained({str(out)!r})", stacklevel=2)
    return out


# -------------------------------------------------------------------- the adapter
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
        ``name``'s snapshot in the local cache (:func:`folder_files`; nothing is downloaded)."""
        folder = Path(name) if Path(name).is_dir() else _hub_folder(name)
        return {} if folder is None else folder_files(folder)

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
