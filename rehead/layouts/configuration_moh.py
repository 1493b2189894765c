"""Configuration of the MoH layout (Jin et al. 2024, "MoH: Multi-Head Attention as Mixture-of-Head Attention").

This file travels inside converted checkpoints: it imports only transformers.
"""

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

ROUTERS = ("query-norm", "learned")
GATE_GRADIENTS = ("straight-through", "none")


@strict
class MoHConfig(LlamaConfig):
    r"""A LLaMA configuration whose attention routes each token to a subset of its heads.

    moh_active_heads: heads each token uses, shared heads included.
    moh_shared_heads: per layer, the indices of the always-on heads; every other head is routed.
    moh_router: "query-norm" (parameter-free: a routed head's logit is the norm of its query,
        divided by the std across routed heads; 0/1 gates) or "learned" (the paper's two-stage
        router with a load-balance loss).
    moh_gate_gradient: the query-norm router's gradient in training. "straight-through" (rehead's
        own): the 0/1 gates carry the routed softmax's gradient to the queries; "none": a 0/1 mask
        with no gradient path, as in the released MoH-LLaMA3-8B.
    moh_aux_loss_coef: β of the load-balance loss β·E·Σ_i P_i f_i (learned router only), averaged
        over the layers as every reference implementation does (summed, β would act as β·L).
    """

    model_type = "rehead_moh"

    qk_norm: bool = False  # the source's per-head q/k norms before RoPE (Qwen3)
    moh_active_heads: int | None = None
    moh_shared_heads: list | None = None
    moh_router: str = "query-norm"
    moh_gate_gradient: str = "straight-through"
    moh_aux_loss_coef: float = 0.01

    # what rehead's inspect and model card say about the layout
    layout_summary = ("mixture-of-head attention (MoH, Jin et al. 2024): each token uses its top-k heads plus "
                      "always-on shared heads, with gated head outputs")

    def kv_heads_per_layer(self) -> tuple[list[int], list[int]]:
        return [self.num_key_value_heads] * self.num_hidden_layers, [self.num_key_value_heads] * self.num_hidden_layers

    def layout_facts(self, read=None) -> dict:
        return {
            "active_heads": self.moh_active_heads,
            "shared_heads_per_layer": self.moh_shared_heads,
            "router": self.moh_router,
            "active_fraction": round(self.moh_active_heads / self.num_attention_heads, 4),
        }

    def card_lines(self) -> list[str]:
        heads = self.num_attention_heads
        return [f"- Active heads: {self.moh_active_heads} of {heads} per token "
                f"({100 * self.moh_active_heads / heads:.0f}%), router `{self.moh_router}`"]

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.moh_active_heads is None:
            self.moh_active_heads = self.num_attention_heads
        if self.moh_shared_heads is None:
            self.moh_shared_heads = [[] for _ in range(self.num_hidden_layers)]

    def validate_architecture(self):
        super().validate_architecture()
        heads = self.num_attention_heads
        if self.moh_router not in ROUTERS:
            raise ValueError(f"moh_router {self.moh_router!r}: must be one of {', '.join(ROUTERS)}")
        if self.moh_gate_gradient not in GATE_GRADIENTS:
            raise ValueError(
                f"moh_gate_gradient {self.moh_gate_gradient!r}: must be one of {', '.join(GATE_GRADIENTS)}"
            )
        if self.moh_router == "learned" and self.moh_gate_gradient != "straight-through":
            raise ValueError(
                f"moh_gate_gradient {self.moh_gate_gradient!r} applies to the query-norm router; the learned "
                "router's gates are its softmax weights, differentiable by design: keep 'straight-through'"
            )
        if not 1 <= self.moh_active_heads <= heads:
            raise ValueError(f"moh_active_heads {self.moh_active_heads}: must be in [1, {heads}]")
        if len(self.moh_shared_heads) != self.num_hidden_layers:
            raise ValueError(
                f"moh_shared_heads has {len(self.moh_shared_heads)} layers, the model {self.num_hidden_layers}"
            )
        for layer, shared in enumerate(self.moh_shared_heads):
            if len(set(shared)) != len(shared) or any(not 0 <= h < heads for h in shared):
                raise ValueError(f"moh_shared_heads[{layer}] = {shared}: must be distinct heads in [0, {heads})")
            if len(shared) > self.moh_active_heads:
                raise ValueError(
                    f"moh_shared_heads[{layer}] has {len(shared)} heads, more than moh_active_heads "
                    f"{self.moh_active_heads}"
                )
