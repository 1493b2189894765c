"""``--to mla``: multi-head latent attention (DeepSeek-V2), written as a stock ``DeepseekV3ForCausalLM``.

Each layer is fitted in closed form (``mla_fusion``), then refined for ``--refine-steps`` Adam steps on
the calibration text (``refine``: q_proj, kv_b_proj and o_proj; the latent's projection and norm stay as
fitted, the norm being linear only at the fitted scale); the output is DeepSeek-V3 with a dense MLP in
every layer (``first_k_dense_replace`` = layers), ``q_lora_rank: null``, one ``kv_lora_rank`` for all
layers, the RoPE rows in DeepSeek's interleaved order (``rope_interleave: true``, what vLLM and
llama.cpp always use) and an explicit ``lm_head.weight`` (vLLM's DeepSeek ignores
``tie_word_embeddings``). transformers, vLLM (``deepseek_v2.py``) and llama.cpp (``deepseek2``) load
it with no custom code and cache only the latent and the shared RoPE key.

The budget counts cached values per token and layer: (kv_lora_rank + qk_rope_head_dim) over the
source's 2·kv_heads·head_dim.

One eps for every engine. transformers builds ``kv_a_layernorm`` with eps 1e-6 whatever the config
says; vLLM and llama.cpp give it ``rms_norm_eps``. The export writes ``rms_norm_eps: 1e-6`` and keeps
the source's decoder norms exact by scaling the residual stream by α = √(1e-6 / ε_source): the
embeddings, o_proj and down_proj are multiplied by α, and RMSNorm(α·h; α²·ε) = RMSNorm(h; ε) (the
lm_head reads the final norm's output, unchanged). ``routed_scaling_factor: 1.0``: vLLM divides the
hidden states of a DeepSeek layer by it in fp16.
"""

import math
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from rehead.errors import ReheadError

from . import mla_fusion
from .dha_fusion import LayerFusion, augmented
from .refine import RefineOptions, refine_attention
from .rewriter import LayerInput, Rewriter, Rewritten, build_layer

PROBE_SEQUENCES = 4  # calibration sequences on which each head's attention gives its rotation means β
RESIDUAL_WRITERS = ("self_attn.o_proj.weight", "mlp.down_proj.weight")  # scaled by α with the embeddings


class MLAOptions(RefineOptions):
    to: Literal["mla"] = "mla"
    kv_budget: float | None = Field(None, description="fraction of the source's KV cache kept: (kv_lora_rank + "
                                                      "rope dim) over 2·kv_heads·head_dim values per token and layer")
    kv_rank: int | None = Field(None, ge=1, description="the latent's rank (kv_lora_rank), instead of --kv-budget")
    rope_dim: int | None = Field(None, ge=2, description="dims of the RoPE key all heads share (qk_rope_head_dim), "
                                                         "even, at most head_dim (default head_dim / 2)")

    @model_validator(mode="after")
    def _budget(self):
        if (self.kv_budget is None) == (self.kv_rank is None):
            raise ReheadError("--to mla needs one size: --kv-budget F, or --kv-rank R (with --rope-dim D)")
        if self.kv_budget is not None and not 0 < self.kv_budget <= 1:
            raise ReheadError(f"--kv-budget {self.kv_budget:g}: must be in (0, 1], the fraction of the KV cache kept")
        if self.rope_dim is not None and self.rope_dim % 2:
            raise ReheadError(f"--rope-dim {self.rope_dim}: must be even (RoPE rotates pairs of dims)")
        if self.dtype == "fp16":
            raise ReheadError("--dtype fp16: the latent is scaled below fp16's range to keep kv_a_layernorm linear; "
                              "use bf16 or fp32")
        return self


