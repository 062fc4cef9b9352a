"""The plan of a transformers model from its structure, without torch.fx.

Transformers 5 removed torch.fx support, and tracing a whole transformer is slow and loses
the layer structure, so this planner reads the model's own structure instead, and writes what
it finds through :class:`elasticize.plan.builder.PlanBuilder`:

* the **layer stack** is the ``nn.ModuleList`` with ``config.num_hidden_layers`` entries;
* in each layer, the projections are found by name (:mod:`~elasticize.adapters.hf.roles`) and
  checked against the config's sizes;
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
linear / ``Conv1D`` / convolution as measured by one forward pass with hooks
(:mod:`~elasticize.adapters.hf.trace`), plus ``2 * tokens^2 * heads * head_dim`` per attention
for the two attention matmuls.

A model of a family this planner does not know still converts: whatever it can find is
elastic, and the plan's ``not_elastic`` lists each layer or group it could not make
elastic and why.
"""

from __future__ import annotations

import torch
from torch import nn

from ...plan import DEPTH_MODES, Plan, PlanBuilder
from .roles import (FFN_ATTRS, HEAD_CHANNEL_ATTRS, HEADS_ATTRS, HIDDEN_ATTRS, INTERLEAVED_QKV, KV_ATTRS, QK_NORM_RE,
                    find_layers, in_out, is_conv1d, is_experts, is_norm, is_router, proj_axes, role_of)
from .trace import trace

__all__ = ["plan_transformer"]

Roles = dict[str, tuple[str, nn.Module]]  # role -> (path, module) of one layer's projections


