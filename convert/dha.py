"""``--to dha``: decoupled-head attention, with key heads and value heads fused separately per layer.

Two streamed passes over the layers:
1. plan: on the source's own activations, each layer's fit-error curve for keeping 1 … KV key
   heads and 1 … KV value heads (groups merged cheapest first), priced at the layer's attention
   output or, with ``--allocation logits``, by its effect on the final logits; the global budget then
   goes, one head at a time, to the layer and kind (K or V) whose next merge would cost the most;
2. convert: on the converted prefix's activations, each layer's groups are formed again at the
   planned counts and fused in closed form (``dha_fusion``), optionally refined for a few steps
   to match the source layer's attention output.

``--uniform``: the same number of groups in every layer, shared by K and V, equal in size;
query heads are permuted so that each group's readers are contiguous, and the result is a stock
grouped-query checkpoint. ``--fusion mean`` averages the members' weights (Ainslie et al. 2023).
"""

import heapq
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from rehead import architectures
from rehead.errors import ReheadError
from rehead.heads import mha_config
from rehead.layouts.configuration_dha import DHAConfig
from rehead.layouts.modeling_dha import DHAAttention, DHADecoderLayer

from .dha_fusion import LayerFusion, agglomerate, augmented, equal_groups
from .engine import LayerInput, Rewriter, build_layer, llama_values
from .options import ConvertOptions

HEATMAP_LAYERS = 3
PROBE_SEQUENCES = 4  # calibration sequences on which the planning pass measures attention errors


def allocate(curves: dict, target: int, start: int) -> dict:
    """Removes heads one at a time where the next merge costs least until ``target`` heads remain.

    curves[(layer, kind)][n] is the fit error with n heads; every entry starts at ``start`` heads.
    """
    counts = {key: start for key in curves}
    heap = [(curve[start - 1] - curve[start], key) for key, curve in curves.items() if start > 1]
    heapq.heapify(heap)
    remaining = start * len(curves)
    while remaining > target:
        _, key = heapq.heappop(heap)
        counts[key] -= 1
        remaining -= 1
        n = counts[key]
        if n > 1:
            heapq.heappush(heap, (curves[key][n - 1] - curves[key][n], key))
    return counts


@dataclass
class Probe:
    """A few calibration sequences at a layer's attention input, and the source attention's output on them."""

    x: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    target: torch.Tensor
    scale: float

    @classmethod
    def of(cls, layer: LayerInput) -> "Probe":
        calib, source = layer.calibration, layer.source_layer
        hidden = calib.hidden[:PROBE_SEQUENCES]
        cos, sin = (t[: len(hidden)] for t in calib.position_embeddings)
        with torch.no_grad():
            x = source.input_layernorm(hidden)
            target = source.self_attn(x, position_embeddings=(cos, sin))[0]
        return cls(x, (cos, sin), target, hidden.pow(2).mean().item())

    @torch.no_grad()
    def error(self, attention: torch.nn.Module, sensitivity: torch.Tensor | None = None) -> float:
        """``attention``'s squared error on the probe, relative to the residual stream's energy; with the
        layer's ``sensitivity`` (``--allocation logits``), its Fisher-weighted error ½ Σ G ⊙ e² per token."""
        out = attention(self.x, position_embeddings=self.position_embeddings)[0]
        error = (out - self.target).pow(2)
        if sensitivity is None:
            return error.mean().item() / self.scale
        return 0.5 * (sensitivity * error).sum().item() / error[..., 0].numel()