def check_source(llama) -> None:
    """Refuses what the DeepSeek format, as the engines read it, cannot hold (before any work).

    vLLM (``deepseek_v2.py``) builds q_proj, kv_a_proj_with_mqa, kv_b_proj and o_proj with
    ``bias=False`` and drops any bias it is given; transformers has none on q_proj. A value bias
    shifts every head's output and a query or rotated-key bias moves the logits, so neither can go.
    vLLM rewrites every rope type but ``default`` to DeepSeek-YaRN (``rope_type = "deepseek_yarn"``);
    its ``DeepseekV2MLP`` computes SiLU only, without biases. Per-head q/k norms (Qwen3) cannot be
    held: each head's key is divided by its own RMS, a per-token factor that differs between heads,
    while DeepSeek's keys are linear in one latent (its ``kv_a_layernorm`` divides the whole latent by
    one RMS per token), and q_a_layernorm likewise normalises the whole query latent, not each head.
    """
    instead = "convert with --to dha (rehead's own layout, for transformers) instead"
    if getattr(llama, "qk_norm", False):
        raise ReheadError("per-head q/k norms (q_norm, k_norm: Qwen3): each head's key is divided by its own RMS "
                          "before RoPE, and DeepSeek's keys are linear maps of one shared latent (its kv_a_layernorm "
                          "scales the whole latent by one RMS per token), so the latent cannot compute them; --to mla "
                          f"cannot hold this model; {instead}")
    if llama.attention_bias:
        raise ReheadError(f"attention_bias: DeepSeek's attention has no q/k/v/o biases in vLLM (bias=False), and a "
                          f"value or query bias changes the output; --to mla cannot hold this model; {instead}")
    if getattr(llama, "mlp_bias", False):
        raise ReheadError(f"mlp_bias: DeepSeek's MLP has no biases in vLLM or llama.cpp; {instead}")
    if llama.hidden_act != "silu":
        raise ReheadError(f"hidden_act {llama.hidden_act!r}: vLLM's DeepSeek MLP computes SiLU only; {instead}")
    rope = llama.rope_parameters or {}
    if rope.get("rope_type", "default") != "default" or rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ReheadError(f"rope_parameters {rope}: vLLM rewrites every rope type but 'default' to DeepSeek-YaRN, so "
                          f"the served model would differ from the source; {instead}")
    if llama.head_dim % 2:
        raise ReheadError(f"head_dim {llama.head_dim}: RoPE pairs need an even head_dim")


class SourceRope(nn.Module):
    """The converted DeepSeek layer, fed the source's rotary embeddings (its first R/2 frequencies)."""

    def __init__(self, layer: nn.Module, rope_dim: int):
        super().__init__()
        self.layer, self.half = layer, rope_dim // 2

    def embeddings(self, position_embeddings):
        return tuple(torch.cat([t[..., : self.half]] * 2, dim=-1) for t in position_embeddings)

    def forward(self, hidden, attention_mask=None, position_embeddings=None):
        return self.layer(hidden, attention_mask=attention_mask, position_embeddings=self.embeddings(position_embeddings))


