"""``--to dha --export deci``: DHA as a DeciLM (``nemotron-nas``) checkpoint, which vLLM and llama.cpp
serve with a KV head count of its own in every layer.

In layer l, K and V share one grouping of the source's KV heads into n_l equal groups, n_l
dividing the source's KV heads (so each fused head stands for whole source KV heads, and n_l
divides the query heads); the query heads are permuted, with their q_proj rows and o_proj
columns, so that each group's readers are contiguous, which is exact. The layer is then plain
grouped-query attention with n_heads_in_group = heads / n_l.

The planning pass measures, for every layer and every allowed n_l, the attention-output error of
that shared grouping (as the free DHA plan measures its K and V curves), and ``allocate_shared``
spends the global budget where the errors sum least. The format cannot say everything a LLaMA
config can; ``check_source`` refuses, before any work, what vLLM's ``nemotron_nas`` or
llama.cpp's ``deci`` would not compute as the source does.
"""

import logging
import math

from rehead import families
from rehead.errors import ReheadError
from rehead.layouts.configuration_deci import DeciLMConfig, ffn_mult_to_intermediate_size

from .dha import Allotment, DHALayerPlan, DHARewriter
from .dha_planning import LayerCurves, shared_curves
from .options import ConvertOptions
from .rewriter import LayerInput, llama_values

log = logging.getLogger("rehead.convert")

# rope types llama.cpp's DeciModel converter carries into the GGUF file: its block_configs branch of
# set_gguf_parameters writes rope_theta only, and generate_extra_tensors adds llama3's frequency factors
ROPE_TYPES = ("default", "llama3")


def allocate_shared(curves: dict[int, dict[int, float]], target: int) -> dict[int, int]:
    """One head count per layer, among those its curve prices (curves[layer][count] = error), with
    at most ``target`` heads in all and the least total error; ties go to fewer heads. Exact: a
    dynamic programme over the running head total, since counts move in uneven steps (divisors)."""
    least = sum(min(curve) for curve in curves.values())
    if least > target:
        raise ValueError(f"target {target}: the fewest heads the curves allow is {least}")
    reach = {0: (0.0, None, None)}  # heads so far -> (error, count of this layer, heads before it)
    steps = []
    for layer in sorted(curves):
        step = {}
        for total, (error, _, _) in reach.items():
            for count, cost in curves[layer].items():
                heads = total + count
                if heads <= target and (heads not in step or error + cost < step[heads][0]):
                    step[heads] = (error + cost, count, total)
        steps.append((layer, step))
        reach = step
    heads = min(reach, key=lambda total: (reach[total][0], total))
    counts = {}
    for layer, step in reversed(steps):
        _, counts[layer], heads = step[heads]
    return counts


def ffn_mult_for(intermediate_size: int, hidden_size: int) -> float | None:
    """The ffn_mult from which the servers compute ``intermediate_size``, if there is one (only
    multiples of 256 can be expressed)."""
    ffn_mult = 1.5 * intermediate_size / hidden_size
    return ffn_mult if ffn_mult_to_intermediate_size(ffn_mult, hidden_size) == intermediate_size else None