class DHAOptions(ConvertOptions):
    to: Literal["dha"] = "dha"
    kv_budget: float | None = Field(None, description="fraction of the source's key and value heads kept over all "
                                                      "layers, spent where fusing costs least (e.g. 0.25)")
    k_budget: float | None = Field(None, description="fraction of the key heads kept (with --v-budget)")
    v_budget: float | None = Field(None, description="fraction of the value heads kept (with --k-budget)")
    fusion: Literal["optimal", "mean"] = Field(
        "optimal", description="optimal: closed-form least-squares fusion folded into q_proj and o_proj; "
                               "mean: GQA mean-pooling (Ainslie et al. 2023)")
    uniform: bool = Field(False, description="equal groups shared by K and V in every layer: a stock grouped-query "
                                             "checkpoint")
    allocation: Literal["attention", "logits"] = Field(
        "logits", description="how the planner prices fusing a layer's heads: attention (the error at the layer's "
                                 "attention output) or logits (its effect on the model's output: the error weighted by "
                                 "the Fisher information of the next-token distribution, ~ the KL to the source's)")
    refine_steps: int = Field(30, ge=0, description="layer-local refinement steps after the closed form, on the "
                                                    "layers that fuse heads (0: the closed form alone)")
    refine_lr: float = Field(1e-4, gt=0, description="learning rate of the refinement")
    export: Literal["deci"] | None = Field(None, description="deci: a DeciLM (nemotron-nas) checkpoint with a KV head "
                                                             "count per layer, which vLLM and llama.cpp serve")

    @model_validator(mode="after")
    def _budgets(self):
        given = {f: v for f, v in (("--kv-budget", self.kv_budget), ("--k-budget", self.k_budget),
                                   ("--v-budget", self.v_budget)) if v is not None}
        if not given:
            raise ReheadError("--to dha needs a budget: --kv-budget F, or --k-budget F and --v-budget F")
        if self.kv_budget is not None and len(given) > 1:
            raise ReheadError("give either --kv-budget or --k-budget/--v-budget, not both")
        for flag, value in given.items():
            if not 0 < value <= 1:
                raise ReheadError(f"{flag} {value:g}: must be in (0, 1], the fraction of the source's heads kept")
        if self.uniform and self.kv_budget is None and self.k_budget != self.v_budget:
            raise ReheadError("--uniform shares groups between K and V: give --kv-budget, or equal --k/--v budgets")
        return self


