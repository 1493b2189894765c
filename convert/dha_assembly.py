"""DHA's assembly of one layer: its heads fused into given groups (``dha_fusion``'s closed form), the
fused attention as a module, and the layer-local refinement that may follow the closed form."""

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from transformers import LlamaConfig

from rehead import families
from rehead.layouts.configuration_dha import DHAConfig
from rehead.layouts.modeling_dha import DHAAttention, DHADecoderLayer

from .dha_fusion import LayerFusion, NormedKeys, augmented, equal_groups
from .refine import refine_attention
from .rewriter import LayerInput, build_layer, llama_values

NORMS = ("self_attn.q_norm.weight", "self_attn.k_norm.weight")


@dataclass
class Grouping:
    """One layer's fused key heads and value heads: the source KV heads each one stands for, and the
    fused head each query head reads."""

    key_groups: list[tuple[int, ...]]
    value_groups: list[tuple[int, ...]]
    key_of_query: list[int]
    value_of_query: list[int]


class Assembly:
    """Fuses the layers of one source (its LLaMA form ``llama``); modules are built on ``device``."""

    def __init__(self, llama: LlamaConfig, device: str):
        self.llama, self.device = llama, device
        self.heads = llama.num_attention_heads
        self.kv = llama.num_key_value_heads or self.heads
        self.reads = [i // (self.heads // self.kv) for i in range(self.heads)]
        self.qk_norm = getattr(llama, "qk_norm", False)  # Qwen3's per-head q/k norms
        self.query_scale = False  # set by the rewriter: fused keys fold into q_pair_scale (dha_query_scale)

    def fusion(self, layer: LayerInput) -> LayerFusion:
        """The layer's heads and, on its calibration text, the second moment of its attention input."""
        t = layer.tensors
        bias = lambda name: t.get(f"self_attn.{name}.bias")  # noqa: E731
        q = augmented(t["self_attn.q_proj.weight"], bias("q_proj"), self.heads)
        k = augmented(t["self_attn.k_proj.weight"], bias("k_proj"), self.kv)
        v = augmented(t["self_attn.v_proj.weight"], bias("v_proj"), self.kv)
        width, normed = q.shape[2], None
        if layer.calibration is None:
            moment = torch.eye(width, dtype=torch.float64)  # mean fusion needs no statistics
        else:
            sums = {"moment": torch.zeros(width, width, dtype=torch.float64), "tokens": 0}
            if self.qk_norm:  # the normalised keys' statistics (dha_fusion's docstring)
                sums.update(normed=torch.zeros(width, width, dtype=torch.float64),
                            alpha=torch.zeros(self.kv, dtype=torch.float64),
                            query=torch.zeros(self.heads, q.shape[1], dtype=torch.float64))

            def on_input(module, args, output):
                x = args[0].flatten(0, 1).double()
                x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], 1)
                sums["moment"] += (x.T @ x).cpu()
                sums["tokens"] += len(x)

            def on_key(module, args, output):  # r_j² of every token and KV head, σ² their mean over the heads
                x = args[0].flatten(0, 1).double()
                x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], 1)
                r2 = output.flatten(0, 1).double().unflatten(-1, (self.kv, -1)).pow(2).mean(-1)  # (N, KV)
                sigma2 = r2.mean(-1, keepdim=True).clamp_min(1e-30)
                sums["normed"] += ((x / sigma2).T @ x).cpu()
                sums["alpha"] += (r2 / sigma2).sum(0).cpu()

            def on_query_norm(module, args, output):
                sums["query"] += output.flatten(0, 1).double().pow(2).sum(0).cpu()

            attn = layer.source_layer.self_attn
            hooks = {attn.q_proj: on_input}
            if self.qk_norm:
                hooks.update({attn.k_proj: on_key, attn.q_norm: on_query_norm})
            layer.calibration.run(layer.source_layer, hooks)
            moment = sums["moment"] / sums["tokens"]
            if self.qk_norm:
                n = sums["tokens"]
                normed = NormedKeys(sums["normed"] / n, (sums["alpha"] / n).sqrt(),
                                    t["self_attn.k_norm.weight"].double(), sums["query"] / n)
        # the q/k norms (Qwen3) stay as they are: a fused key head is normalised like the source's
        return LayerFusion(q, k, v, t["self_attn.o_proj.weight"], moment, self.reads, normed,
                           {name: t[name] for name in NORMS if name in t})

    def shared_groups(self, fusion: LayerFusion, count: int, mean: bool) -> list[tuple[int, ...]]:
        """``count`` equal groups for K and V alike: contiguous for mean pooling, else grown where the
        joint key and value fit error is least."""
        size = self.kv // count
        if mean:
            return [tuple(range(g * size, (g + 1) * size)) for g in range(count)]
        return equal_groups(self.kv, size, lambda g: fusion.key_error(g) + fusion.value_error(g))

    def assemble(self, fusion: LayerFusion, key_groups, value_groups, mean: bool = False,
                 permute: bool = False) -> tuple[dict[str, torch.Tensor], Grouping]:
        """The fused attention's tensors (float32, names under self_attn.) and its grouping."""
        fused_k, scales = zip(*(fusion.fuse_keys(g, mean) for g in key_groups))
        fused_v, maps = zip(*(fusion.fuse_values(g, mean) for g in value_groups))
        key_of = {j: n for n, g in enumerate(key_groups) for j in g}
        value_of = {j: n for n, g in enumerate(value_groups) for j in g}
        scale = {j: s for part in scales for j, s in part.items()}
        vmap = {j: m for part in maps for j, m in part.items()}
        order = list(range(self.heads))
        if permute:  # each group's readers contiguous: stock grouped-query attention
            order = sorted(order, key=lambda i: (key_of[self.reads[i]], i))
        width = fusion.width - 1
        tensors = {}
        if self.query_scale:  # q_norm divides by the query's RMS: the scales go after it, per head
            q = torch.cat([fusion.q[i] for i in order])
            conj = [scale[self.reads[i]].conj() for i in order]
            tensors["self_attn.q_pair_scale"] = torch.stack([torch.cat([c.real, c.imag]) for c in conj])
        else:
            q = torch.cat([fusion.fold_query(i, scale[self.reads[i]]) for i in order])
        k, v = torch.cat(fused_k), torch.cat(fused_v)
        tensors.update(fusion.norm_weights)
        tensors.update({
            "self_attn.q_proj.weight": q[:, :width],
            "self_attn.k_proj.weight": k[:, :width],
            "self_attn.v_proj.weight": v[:, :width],
            "self_attn.o_proj.weight": torch.cat([fusion.o[:, i] @ vmap[self.reads[i]].T for i in order], dim=1),
        })
        if self.llama.attention_bias:
            tensors.update({"self_attn.q_proj.bias": q[:, width], "self_attn.k_proj.bias": k[:, width],
                            "self_attn.v_proj.bias": v[:, width]})
        tensors = {name: t.float() for name, t in tensors.items()}
        grouping = Grouping(list(key_groups), list(value_groups), [key_of[self.reads[i]] for i in order],
                            [value_of[self.reads[i]] for i in order])
        return tensors, grouping

    def config(self, groupings: Mapping[int, Grouping]) -> DHAConfig:
        """The DHA config with these layers' groupings; any other layer keeps the source's grouping."""
        layers = range(self.llama.num_hidden_layers)
        config = DHAConfig(
            **llama_values(self.llama),
            key_heads_per_layer=[len(groupings[i].key_groups) if i in groupings else self.kv for i in layers],
            value_heads_per_layer=[len(groupings[i].value_groups) if i in groupings else self.kv for i in layers],
            key_head_of_query=[groupings[i].key_of_query if i in groupings else self.reads for i in layers],
            value_head_of_query=[groupings[i].value_of_query if i in groupings else self.reads for i in layers],
            dha_query_scale=self.query_scale,
        )
        config._attn_implementation = "sdpa"
        return config

    def attention(self, index: int, tensors: dict, grouping: Grouping) -> DHAAttention:
        """A float32 DHA attention module holding ``tensors`` (names under self_attn.)."""
        with torch.device("meta"):
            attn = DHAAttention(self.config({index: grouping}), index)
        state = {k.removeprefix("self_attn."): v.to(self.device) for k, v in tensors.items()}
        state = families.with_o_proj_bias(state, self.llama, prefix="")
        attn.load_state_dict(state, assign=True)
        return attn.eval()

    def layer_module(self, index: int, tensors: dict[str, torch.Tensor], grouping: Grouping):
        return build_layer(DHADecoderLayer, self.config({index: grouping}), index, tensors, self.device)


def refine(assembly: Assembly, layer: LayerInput, tensors: dict[str, torch.Tensor], grouping: Grouping, steps: int,
           lr: float) -> tuple[dict[str, torch.Tensor], dict]:
    """The fused attention refined to the source layer's attention output (``refine.refine_attention``):
    the tensors (the closed form's unless refining lowered the error) and the refinement's record."""
    # the module's parameters on clones: Adam's in-place steps must not reach the closed form's tensors
    attn = assembly.layer_module(layer.index, {k: v.clone() for k, v in tensors.items()}, grouping).self_attn
    kept, record = refine_attention(attn, layer, ("q_proj", "k_proj", "v_proj", "o_proj", "q_pair_scale", "k_norm"),
                                    steps, lr)
    if not kept:
        return tensors, record
    refined = {f"self_attn.{name}": p.detach().cpu() for name, p in attn.named_parameters()}
    return {**tensors, **{k: v for k, v in refined.items() if k in tensors}}, record
