"""``--to dha``: decoupled-head attention, with key heads and value heads fused separately per layer.

Two streamed passes over the layers:
1. plan (``dha_planning``): on the source's own activations, each layer's fit-error curve for keeping
   1 … KV key heads and 1 … KV value heads, and the global budget spent where fusing costs least;
2. convert (``dha_assembly``): on the converted prefix's activations, each layer's groups are formed
   again at the planned counts and fused in closed form (``dha_fusion``), optionally refined for a few
   steps to match the source layer's attention output.

``--uniform``: the same number of groups in every layer, shared by K and V, equal in size;
query heads are permuted so that each group's readers are contiguous, and the result is a stock
grouped-query checkpoint. ``--fusion mean`` averages the members' weights (Ainslie et al. 2023).
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from rehead import families
from rehead.errors import ReheadError
from rehead.families.llama import mha_config

from .dha_assembly import Assembly, Grouping, refine
from .dha_fusion import agglomerate
from .dha_planning import PROBE_SEQUENCES, LayerCurves, allocate, decoupled_curves
from .dha_plot import draw_plan
from .refine import RefineOptions
from .rewriter import LayerInput, Rewriter, Rewritten


class DHAOptions(RefineOptions):
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


@dataclass
class Allotment:
    """The heads one layer keeps, and what the planning pass measured there (None without planning)."""

    keys: int
    values: int
    measured: LayerCurves | None = None


@dataclass
class DHALayerPlan:
    """One converted layer: its grouping, each group's relative fit error, its refinement record (when
    refined) and what the planning pass measured there."""

    grouping: Grouping
    key_group_errors: list[float]
    value_group_errors: list[float]
    refinement: dict | None = None
    measured: LayerCurves | None = None

    def record(self) -> dict:
        return {"key_groups": [list(g) for g in self.grouping.key_groups], "key_group_errors": self.key_group_errors,
                "value_groups": [list(g) for g in self.grouping.value_groups],
                "value_group_errors": self.value_group_errors}


class DHARewriter(Rewriter):
    layout = "dha"
    Options = DHAOptions

    def __init__(self, options: DHAOptions, source_config: dict):
        super().__init__(options, source_config)
        o = self.options
        self.assembly = Assembly(self.llama, o.device)
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
        identity = all(b == 1.0 for b in budgets.values())
        self.fixed = self.fixed_counts(next(iter(budgets.values()))) if o.uniform or identity else None
        # K and V share equal groups, query heads permuted to read them contiguously (plain GQA)
        self.shared = o.uniform
        self.mean = o.fusion == "mean"
        self.needs_calibration = not identity and not (o.uniform and self.mean)
        # a source with per-head q/k norms (Qwen3): the fused keys' fit goes into per-head query scales
        qk_norm = getattr(self.llama, "qk_norm", False)
        if qk_norm and o.uniform and not self.mean and not identity:
            raise ReheadError(
                "--uniform --fusion optimal on a source with per-head q/k norms (Qwen3): the closed form's scales "
                "must follow q_norm in each query head (DHA's q_pair_scale), which a stock Qwen3 checkpoint cannot "
                "hold; use --uniform --fusion mean (a stock Qwen3: GQA mean pooling) or drop --uniform (the DHA layout)"
            )
        self.assembly.query_scale = qk_norm and self.needs_calibration and not self.mean
        self.needs_planning = self.needs_calibration and self.fixed is None
        self.probe_sequences = PROBE_SEQUENCES if o.allocation == "logits" and self.needs_planning else 0
        needed = 2 * (self.llama.hidden_size + 1)
        if self.needs_calibration and o.calib_tokens < needed:
            raise ReheadError(
                f"--calib-tokens {o.calib_tokens}: DHA's statistics need at least {needed} tokens "
                f"(twice the hidden size {self.llama.hidden_size} plus one) for this model"
            )

    def fixed_counts(self, budget: float) -> list[Allotment]:
        """Every layer's heads where no planning is needed: the source's at budget 1, else --uniform's count."""
        if not self.options.uniform:
            return [Allotment(self.kv, self.kv)] * self.layers
        heads = budget * self.kv
        divisors = [n for n in range(1, self.kv + 1) if self.kv % n == 0]
        if abs(heads - round(heads)) > 0.05 or round(heads) not in divisors:
            raise ReheadError(
                f"--uniform with budget {budget:g}: {heads:.3g} of {self.kv} KV heads per layer is not a whole "
                f"divisor of {self.kv}; budgets that divide evenly: {', '.join(f'{n / self.kv:.4g}' for n in divisors)}"
            )
        return [Allotment(round(heads), round(heads))] * self.layers

    def observe_layer(self, layer: LayerInput) -> LayerCurves:
        """Each layer's error curve for 1 … KV key heads and 1 … KV value heads, measured where it
        matters: the attention output's squared error relative to the residual stream's energy, or with
        ``--allocation logits`` its Fisher-weighted error ½ Σ G ⊙ e² per token (convert/sensitivity.py)."""
        return decoupled_curves(self.assembly, layer)

    def allot(self, observations: list[LayerCurves]) -> list[Allotment]:
        curves = {(index, kind): curve for index, measured in enumerate(observations)
                  for kind, curve in measured.curves.items()}
        if self.joint:
            counts = allocate(curves, self.targets["kv"], self.kv)
        else:
            counts = {}
            for kind in ("k", "v"):
                counts.update(allocate({key: c for key, c in curves.items() if key[1] == kind}, self.targets[kind],
                                       self.kv))
        return [Allotment(counts[(index, "k")], counts[(index, "v")], measured)
                for index, measured in enumerate(observations)]

    def rewrite_layer(self, layer: LayerInput) -> Rewritten:
        allotment = layer.allotment if layer.allotment is not None else self.fixed[layer.index]
        keys, values = allotment.keys, allotment.values
        fusion = self.assembly.fusion(layer)
        if self.shared:
            key_groups = value_groups = self.assembly.shared_groups(fusion, keys, self.mean)
        else:
            key_groups = agglomerate(self.kv, fusion.key_error, keys)[keys]
            value_groups = agglomerate(self.kv, fusion.value_error, values)[values]
        attention, grouping = self.assembly.assemble(fusion, key_groups, value_groups, self.mean, self.shared)
        tensors = {k: v for k, v in layer.tensors.items() if not k.startswith("self_attn.")}
        tensors.update(attention)
        if "self_attn.o_proj.bias" in layer.tensors:
            tensors["self_attn.o_proj.bias"] = layer.tensors["self_attn.o_proj.bias"]
        elif not self.options.uniform:  # a uniform result keeps the source's architecture, and so its biases
            tensors = families.with_o_proj_bias(tensors, self.llama)
        plan = DHALayerPlan(
            grouping,
            [round(fusion.key_error(g) / max(fusion.key_energy(g), 1e-30), 6) for g in key_groups],
            [round(fusion.value_error(g) / max(fusion.value_energy(g), 1e-30), 6) for g in value_groups],
            measured=allotment.measured,
        )
        fused = keys < self.kv or values < self.kv  # a layer that keeps every head is exact: nothing to refine
        if self.options.refine_steps and layer.calibration is not None and fused:
            tensors, plan.refinement = refine(self.assembly, layer, tensors, grouping, self.options.refine_steps,
                                              self.options.refine_lr)
        return Rewritten(tensors, plan)

    def layer_module(self, index: int, tensors: dict[str, torch.Tensor], plan: DHALayerPlan):
        return self.assembly.layer_module(index, tensors, plan.grouping)

    def target_config(self, plans: list[DHALayerPlan]) -> dict:
        if self.options.uniform:
            config = mha_config(self.source_config)
            config["num_key_value_heads"] = len(plans[0].grouping.key_groups)
            return config
        return self.assembly.config({index: plan.grouping for index, plan in enumerate(plans)}).to_dict()

    def summary(self, plans: list[DHALayerPlan]) -> dict:
        keys = [len(plan.grouping.key_groups) for plan in plans]
        values = [len(plan.grouping.value_groups) for plan in plans]
        total = self.layers * self.kv
        return {
            "key_heads_per_layer": keys,
            "value_heads_per_layer": values,
            "kept": {"keys": round(sum(keys) / total, 4), "values": round(sum(values) / total, 4),
                     "kv": round((sum(keys) + sum(values)) / (2 * total), 4)},
            "fusion": self.options.fusion,
            "uniform": self.options.uniform,
            "refine_steps": self.options.refine_steps,
            "allocation": self.options.allocation,
        }

    def write_extras(self, folder: Path, plans: list[DHALayerPlan]) -> None:
        measured = [(index, plan.measured) for index, plan in enumerate(plans) if plan.measured is not None]
        plan = {**self.summary(plans), "layers": [p.record() for p in plans],
                "refinement": [p.refinement for p in plans if p.refinement is not None],
                "error_curves": {f"{index}.{kind}": curve for index, m in measured for kind, curve in sorted(m.curves.items())},
                "pair_merge_error": {str(index): m.pair_merge_error for index, m in measured
                                     if m.pair_merge_error is not None}}
        (folder / "dha_plan.json").write_text(json.dumps(plan, indent=1) + "\n")
        draw_plan(plan, self.kv, folder / "dha_plan.png")