class MLARewriter(Rewriter):
    layout = "mla"
    Options = MLAOptions
    needs_calibration = True

    def __init__(self, options: MLAOptions, source_config: dict):
        super().__init__(options, source_config)
        check_source(self.llama)
        o, d = self.options, self.llama.head_dim
        self.rope_dim = o.rope_dim or d // 2
        if self.rope_dim > d:
            raise ReheadError(f"--rope-dim {self.rope_dim}: at most head_dim ({d}), the source's RoPE dims")
        cache = 2 * self.kv * d
        self.rank = o.kv_rank or math.floor(o.kv_budget * cache + 1e-9) - self.rope_dim
        if self.rank < 1:
            raise ReheadError(f"--kv-budget {o.kv_budget:g}: {o.kv_budget * cache:g} cached values per token leave no "
                              f"latent beside the {self.rope_dim} RoPE dims; raise it or lower --rope-dim")
        if self.rank > 2 * self.kv * d:
            raise ReheadError(f"--kv-rank {self.rank}: above the {2 * self.kv * d} key and value dims it compresses")
        needed = 2 * (self.llama.hidden_size + 1)
        if o.calib_tokens < needed:
            raise ReheadError(f"--calib-tokens {o.calib_tokens}: MLA's statistics need at least {needed} tokens "
                              f"(twice the hidden size {self.llama.hidden_size} plus one) for this model")
        self.alpha = math.sqrt(mla_fusion.NORM_EPS / self.llama.rms_norm_eps)

    def statistics(self, layer: LayerInput) -> tuple[LayerFusion, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The layer's heads and moment C, its calibration attention inputs, and each head's rotation means β."""
        t, attn = layer.tensors, layer.source_layer.self_attn
        inputs = []
        layer.calibration.run(layer.source_layer, {attn.q_proj: lambda m, args, out: inputs.append(args[0].flatten(0, 1))})
        x = torch.cat(inputs).double().cpu()
        ones = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        moment = ones.T @ ones / len(x)
        q, k, v = (augmented(t[f"self_attn.{n}_proj.weight"], None, h)
                   for n, h in (("q", self.heads), ("k", self.kv), ("v", self.kv)))
        reads = [i // (self.heads // self.kv) for i in range(self.heads)]
        fusion = LayerFusion(q, k, v, t["self_attn.o_proj.weight"], moment, reads)

        calib = layer.calibration
        with torch.no_grad():
            h = calib.hidden[:PROBE_SEQUENCES]
            cos, sin = (e[: len(h)] for e in calib.position_embeddings)
            normed = layer.source_layer.input_layernorm(h)
            heads = lambda proj: proj(normed).unflatten(-1, (-1, attn.head_dim)).transpose(1, 2)  # noqa: E731
            rq, rk = apply_rotary_pos_emb(heads(attn.q_proj), heads(attn.k_proj), cos, sin)
            probs = mla_fusion.causal_probabilities(rq, rk, self.heads // self.kv).cpu()
        inv_freq = mla_fusion.inverse_frequencies(self.llama.rope_parameters["rope_theta"], self.llama.head_dim)
        return fusion, moment, x.float(), mla_fusion.rotation_means(probs, inv_freq)

    def rewrite_layer(self, layer: LayerInput) -> Rewritten:
        """The layer's DeepSeek tensors; its plan is the share of weighted latent energy the rank leaves out
        and, where DHA's solution fits the format, the share that solution leaves out on the same objective."""
        fusion, moment, inputs, beta = self.statistics(layer)
        targets = mla_fusion.layer_targets(fusion, moment, beta, self.rope_dim)
        fit = mla_fusion.fit_layer(targets, mla_fusion.latent_basis(targets, self.rank), inputs)
        tensors = {k: v for k, v in layer.tensors.items() if not k.startswith("self_attn.")}
        tensors.update({f"self_attn.{name}.weight": getattr(fit, name).float()
                        for name in ("q_proj", "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj")})
        for name in RESIDUAL_WRITERS:
            tensors[name] = tensors[name].float() * self.alpha
        plan = {"latent_error": round(fit.latent_error, 6)}
        if mla_fusion.dha_fits(fusion, self.rope_dim, self.rank):
            plan["dha_error"] = round(mla_fusion.basis_error(targets, mla_fusion.dha_basis(targets, self.rank)), 6)
        if self.options.refine_steps:
            tensors, plan["refinement"] = self.refine(layer, tensors)
        return Rewritten(tensors, plan)

    def refine(self, layer: LayerInput, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
        """The layer with q_proj, kv_b_proj and o_proj refined (``refine.refine_attention``); the latent's
        projection and its norm stay as fitted, since the norm is linear only at the fitted scale."""
        module = self.layer_module(layer.index, {k: v.clone() for k, v in tensors.items()})
        attn, trainable = module.layer.self_attn, ("q_proj", "kv_b_proj", "o_proj")
        kept, record = refine_attention(attn, layer, trainable, self.options.refine_steps, self.options.refine_lr,
                                        module.embeddings)
        if not kept:
            return tensors, record
        refined = {f"self_attn.{name}.weight": getattr(attn, name).weight.detach().cpu() for name in trainable}
        refined["self_attn.o_proj.weight"] = refined["self_attn.o_proj.weight"] * self.alpha  # the residual scale
        return {**tensors, **refined}, record

    def layer_module(self, index: int, tensors: dict[str, torch.Tensor], plan=None) -> nn.Module:
        """The converted layer in the source's residual scale (α undone, the source's eps in its decoder norms)."""
        config = DeepseekV3Config(**{**self.target_config([]), "rms_norm_eps": self.llama.rms_norm_eps})
        config._attn_implementation = "sdpa"
        unscaled = {k: v / self.alpha if k in RESIDUAL_WRITERS else v for k, v in tensors.items()}
        return SourceRope(build_layer(DeepseekV3DecoderLayer, config, index, unscaled, self.options.device),
                          self.rope_dim)

    def outer_tensors(self, names: list[str], read) -> dict[str, torch.Tensor | None]:
        embeddings = read("model.embed_tokens.weight")
        tensors = dict.fromkeys(names)
        tensors["model.embed_tokens.weight"] = embeddings.float() * self.alpha
        if "lm_head.weight" not in names:  # tied: vLLM's DeepSeek reads no tied head, so write it
            tensors["lm_head.weight"] = embeddings
        return tensors

    def target_config(self, plans: list) -> dict:
        llama, layers = self.llama, self.layers
        rope = self.llama.rope_parameters
        config = DeepseekV3Config(
            vocab_size=llama.vocab_size, hidden_size=llama.hidden_size, intermediate_size=llama.intermediate_size,
            moe_intermediate_size=llama.intermediate_size, num_hidden_layers=layers,
            num_attention_heads=self.heads, num_key_value_heads=self.heads,
            n_shared_experts=1, n_routed_experts=1, n_group=1, topk_group=1, num_experts_per_tok=1,
            first_k_dense_replace=layers, routed_scaling_factor=1.0, num_mtp_layers=0,
            kv_lora_rank=self.rank, q_lora_rank=None, qk_rope_head_dim=self.rope_dim,
            qk_nope_head_dim=llama.head_dim, v_head_dim=llama.head_dim,
            hidden_act=llama.hidden_act, max_position_embeddings=llama.max_position_embeddings,
            initializer_range=llama.initializer_range, rms_norm_eps=mla_fusion.NORM_EPS,
            bos_token_id=llama.bos_token_id, eos_token_id=llama.eos_token_id, pad_token_id=llama.pad_token_id,
            tie_word_embeddings=False, attention_bias=False, rope_interleave=True,
            rope_parameters={"rope_type": "default",
                             "rope_theta": mla_fusion.rope_base(rope["rope_theta"], llama.head_dim, self.rope_dim)},
        )
        return {**config.to_dict(), "architectures": ["DeepseekV3ForCausalLM"]}

    def summary(self, plans: list[float]) -> dict:
        cache = 2 * self.kv * self.llama.head_dim
        return {
            "kv_lora_rank": self.rank, "qk_rope_head_dim": self.rope_dim,
            "kept": {"kv": round((self.rank + self.rope_dim) / cache, 4)},
            "residual_scale": self.alpha, "norm_linear_to": mla_fusion.NORM_BOUND,
            "latent_error_per_layer": [plan["latent_error"] for plan in plans],
            **({"dha_error_per_layer": [plan["dha_error"] for plan in plans]}
               if plans and all("dha_error" in plan for plan in plans) else {}),
            "refine_steps": self.options.refine_steps,
            **({"refinement": [plan["refinement"] for plan in plans]}
               if plans and all("refinement" in plan for plan in plans) else {}),
        }