def check_source(config: dict) -> float:
    """Refuses a source whose function the DeciLM format, as vLLM and llama.cpp read it, cannot
    hold; returns the ffn_mult of its FFN width.

    What it holds (vLLM ``nemotron_nas.DeciLMDecoderLayer``, llama.cpp ``conversion/deci.py`` and
    ``src/models/deci.cpp``): tied or untied embeddings, q/k/v/o biases (``attention_bias``), MLP
    biases, SiLU, the FFN width as ffn_mult, head_dim = hidden_size / heads (llama.cpp's key and
    value length), rope_theta and llama3 rope scaling.
    """
    llama = families.llama_config(config)
    hidden, heads = llama.hidden_size, llama.num_attention_heads
    instead = "convert with --to dha without --export (rehead's own layout, for transformers)"
    if getattr(llama, "qk_norm", False):
        raise ReheadError(
            "per-head q/k norms (q_norm, k_norm: Qwen3): DeciLM (nemotron-nas) is LLaMA's attention per layer, "
            "with no q/k norms in its block_configs or its tensors, so --export deci would drop them and serve "
            f"another function; {instead}"
        )
    if llama.head_dim * heads != hidden:
        raise ReheadError(
            f"head_dim {llama.head_dim} with {heads} heads and hidden_size {hidden}: llama.cpp's deci architecture "
            f"takes head_dim = hidden_size / heads ({hidden / heads:g}), so --export deci cannot hold this model; "
            f"{instead}"
        )
    if llama.hidden_act != "silu":
        raise ReheadError(
            f"hidden_act {llama.hidden_act!r}: llama.cpp's deci architecture computes a SiLU-gated FFN only, so "
            f"--export deci cannot hold this model; {instead}"
        )
    rope = llama.rope_parameters or {}
    if rope.get("rope_type", "default") not in ROPE_TYPES or rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ReheadError(
            f"rope_parameters {rope}: llama.cpp's DeciLM converter carries only rope_theta and llama3 scaling "
            f"({', '.join(ROPE_TYPES)}) into the GGUF file, so the served model would differ from the source; {instead}"
        )
    ffn_mult = ffn_mult_for(llama.intermediate_size, hidden)
    if ffn_mult is None:
        raise ReheadError(
            f"intermediate_size {llama.intermediate_size}: DeciLM gives the FFN width as ffn_mult, from which vLLM and "
            f"llama.cpp compute ⌊2·ffn_mult·{hidden}/3⌋ rounded up to a multiple of 256, so only multiples of 256 can "
            f"be expressed; {instead}, or with --uniform for a stock Llama checkpoint"
        )
    return ffn_mult


class DeciRewriter(DHARewriter):
    """DHA with equal K/V groups shared per layer at a per-layer count, written as DeciLM."""

    export = "deci"

    @classmethod
    def chosen(cls, options: ConvertOptions) -> bool:
        return options.export == cls.export

    def __init__(self, options: ConvertOptions, source_config: dict):
        if options.uniform:
            raise ReheadError(
                "--uniform writes a stock Llama checkpoint (one KV head count for every layer), which every server "
                "runs already; --export deci lets the count vary per layer: give one of the two"
            )
        if options.kv_budget is None and (options.k_budget or 1.0) != (options.v_budget or 1.0):
            raise ReheadError(
                f"--k-budget {options.k_budget} and --v-budget {options.v_budget}: --export deci groups K and V alike "
                "in every layer, so they keep the same number of heads; give --kv-budget F"
            )
        self.ffn_mult = check_source(source_config)
        super().__init__(options, source_config)
        self.shared = True
        o = self.options  # one budget: --kv-budget, or --k-budget and --v-budget alike (unset is 1)
        budget = min(b for b in (o.kv_budget, o.k_budget, o.v_budget, 1.0) if b is not None)
        self.target = math.floor(budget * self.layers * self.kv + 1e-9)
        if self.target < self.layers:
            raise ReheadError(
                f"--kv-budget {budget:g}: below one KV head per layer; the smallest budget is {1 / self.kv:.4g}"
            )
        self.counts = [n for n in range(1, self.kv + 1) if self.kv % n == 0]

    def observe_layer(self, layer: LayerInput) -> LayerCurves:
        """Each layer's error curve over the KV head counts the format allows, K and V sharing the groups."""
        return shared_curves(self.assembly, layer, self.counts[:-1], self.mean)

    def allot(self, observations: list[LayerCurves]) -> list[Allotment]:
        counts = allocate_shared({index: measured.curves["kv"] for index, measured in enumerate(observations)},
                                 self.target)
        kept = sum(counts.values())
        if kept < self.target:
            log.info("--export deci keeps %d of the %d KV heads the budget allows (%.4g of the source's): each "
                     "layer's count divides %d", kept, self.target, kept / (self.layers * self.kv), self.kv)
        return [Allotment(counts[index], counts[index], measured) for index, measured in enumerate(observations)]

    def target_config(self, plans: list[DHALayerPlan]) -> dict:
        blocks = [{"attention": {"n_heads_in_group": self.heads // len(plan.grouping.key_groups)},
                   "ffn": {"ffn_mult": self.ffn_mult}} for plan in plans]
        return DeciLMConfig(**llama_values(self.llama), block_configs=blocks).to_dict()

    def summary(self, plans: list[DHALayerPlan]) -> dict:
        return {**super().summary(plans), "export": self.export, "budget_heads": self.target}