class DHARewriter(Rewriter):
    layout = "dha"
    Options = DHAOptions

    def setup(self, source_config: dict) -> None:
        super().setup(source_config)
        o = self.options
        self.reads = [i // (self.heads // self.kv) for i in range(self.heads)]
        self.joint = o.kv_budget is not None
        budgets = {"kv": o.kv_budget} if self.joint else {"k": o.k_budget or 1.0, "v": o.v_budget or 1.0}
        per_kind = self.layers * self.kv
        self.targets = {kind: round(b * per_kind * (2 if kind == "kv" else 1)) for kind, b in budgets.items()}
        for kind, target in self.targets.items():
            if target < self.layers * (2 if kind == "kv" else 1):
                raise ReheadError(
                    f"--{kind}-budget {budgets[kind]:g}: below one head per layer; the smallest budget is "
                    f"{1 / self.kv:.4g} (1 of {self.kv} heads)"
                )
        self.identity = all(b == 1.0 for b in budgets.values())

        self.per_layer = None  # (key heads, value heads) per layer, when the budget is uniform or planned
        if o.uniform:
            budget = next(iter(budgets.values()))
            heads = budget * self.kv
            divisors = [n for n in range(1, self.kv + 1) if self.kv % n == 0]
            if abs(heads - round(heads)) > 0.05 or round(heads) not in divisors:
                raise ReheadError(
                    f"--uniform with budget {budget:g}: {heads:.3g} of {self.kv} KV heads per layer is not a whole "
                    f"divisor of {self.kv}; budgets that divide evenly: {', '.join(f'{n / self.kv:.4g}' for n in divisors)}"
                )
            self.per_layer = [(round(heads), round(heads))] * self.layers
        elif self.identity:
            self.per_layer = [(self.kv, self.kv)] * self.layers

        needed = 2 * (self.llama.hidden_size + 1)
        if self.needs_calibration and o.calib_tokens < needed:
            raise ReheadError(
                f"--calib-tokens {o.calib_tokens}: DHA's statistics need at least {needed} tokens "
                f"(twice the hidden size {self.llama.hidden_size} plus one) for this model"
            )
        self.curves: dict = {}
        self.similarity: dict = {}
        self.plan_layers: list[dict] = []
        self.key_maps: list[list[int]] = []
        self.refined: list[dict] = []
        self.value_maps: list[list[int]] = []

    @property
    def needs_calibration(self) -> bool:
        return not self.identity and not (self.options.uniform and self.options.fusion == "mean")

    @property
    def needs_planning(self) -> bool:
        return self.needs_calibration and self.per_layer is None

    @property
    def shared(self) -> bool:
        """Whether K and V share equal groups, query heads permuted to read them contiguously (plain GQA)."""
        return self.options.uniform

    @property
    def probe_sequences(self) -> int:
        return PROBE_SEQUENCES if self.options.allocation == "logits" and self.needs_planning else 0

    # ---- statistics ----

    def fusion(self, layer: LayerInput) -> LayerFusion:
        t = layer.tensors
        bias = lambda name: t.get(f"self_attn.{name}.bias")  # noqa: E731
        q = augmented(t["self_attn.q_proj.weight"], bias("q_proj"), self.heads)
        k = augmented(t["self_attn.k_proj.weight"], bias("k_proj"), self.kv)
        v = augmented(t["self_attn.v_proj.weight"], bias("v_proj"), self.kv)
        width = q.shape[2]
        if layer.calibration is None:
            moment = torch.eye(width, dtype=torch.float64)  # mean fusion needs no statistics
        else:
            sums = {"moment": torch.zeros(width, width, dtype=torch.float64), "tokens": 0}

            def on_input(module, args, output):
                x = args[0].flatten(0, 1).double()
                x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], 1)
                sums["moment"] += (x.T @ x).cpu()
                sums["tokens"] += len(x)

            attn = layer.source_layer.self_attn
            layer.calibration.run(layer.source_layer, {attn.q_proj: on_input})
            moment = sums["moment"] / sums["tokens"]
        return LayerFusion(q, k, v, t["self_attn.o_proj.weight"], moment, self.reads)

    def observe_layer(self, layer: LayerInput) -> None:
        """Each layer's error curve for 1 … KV key heads and 1 … KV value heads, measured where it
        matters: the attention output's squared error relative to the residual stream's energy, or with
        ``--allocation logits`` its Fisher-weighted error ½ Σ G ⊙ e² per token (convert/sensitivity.py)."""
        fusion = self.fusion(layer)
        probe = Probe.of(layer)
        singletons = [(j,) for j in range(self.kv)]
        for kind, error in (("k", fusion.key_error), ("v", fusion.value_error)):
            history = agglomerate(self.kv, error, 1)
            curve = {self.kv: 0.0}
            for count in range(self.kv - 1, 0, -1):
                groups = (history[count], singletons) if kind == "k" else (singletons, history[count])
                curve[count] = self.probe_error(probe, layer.index, fusion, *groups)
            self.curves[(layer.index, kind)] = curve
        self.observe_similarity(layer.index, fusion)

    def probe_error(self, probe: "Probe", index: int, fusion: LayerFusion, key_groups, value_groups,
                    mean: bool = False, permute: bool = False) -> float:
        """The probe's error with the layer's K and V heads fused into these groups."""
        tensors, key_map, value_map = self.assemble(fusion, key_groups, value_groups, mean, permute)
        sensitivity = self.sensitivity[index] if self.sensitivity is not None else None
        return probe.error(self.attention(index, tensors, key_map, value_map, (key_groups, value_groups)), sensitivity)

    def observe_similarity(self, index: int, fusion: LayerFusion) -> None:
        """The pairwise merge errors of a few layers, for dha_plan.png."""
        shown = sorted({0, self.layers // 2, self.layers - 1})[:HEATMAP_LAYERS]
        if index in shown:
            self.similarity[index] = {
                kind: [[0.0 if a == b else error((min(a, b), max(a, b))) / max(energy((a, b)), 1e-30)
                        for b in range(self.kv)] for a in range(self.kv)]
                for kind, error, energy in (("k", fusion.key_error, fusion.key_energy),
                                            ("v", fusion.value_error, fusion.value_energy))
            }

    def shared_groups(self, fusion: LayerFusion, count: int) -> list[tuple[int, ...]]:
        """``count`` equal groups for K and V alike: contiguous for mean pooling, else grown where the
        joint key and value fit error is least."""
        size = self.kv // count
        if self.options.fusion == "mean":
            return [tuple(range(g * size, (g + 1) * size)) for g in range(count)]
        return equal_groups(self.kv, size, lambda g: fusion.key_error(g) + fusion.value_error(g))

    def attention(self, index: int, tensors: dict, key_map: list[int], value_map: list[int], groups) -> torch.nn.Module:
        """A float32 DHA attention module holding ``tensors`` (names relative to self_attn)."""
        config = self.config()
        config.key_heads_per_layer[index], config.value_heads_per_layer[index] = len(groups[0]), len(groups[1])
        config.key_head_of_query[index], config.value_head_of_query[index] = key_map, value_map
        with torch.device("meta"):
            attn = DHAAttention(config, index)
        state = {k.removeprefix("self_attn."): v.to(self.options.device) for k, v in tensors.items()}
        state = architectures.with_o_proj_bias(state, self.llama, prefix="")
        attn.load_state_dict(state, assign=True)
        return attn.eval()

    def plan_budget(self) -> None:
        if self.joint:
            counts = allocate(self.curves, self.targets["kv"], self.kv)
        else:
            counts = {}
            for kind in ("k", "v"):
                curves = {key: c for key, c in self.curves.items() if key[1] == kind}
                counts.update(allocate(curves, self.targets[kind], self.kv))
        self.per_layer = [(counts[(layer, "k")], counts[(layer, "v")]) for layer in range(self.layers)]

    # ---- the conversion ----

    def assemble(self, fusion: LayerFusion, key_groups, value_groups, mean: bool = False, permute: bool = False):
        """The fused attention's tensors (float32, names under self_attn.) and its query->K and query->V maps."""
        fused_k, scales = zip(*(fusion.fuse_keys(g, mean) for g in key_groups))
        fused_v, maps = zip(*(fusion.fuse_values(g, mean) for g in value_groups))
        key_of = {j: n for n, g in enumerate(key_groups) for j in g}
        value_of = {j: n for n, g in enumerate(value_groups) for j in g}
        scale = {j: s for part in scales for j, s in part.items()}
        vmap = {j: m for part in maps for j, m in part.items()}
        order = list(range(self.heads))
        if permute:  # each group's readers contiguous: stock grouped-query attention
            order = sorted(order, key=lambda i: (key_of[self.reads[i]], i))
        q = torch.cat([fusion.fold_query(i, scale[self.reads[i]]) for i in order])
        k, v = torch.cat(fused_k), torch.cat(fused_v)
        width = fusion.width - 1
        tensors = {
            "self_attn.q_proj.weight": q[:, :width],
            "self_attn.k_proj.weight": k[:, :width],
            "self_attn.v_proj.weight": v[:, :width],
            "self_attn.o_proj.weight": torch.cat([fusion.o[:, i] @ vmap[self.reads[i]].T for i in order], dim=1),
        }
        if self.llama.attention_bias:
            tensors.update({"self_attn.q_proj.bias": q[:, width], "self_attn.k_proj.bias": k[:, width],
                            "self_attn.v_proj.bias": v[:, width]})
        tensors = {name: t.float() for name, t in tensors.items()}
        return tensors, [key_of[self.reads[i]] for i in order], [value_of[self.reads[i]] for i in order]

    def rewrite_layer(self, layer: LayerInput) -> dict[str, torch.Tensor]:
        keys, values = self.per_layer[layer.index]
        fusion = self.fusion(layer)
        mean = self.options.fusion == "mean"
        if self.shared:
            key_groups = value_groups = self.shared_groups(fusion, keys)
        else:
            key_groups = agglomerate(self.kv, fusion.key_error, keys)[keys]
            value_groups = agglomerate(self.kv, fusion.value_error, values)[values]
        attention, key_map, value_map = self.assemble(fusion, key_groups, value_groups, mean, self.shared)
        tensors = {k: v for k, v in layer.tensors.items() if not k.startswith("self_attn.")}
        tensors.update(attention)
        if "self_attn.o_proj.bias" in layer.tensors:
            tensors["self_attn.o_proj.bias"] = layer.tensors["self_attn.o_proj.bias"]
        elif not self.options.uniform:  # a uniform result keeps the source's architecture, and so its biases
            tensors = architectures.with_o_proj_bias(tensors, self.llama)
        self.key_maps.append(key_map)
        self.value_maps.append(value_map)
        fused = keys < self.kv or values < self.kv  # a layer that keeps every head is exact: nothing to refine
        if self.options.refine_steps and layer.calibration is not None and fused:
            tensors = self.refine(layer, tensors)
        self.plan_layers.append({
            "key_groups": [list(g) for g in key_groups],
            "key_group_errors": [round(fusion.key_error(g) / max(fusion.key_energy(g), 1e-30), 6) for g in key_groups],
            "value_groups": [list(g) for g in value_groups],
            "value_group_errors": [round(fusion.value_error(g) / max(fusion.value_energy(g), 1e-30), 6)
                                   for g in value_groups],
        })
        return tensors

    def refine(self, layer: LayerInput, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Adam steps on the fused attention to match the source layer's attention output, one
        calibration micro-batch a step; kept only if the error over all calibration text went down."""
        source = layer.source_layer
        # the module's parameters on clones: Adam's in-place steps must not reach the closed form's tensors,
        # which are returned unchanged when refining does not lower the error
        attn = self.layer_module(layer.index, {k: v.clone() for k, v in tensors.items()}).self_attn
        calib = layer.calibration
        cos, sin = calib.position_embeddings
        with torch.no_grad():
            inputs = [source.input_layernorm(h) for h in calib.hidden.split(calib.micro_batch)]
            targets = [source.self_attn(x, position_embeddings=(cos[: len(x)], sin[: len(x)]))[0] for x in inputs]
        scale = sum(t.pow(2).sum() for t in targets) / sum(t.numel() for t in targets)

        def loss(x, target):
            return (attn(x, position_embeddings=(cos[: len(x)], sin[: len(x)]))[0] - target).pow(2).mean() / scale

        def total() -> float:
            with torch.no_grad():
                return sum(loss(x, t).item() * len(x) for x, t in zip(inputs, targets)) / len(calib.hidden)

        before = total()
        if before <= 1e-10:  # the closed form is already exact (repeated heads): nothing to refine
            self.refined.append({"layer": layer.index, "error_before": round(before, 6), "error_after": round(before, 6)})
            return tensors
        params = [p for name, p in attn.named_parameters() if name.split(".")[0] in ("q_proj", "k_proj", "v_proj", "o_proj")]
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(params, lr=self.options.refine_lr)
        for step in range(self.options.refine_steps):
            optimizer.zero_grad()
            loss(inputs[step % len(inputs)], targets[step % len(inputs)]).backward()
            optimizer.step()
        after = total()
        self.refined.append({"layer": layer.index, "error_before": round(before, 6), "error_after": round(after, 6)})
        if after >= before:
            return tensors
        refined = {f"self_attn.{name}": p.detach().cpu() for name, p in attn.named_parameters()}
        return {**tensors, **{k: v for k, v in refined.items() if k in tensors}}

    def config(self) -> DHAConfig:
        values = llama_values(self.llama)
        done = len(self.key_maps)  # layers not converted yet keep the source's grouping
        counts = (self.per_layer or [])[:done] + [(self.kv, self.kv)] * (self.layers - done)
        config = DHAConfig(
            **values,
            key_heads_per_layer=[k for k, _ in counts],
            value_heads_per_layer=[v for _, v in counts],
            key_head_of_query=self.key_maps + [self.reads] * (self.layers - done),
            value_head_of_query=self.value_maps + [self.reads] * (self.layers - done),
        )
        config._attn_implementation = "sdpa"
        return config

    def layer_module(self, index: int, tensors: dict[str, torch.Tensor]):
        return build_layer(DHADecoderLayer, self.config(), index, tensors, self.options.device)

    def target_config(self) -> dict:
        if self.options.uniform:
            config = mha_config(self.source_config)
            config["num_key_value_heads"] = self.per_layer[0][0]
            return config
        return self.config().to_dict()

    def plan(self) -> dict:
        keys = sum(k for k, _ in self.per_layer)
        values = sum(v for _, v in self.per_layer)
        total = self.layers * self.kv
        return {
            "key_heads_per_layer": [k for k, _ in self.per_layer],
            "value_heads_per_layer": [v for _, v in self.per_layer],
            "kept": {"keys": round(keys / total, 4), "values": round(values / total, 4),
                     "kv": round((keys + values) / (2 * total), 4)},
            "fusion": self.options.fusion,
            "uniform": self.options.uniform,
            "refine_steps": self.options.refine_steps,
            "allocation": self.options.allocation,
        }

    def write_extras(self, folder: Path) -> None:
        plan = {**self.plan(), "layers": self.plan_layers, "refinement": self.refined,
                "error_curves": {f"{layer}.{kind}": curve for (layer, kind), curve in sorted(self.curves.items())},
                "pair_merge_error": {str(k): v for k, v in self.similarity.items()}}
        (folder / "dha_plan.json").write_text(json.dumps(plan, indent=1) + "\n")
        draw_plan(plan, self.kv, folder / "dha_plan.png")


def draw_plan(plan: dict, kv: int, path: Path) -> None:
    """Heads kept per layer for K and V, and the pairwise merge errors of a few layers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    maps = plan["pair_merge_error"]
    columns = max(1, len(maps))
    fig = plt.figure(figsize=(4 * columns, 7), constrained_layout=True)
    grid = fig.add_gridspec(3 if maps else 1, columns)
    ax = fig.add_subplot(grid[0, :])
    layers = range(len(plan["key_heads_per_layer"]))
    ax.step(layers, plan["key_heads_per_layer"], where="mid", label="key heads", color="tab:blue")
    ax.step(layers, plan["value_heads_per_layer"], where="mid", label="value heads", color="tab:orange", linestyle="--")
    ax.set(xlabel="layer", ylabel=f"heads kept (of {kv})", ylim=(0, kv + 0.5),
           title=f"DHA plan: {plan['kept']['kv']:.1%} of the KV cache kept")
    ax.legend(loc="lower right")
    for column, (layer, kinds) in enumerate(sorted(maps.items(), key=lambda item: int(item[0]))):
        for row, kind in enumerate(("k", "v"), start=1):
            ax = fig.add_subplot(grid[row, column])
            matrix = torch.tensor(kinds[kind]).clamp_min(1e-12).log10()
            image = ax.imshow(matrix, cmap="viridis_r")
            ax.set_title(f"layer {layer}: {'key' if kind == 'k' else 'value'} merge error (log10)", fontsize=9)
            ax.set_xticks(range(kv))
            ax.set_yticks(range(kv))
            fig.colorbar(image, ax=ax, shrink=0.8)
    fig.savefig(path, dpi=90)
    plt.close(fig)

