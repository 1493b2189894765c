"""MoH: Multi-Head Attention as Mixture-of-Head Attention (Jin et al. 2024, arXiv 2410.11842).

The LLaMA decoder stack with one change: the attention's head outputs are gated per token
before ``o_proj``. Shared heads are always on (gate 1 with the query-norm router); each
token picks its top-k routed heads.

    o_t = Σ_i g_i(t) · W_o^i · head_i(t)

This file travels inside converted checkpoints: it imports only torch and transformers.
"""


import torch
from torch import nn

from .configuration_moh import MoHConfig
from .modeling_cache import LayoutCacheMixin
from .modeling_stack import LayoutAttention, LayoutDecoderLayer, LayoutForCausalLM, LayoutModel, attend, project


def _fp32(router: nn.Linear, hidden_states: torch.Tensor) -> torch.Tensor:
    """A router's logits in float32, whatever the model's dtype or autocast: in bf16, near-tied scores
    would pick different heads than the float32 model does."""
    with torch.autocast(hidden_states.device.type, enabled=False):
        return nn.functional.linear(hidden_states.float(), router.weight.float())


class MoHAttention(LayoutAttention):
    def __init__(self, config: MoHConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        heads = config.num_attention_heads
        self.shared_heads = sorted(config.moh_shared_heads[layer_idx])
        self.routed_heads = [h for h in range(heads) if h not in self.shared_heads]
        self.top_k = config.moh_active_heads - len(self.shared_heads)
        self.router = config.moh_router
        self.cache_heads = (config.num_key_value_heads,) * 2  # every head's K/V: other tokens may pick any head
        self.aux_loss = None
        self.index_maps = (self.shared_heads, self.routed_heads)
        if self.router == "learned" and not self.all_active:
            # The paper's two-stage router: W_s (shared), W_r (routed), W_h (mixes the two stages).
            self.router_routed = nn.Linear(config.hidden_size, len(self.routed_heads), bias=False)
            if self.shared_heads:
                self.router_shared = nn.Linear(config.hidden_size, len(self.shared_heads), bias=False)
                self.router_mix = nn.Linear(config.hidden_size, 2, bias=False)

    @property
    def all_active(self) -> bool:
        return self.top_k >= len(self.routed_heads)

    def gates(self, hidden_states: torch.Tensor, query_states: torch.Tensor) -> torch.Tensor:
        """Per-token head gates, (batch, seq, heads), float32. hidden_states: (B, T, D); query_states: (B, H, T, d)."""
        shared, routed = self.indices(hidden_states.device)
        batch, seq = hidden_states.shape[:2]
        gates = hidden_states.new_ones(batch, seq, self.config.num_attention_heads, dtype=torch.float32)
        if self.router == "query-norm":
            norms = query_states.float().norm(dim=-1).transpose(1, 2)[..., routed]
            logits = norms / norms.std(dim=-1, keepdim=True).clamp_min(1e-6)
            hard = torch.zeros_like(logits).scatter_(-1, logits.topk(self.top_k, dim=-1).indices, 1.0)
            if self.training and self.config.moh_gate_gradient == "straight-through":  # 0/1 forward, softmax gradient
                soft = logits.softmax(dim=-1)
                hard = hard + soft - soft.detach()
            return gates.index_copy(-1, routed, hard)
        # Learned router. Gates are scaled so that zero router weights give every active head gate 1
        # (rehead's identity at conversion): shared g_i = 2α_1·S·softmax(W_s x)_i,
        # routed g_i = 2α_2·k·renormalised top-k softmax(W_r x)_i.
        probs = _fp32(self.router_routed, hidden_states).softmax(dim=-1)
        top, index = probs.topk(self.top_k, dim=-1)
        routed_gates = torch.zeros_like(probs).scatter(-1, index, top / top.sum(dim=-1, keepdim=True))
        routed_gates = routed_gates * self.top_k
        if self.shared_heads:
            mix = 2 * _fp32(self.router_mix, hidden_states).softmax(dim=-1)
            shared_gates = _fp32(self.router_shared, hidden_states).softmax(dim=-1) * len(self.shared_heads)
            gates = gates.index_copy(-1, shared, shared_gates * mix[..., :1])
            routed_gates = routed_gates * mix[..., 1:]
        if self.training:  # load balance β·E·Σ P_i f_i; β is applied by the model
            chosen = torch.zeros_like(probs).scatter_(-1, index, 1.0)
            frac = chosen.flatten(0, 1).mean(0)
            mean_prob = probs.flatten(0, 1).mean(0)
            self.aux_loss = len(self.routed_heads) * (frac * mean_prob).sum()
        return gates.index_copy(-1, routed, routed_gates)

    def project_states(self, hidden_states, position_embeddings):
        """LLaMA's queries, keys and values, and the heads' gates (None with every head active).

        The query-norm router reads each head's query as q_proj gives it: RoPE keeps its norm, but a
        source's per-head q_norm (Qwen3) divides it by its own RMS, which would leave every head
        nearly the same score (README, "Sources")."""
        raw = []
        query_states, key_states, value_states = project(self, hidden_states, position_embeddings, raw_queries=raw)
        gates = None if self.all_active else self.gates(hidden_states, raw[0].transpose(1, 2))
        return query_states, key_states, value_states, gates

    def attention_step(self, query, key, value, attention_mask, gates, **kwargs):
        attn_output, attn_weights = attend(self, self, query, key, value, attention_mask, **kwargs)
        if gates is not None:  # attn_output: (B, T, H, d)
            attn_output = attn_output * gates.unsqueeze(-1).to(attn_output.dtype)
        return attn_output, attn_weights

    def init_layout_parameters(self) -> None:
        for name in ("router_routed", "router_shared", "router_mix"):
            if hasattr(self, name):  # zero routers: every active head starts at gate 1
                nn.init.zeros_(getattr(self, name).weight)


class MoHDecoderLayer(LayoutDecoderLayer):
    attention_class = MoHAttention


class MoHModel(LayoutModel):
    config_class, decoder_layer_class = MoHConfig, MoHDecoderLayer

    def forward(self, *args, **kwargs):
        for layer in self.layers:  # each forward's load-balance terms are its own (MoHForCausalLM.layout_loss)
            layer.self_attn.aux_loss = None
        return super().forward(*args, **kwargs)


class MoHForCausalLM(LayoutCacheMixin, LayoutForCausalLM):
    # what the conversion added (rehead tune's `trainable: new`): the learned router
    _rehead_new_parameters = (r"\.self_attn\.router_",)
    model_class = MoHModel

    def layout_loss(self) -> torch.Tensor | None:
        """β · the mean over layers of the load-balance losses of the last training forward (learned
        router only); averaged, as in every reference implementation, so that β does not grow with depth."""
        losses = [layer.self_attn.aux_loss for layer in self.model.layers if layer.self_attn.aux_loss is not None]
        if not losses:
            return None
        return self.config.moh_aux_loss_coef * torch.stack(losses).mean()

    def forward(self, *args, labels=None, **kwargs):
        for layer in self.model.layers:
            layer.self_attn.aux_loss = None
        outputs = super().forward(*args, labels=labels, **kwargs)
        extra = self.layout_loss()
        if labels is not None and extra is not None:
            outputs.loss = outputs.loss + extra
        return outputs


__all__ = ["MoHForCausalLM", "MoHModel"]