class _Planner:
    """Finds the elastic parts of one transformers model and writes them through a :class:`PlanBuilder`."""

    def __init__(self, model: nn.Module, inputs: tuple, b: PlanBuilder) -> None:
        self.model, self.inputs, self.b = model, inputs, b
        params = {n for n, _ in model.named_parameters()}
        self.state = model.state_dict(keep_vars=True)
        for fqn, t in self.state.items():
            b.tensor(fqn, shape=list(t.shape), param=fqn in params)
        self.attn_terms: list[tuple[str, str, str]] = []  # (attention path, heads group, q/qkv path)
        cfg = model.config
        self.cfg = cfg
        self.hidden = int(getattr(cfg, "hidden_size", 0) or 0)
        self.n_heads = int(getattr(cfg, "num_attention_heads", 0) or 0)
        self.n_kv = int(getattr(cfg, "num_key_value_heads", None) or self.n_heads)
        hd = getattr(cfg, "head_dim", None)
        self.head_dim = int(hd) if hd else (self.hidden // self.n_heads if self.n_heads else 0)

    # ---------------------------------------------------------------- helpers
    def proj(self, path: str, m: nn.Module, *, out: str | None = None, inp: str | None = None,
             out_chunks: int = 1, out_div: int = 1) -> None:
        """Elastic rows (``out``) and/or columns (``inp``) of a Linear or Conv1D, with its size attributes."""
        b = self.b
        o_ax, i_ax = proj_axes(m)
        b.axis(f"{path}.weight", o_ax, out, out_chunks, out_div)
        b.axis(f"{path}.bias", 0, out, out_chunks, out_div)
        b.axis(f"{path}.weight", i_ax, inp)
        if is_conv1d(m):
            b.attr(path, "nf", out, mul=out_chunks, div=out_div)
            b.attr(path, "nx", inp)
        else:
            b.attr(path, "out_features", out, mul=out_chunks, div=out_div)
            b.attr(path, "in_features", inp)
        if isinstance(m, nn.Linear):
            b.site(path, "linear")

    def module_attrs(self, path: str, m: nn.Module, names: tuple[str, ...], full: int, group: str | None,
                     div: int = 1) -> None:
        for a in names:
            v = m.__dict__.get(a)
            if isinstance(v, int) and not isinstance(v, bool) and v == full:
                self.b.attr(path, a, group, div=div)

    # ---------------------------------------------------------------- the plan
    def build(self) -> Plan:
        found = find_layers(self.model, int(getattr(self.cfg, "num_hidden_layers", 0) or 0))
        if found is None or not self.n_heads or not self.hidden:
            self.b.note("<model>", f"{type(self.model).__name__}: no layer stack of config.num_hidden_layers layers, "
                        "or no num_attention_heads / hidden_size in its config; nothing was made elastic")
            self.traced = trace(self.model, self.inputs, "\0", self.hidden)
            return self.finish([], None)
        stack_path, layers = found
        self.traced = trace(self.model, self.inputs, stack_path, self.hidden)
        hidden = self.b.group("hidden", "hidden", self.hidden, 1, dim="hidden") if "hidden" in self.b.dims else None
        if hidden is not None and self.traced.stream_is_output:
            self.b.keep_order(hidden, "not sorted by importance: the model's output is the residual stream, whose "
                              "channel order the user sees")
        blocks, norms = [], []
        for i, layer in enumerate(layers):
            path = f"{stack_path}.{i}"
            blocks.append(path)
            self.layer(path, layer, hidden)
            norms += [f"{path}.{n}" for n, m in layer.named_modules() if n and is_norm(m)]
        self.outside(stack_path, hidden)
        return self.finish(blocks, stack_path, norms)

    def layer(self, path: str, layer: nn.Module, hidden: str | None) -> None:
        roles: Roles = {}
        unknown, qk_norms = [], []
        for name, m in layer.named_modules():
            if is_experts(m):
                roles["experts"] = (f"{path}.{name}", m)
            elif is_router(m, self.hidden):
                roles["router"] = (f"{path}.{name}", m)
            elif isinstance(m, nn.Linear) or is_conv1d(m):
                role = role_of(name)
                if role is None or role in roles:
                    unknown.append(name)
                else:
                    roles[role] = (f"{path}.{name}", m)
            elif is_norm(m) and QK_NORM_RE.match(name):
                qk_norms.append((f"{path}.{name}", m, QK_NORM_RE.match(name).group(2)[0]))
            elif is_norm(m):
                self.norm(f"{path}.{name}", m, hidden)
        if unknown:
            self.b.note(path, f"projections {unknown} have no known role; heads and FFN width of this layer stay fixed")
            return
        self.attention(path, roles, hidden, qk_norms)
        self.ffn(path, roles, hidden)

    def norm(self, path: str, m: nn.Module, hidden: str | None) -> None:
        """A norm over the residual stream: its tensors and ``normalized_shape`` follow ``hidden``."""
        w = getattr(m, "weight", None)
        if hidden is None or (isinstance(w, torch.Tensor) and w.dim() == 1 and w.shape[0] != self.hidden):
            return
        for t in ("weight", "bias"):
            self.b.axis(f"{path}.{t}", 0, hidden)
        if isinstance(m, nn.LayerNorm):
            self.b.attr(path, "normalized_shape", hidden, kind="shape")
            self.b.site(path, "layernorm")

    def heads_group(self, path: str, roles: Roles, qk_norms: list[tuple[str, nn.Module, str]],
                    sizes: dict[str, int]) -> str | None:
        """The layer's heads group, or None with the reason its heads stay fixed."""
        hd, nh, nkv = self.head_dim, self.n_heads, self.n_kv
        rep = nh // nkv if nkv else 1
        q_rows, kv_rows = nh * hd, nkv * hd
        fused = "qkv" in roles
        if fused:
            ok = in_out(roles["qkv"][1])[1] == 3 * q_rows and nkv == nh
        else:
            ok = in_out(roles["q"][1])[1] == q_rows and all(in_out(roles[r][1])[1] == kv_rows for r in "kv")
        ok = ok and in_out(roles["o"][1])[0] == q_rows
        # a q/k norm over one head acts inside each head; one over all heads keeps a row per head channel
        odd = [n for n, _, which in qk_norms if sizes[n] not in (hd, q_rows if which == "q" else kv_rows)]
        model_type = getattr(self.cfg, "model_type", "")
        if fused and model_type in INTERLEAVED_QKV:
            self.b.note(path, f"{model_type}'s fused query_key_value interleaves its heads; heads stay fixed")
        elif odd:
            self.b.note(path, f"query/key norms {odd} are neither per head nor over all heads; heads stay fixed")
        elif fused and nkv != nh:
            self.b.note(path, f"fused q/k/v projection with grouped-query attention ({nh} query heads, {nkv} "
                        "key/value heads): its rows are not three equal chunks; heads stay fixed")
        elif not ok:
            self.b.note(path, f"attention projections do not match the config ({nh} heads, {nkv} key/value heads, "
                        f"head_dim {hd}); heads stay fixed")
        else:
            why = (f"grouped-query attention: {rep} query heads share each key/value head, so heads must be a "
                   f"multiple of {rep}") if rep > 1 else ""
            return self.b.group(f"{path}:heads", "heads", q_rows, hd, step=rep, constraint=why)
        return None

    def attention(self, path: str, roles: Roles, hidden: str | None,
                  qk_norms: list[tuple[str, nn.Module, str]] = ()) -> None:
        hd, nh, nkv = self.head_dim, self.n_heads, self.n_kv
        rep = nh // nkv if nkv else 1
        fused = "qkv" in roles
        need = ("qkv", "o") if fused else ("q", "k", "v", "o")
        if any(r not in roles for r in need):
            self.b.note(path, f"no attention projections found (looked for {list(need)}); heads stay fixed")
            return
        sizes = {n: (getattr(m, "weight", None).shape[0] if isinstance(getattr(m, "weight", None), torch.Tensor)
                     else hd) for n, m, _ in qk_norms}
        heads = self.heads_group(path, roles, qk_norms, sizes)
        if fused:
            self.proj(*roles["qkv"], out=heads, inp=hidden, out_chunks=3)
        else:
            self.proj(*roles["q"], out=heads, inp=hidden)
            for r in "kv":
                self.proj(*roles[r], out=heads, inp=hidden, out_div=rep)
        for n, m, which in qk_norms:
            if sizes[n] != hd:  # over all heads (OLMo 2): one entry per head channel, like the projection rows
                for t in ("weight", "bias"):
                    self.b.axis(f"{n}.{t}", 0, heads, div=1 if which == "q" else rep)
                if isinstance(m, nn.LayerNorm):
                    self.b.attr(n, "normalized_shape", heads, kind="shape", div=1 if which == "q" else rep)
        op, om = roles["o"]
        self.proj(op, om, out=hidden, inp=heads)
        attn_path = op.rpartition(".")[0] if fused else roles["q"][0].rpartition(".")[0]
        attn = self.model.get_submodule(attn_path)
        if heads is not None:
            self.module_attrs(attn_path, attn, HEADS_ATTRS, nh, heads, div=hd)
            self.module_attrs(attn_path, attn, HEAD_CHANNEL_ATTRS, nh * hd, heads)
            self.module_attrs(attn_path, attn, KV_ATTRS, nkv, heads, div=hd * rep)
            self.attn_terms.append((attn_path, heads, roles["qkv" if fused else "q"][0]))
        if hidden is not None:
            self.module_attrs(attn_path, attn, HIDDEN_ATTRS, self.hidden, hidden)

    def ffn(self, path: str, roles: Roles, hidden: str | None) -> None:
        if "reads_hidden" in roles:  # e.g. Qwen2-MoE's shared-expert gate: hidden columns, one output
            self.proj(*roles["reads_hidden"], inp=hidden)
        if "experts" in roles:
            self.experts(path, roles, hidden)
            if "down" not in roles:
                return
        if "down" not in roles or not ({"up", "gate_up"} & set(roles)):
            self.b.note(path, "no FFN up/down projections found; FFN width stays fixed")
            return
        dp, dm = roles["down"]
        inter = in_out(dm)[0]
        ups = [(r, *roles[r]) for r in ("up", "gate", "gate_up") if r in roles]
        sizes = {r: in_out(m)[1] // (2 if r == "gate_up" else 1) for r, _, m in ups}
        if any(s != inter for s in sizes.values()):
            self.b.note(path, f"FFN projections disagree on the intermediate size ({sizes}, down reads {inter}); fixed")
            ffn = None
        else:  # beside experts, a dense FFN is their shared expert (Qwen2-MoE)
            ffn = self.b.group(f"{path}:{'shared_ffn' if 'experts' in roles else 'ffn'}", "width", inter, 1)
        for r, p, m in ups:
            self.proj(p, m, out=ffn, inp=hidden, out_chunks=2 if r == "gate_up" else 1)
        self.proj(dp, dm, out=hidden, inp=ffn)
        mlp_path = dp.rpartition(".")[0]
        if ffn is not None and all(p.rpartition(".")[0] == mlp_path for _, p, _ in ups):
            self.module_attrs(mlp_path, self.model.get_submodule(mlp_path), FFN_ATTRS, inter, ffn)

    def experts(self, path: str, roles: Roles, hidden: str | None) -> None:
        """A mixture of experts: one FFN width for every expert of the layer (the same channels of
        each expert's ``gate_up_proj`` halves and ``down_proj`` columns, one importance order for
        all of them, which permutes each expert alike and keeps the function), the router's
        hidden columns, and the modules' ``intermediate_dim`` / ``hidden_dim``."""
        b = self.b
        ep, em = roles["experts"]
        inter = em.down_proj.shape[2]
        ffn = b.group(f"{path}:ffn", "width", inter, 1)
        b.axis(f"{ep}.gate_up_proj", 1, ffn, chunks=2)
        b.axis(f"{ep}.down_proj", 2, ffn)
        b.axis(f"{ep}.gate_up_proj", 2, hidden)
        b.axis(f"{ep}.down_proj", 1, hidden)
        self.module_attrs(ep, em, ("intermediate_dim", "intermediate_size"), inter, ffn)
        self.module_attrs(ep, em, ("hidden_dim", "hidden_size"), self.hidden, hidden)
        if "router" in roles:
            rp, rm = roles["router"]
            b.axis(f"{rp}.weight", 1, hidden)
            self.module_attrs(rp, rm, ("hidden_dim", "hidden_size"), self.hidden, hidden)

    def outside(self, stack_path: str, hidden: str | None) -> None:
        """Embeddings, final norms, poolers and task heads: only the hidden width reaches them."""
        if hidden is None:
            return
        b = self.b
        for name, m in self.model.named_modules():
            if name == stack_path or name.startswith(stack_path + "."):
                continue
            if isinstance(m, nn.Embedding) and m.embedding_dim == self.hidden:
                b.axis(f"{name}.weight", 1, hidden)
                b.attr(name, "embedding_dim", hidden)
                b.site(name, "embedding")
            elif (isinstance(m, nn.Linear) or is_conv1d(m)) and in_out(m)[0] == self.hidden:
                if self.traced.reads.get(name) in self.traced.stream:
                    self.proj(name, m, inp=hidden)
                else:
                    b.note(name, "reads a tensor that is not the residual stream (e.g. a pooler's output); "
                           "kept at full width")
            elif isinstance(m, nn.Conv2d) and m.out_channels == self.hidden and m.groups == 1:
                b.axis(f"{name}.weight", 0, hidden)
                b.axis(f"{name}.bias", 0, hidden)
                b.attr(name, "out_channels", hidden)
            elif is_norm(m):
                self.norm(name, m, hidden)
            else:
                for t, p in m.named_parameters(recurse=False):
                    if p.dim() >= 1 and p.shape[-1] == self.hidden:
                        b.axis(f"{name}.{t}" if name else t, p.dim() - 1, hidden)
                self.module_attrs(name, m, HIDDEN_ATTRS, self.hidden, hidden)

    # ---------------------------------------------------------------- finish: stages, MACs
    def finish(self, blocks: list[str], stack_path: str | None, norms: list[str] = ()) -> Plan:
        b = self.b
        arities = set(self.traced.tuple_layers.values())
        if "depth" in b.dims and (None in arities or len(arities) > 1):
            b.note(stack_path, "its layers return tuples with more than the hidden states (a skipped layer could "
                   "not give the rest); depth stays fixed")
        elif "depth" in b.dims and len(blocks) > 1 and stack_path is not None:
            # (hidden_states, None, ...): a skipped layer returns that shape too
            b.stage(stack_path, blocks, n_mandatory=1, drop="remove", skip_tuple=arities.pop() if arities else None)
            b.switchable({p: [t for t in ("weight", "bias") if f"{p}.{t}" in self.state] for p in norms})
        elif "depth" in b.dims:
            b.note(stack_path or "<model>", "no layer stack with two or more layers; depth stays fixed")
        for name, macs in self.traced.seen.items():
            b.mac_term(name, macs, b.axis_groups([f"{name}.{t}" for t in ("weight", "bias", "gate_up_proj")]))
        for attn_path, heads, q_path in self.attn_terms:
            n = self.traced.tokens.get(q_path, 0)
            b.mac_term(attn_path, 2 * n * n * self.n_heads * self.head_dim, [heads])
        return b.finish()


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
    b = PlanBuilder(tracer="structure", dims=tuple(dims), depth_mode=depth_mode, width_ratios=tuple(width_ratios),
                    heads_ratios=tuple(heads_ratios), exclude=tuple(exclude), depth_modes=DEPTH_MODES)
    return _Planner(model, inputs, b).build()
