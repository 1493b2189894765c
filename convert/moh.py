"""``--to moh``: mixture-of-head attention from a trained checkpoint.

The weights stay as they are; the conversion decides, per layer, which heads are shared
(always on) and, for the learned router, where the router starts.

Shared heads, ``--shared calibrated``: on calibration text, head i's contribution to the
attention output at token t is c_i(t) = W_o^i · head_i(t). A token drops the routed heads its
router does not pick, losing Σ_{dropped} ||c_i(t)||². The shared set is grown greedily, one
head at a time, to keep the most of Σ_t Σ_i ||c_i(t)||² under the router's own choices.
``--shared first`` takes heads 0 … S-1 (the paper's choice).

Learned router: its routed logits start as a ridge fit (from the attention input x) of each
token's standardised log-contributions, scaled by ``ROUTER_SCALE`` so that the softmax starts
near uniform: the gates start near 1 and the top-k order is the fit's.
"""

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, field_validator

from rehead import families
from rehead.errors import ReheadError
from rehead.layouts.configuration_moh import MoHConfig
from rehead.layouts.modeling_moh import MoHDecoderLayer

from .options import ConvertOptions, check_head_value, flag, head_count
from .rewriter import LayerInput, Rewriter, Rewritten, build_layer, head_statistics, llama_values

ROUTER_SCALE = 0.02
RIDGE = 1e-3


def dropped_energy(scores: torch.Tensor, energy: torch.Tensor, shared: list[int], top_k: int) -> torch.Tensor:
    """Σ_t of the contribution energy of the routed heads that token t's router leaves out.

    scores, energy: (tokens, heads); each token keeps the top_k routed heads by score.
    """
    routed = [h for h in range(scores.shape[1]) if h not in shared]
    if top_k >= len(routed):
        return energy.new_zeros(())
    s, e = scores[:, routed], energy[:, routed]
    return e.sum() - e.gather(1, s.topk(top_k, dim=1).indices).sum()


def choose_shared(scores: torch.Tensor, energy: torch.Tensor, n_shared: int, top_k: int) -> list[int]:
    shared: list[int] = []
    for _ in range(n_shared):
        candidates = [h for h in range(scores.shape[1]) if h not in shared]
        shared.append(min(candidates, key=lambda h: dropped_energy(scores, energy, shared + [h], top_k).item()))
    return sorted(shared)


def fit_router(inputs: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
    """Ridge fit W (heads, d_model) of ROUTER_SCALE · standardised log-energy from the inputs."""
    target = energy.clamp_min(1e-12).log()
    target = (target - target.mean(1, keepdim=True)) / target.std(1, keepdim=True).clamp_min(1e-6)
    gram = inputs.T @ inputs
    gram += RIDGE * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    return ROUTER_SCALE * torch.linalg.solve(gram, inputs.T @ target).T


class MoHOptions(ConvertOptions):
    to: Literal["moh"] = "moh"
    active_heads: float = Field(
        0.75, description="heads each token uses, shared heads included: a count (7) or a fraction of the heads "
                          "(0.75; rounds to the nearest count, halves down)")
    shared_heads: float = Field(0.5, description="always-on heads: a count or a fraction; fewer than the active heads")
    router: Literal["query-norm", "learned"] | None = Field(
        None, description="learned: the paper's two-stage router with its load balance, started from a fit on "
                          "calibration text; query-norm (the released MoH-LLaMA3-8B's): parameter-free, a routed "
                          "head's logit is its query's norm (before a q_norm) over the std across routed heads. "
                          "Default, by measurement on every held-out kind (BENCHMARKS.md): learned, and query-norm "
                          "for a source with per-head q/k norms (Qwen3)")
    gate_gradient: Literal["straight-through", "none"] = Field(
        "straight-through", description="query-norm router in training: a softmax gradient through the 0/1 gates "
                                        "(rehead's addition), or none (the released MoH-LLaMA3-8B)")
    shared: Literal["calibrated", "first"] = Field(
        "calibrated", description="which heads are shared: calibrated (the heads that matter most on calibration "
                                  "text) or first (heads 0..S-1, the paper's choice)")

    @field_validator("active_heads", "shared_heads")
    @classmethod
    def _count_or_fraction(cls, value: float, info) -> float:
        return check_head_value(value, flag(info.field_name))


@dataclass
class MoHLayerPlan:
    shared: list[int]  # the layer's always-on heads
    kept_energy: float | None  # on calibration text: the share of head-output energy the router keeps


class MoHRewriter(Rewriter):
    layout = "moh"
    Options = MoHOptions

    def __init__(self, options: MoHOptions, source_config: dict):
        super().__init__(options, source_config)
        if options.router is None:  # the default measured best for this kind of source (BENCHMARKS.md)
            router = "query-norm" if getattr(self.llama, "qk_norm", False) else "learned"
            self.options = options = options.model_copy(update={"router": router})
        heads = self.heads
        self.active = head_count(self.options.active_heads, heads, "--active-heads")
        n_shared = head_count(self.options.shared_heads, heads, "--shared-heads")
        if not 1 <= self.active <= heads:
            raise ReheadError(f"--active-heads {self.active}: the model has {heads} heads per layer; give 1 to {heads}")
        if n_shared >= self.active:
            raise ReheadError(
                f"--shared-heads {n_shared}: must be fewer than --active-heads {self.active} "
                "(the active heads that are not shared are routed)"
            )
        if self.options.router == "learned" and self.options.gate_gradient != "straight-through":
            raise ReheadError(
                f"--gate-gradient {self.options.gate_gradient} applies to the query-norm router; the learned "
                "router (the default for this source) has gates that are its softmax weights, differentiable by "
                "design: add --router query-norm (the released MoH-LLaMA3-8B's routing), or drop --gate-gradient"
            )
        self.n_shared = n_shared
        self.routing = self.active < heads
        self.needs_calibration = self.routing and (options.shared == "calibrated" or options.router == "learned")

    def config(self, shared: dict[int, list[int]]) -> MoHConfig:
        """The MoH config with these layers' shared heads (the others none)."""
        config = MoHConfig(
            **llama_values(self.llama),
            moh_active_heads=self.active,
            moh_shared_heads=[shared.get(index, []) for index in range(self.layers)],
            moh_router=self.options.router,
            moh_gate_gradient=self.options.gate_gradient,
        )
        config._attn_implementation = "sdpa"
        return config

    def rewrite_layer(self, layer: LayerInput) -> Rewritten:
        tensors = dict(layer.tensors)
        hidden = self.llama.hidden_size
        tensors = families.with_o_proj_bias(tensors, self.llama)
        top_k = self.active - self.n_shared
        learned = self.options.router == "learned"
        routers, kept = {}, None
        if self.needs_calibration:
            inputs, norms, energy = head_statistics(layer)
            scores = energy if learned else norms  # the learned router is fitted to the energies next
            if self.options.shared == "calibrated":
                shared = choose_shared(scores, energy, self.n_shared, top_k)
            else:
                shared = list(range(self.n_shared))
            kept = 1 - (dropped_energy(scores, energy, shared, top_k) / energy.sum()).item()
            if learned:
                routed = [h for h in range(self.heads) if h not in shared]
                routers["router_routed"] = fit_router(inputs, energy[:, routed])
        else:
            shared = list(range(self.n_shared))
        if learned and self.routing:
            routers.setdefault("router_routed", torch.zeros(self.heads - len(shared), hidden))
            if shared:
                routers["router_shared"] = torch.zeros(len(shared), hidden)
                routers["router_mix"] = torch.zeros(2, hidden)
        tensors.update({f"self_attn.{name}.weight": w.cpu() for name, w in routers.items()})
        return Rewritten(tensors, MoHLayerPlan(shared, kept))

    def layer_module(self, index: int, tensors: dict[str, torch.Tensor], plan: MoHLayerPlan):
        return build_layer(MoHDecoderLayer, self.config({index: plan.shared}), index, tensors, self.options.device)

    def target_config(self, plans: list[MoHLayerPlan]) -> dict:
        return self.config({index: plan.shared for index, plan in enumerate(plans)}).to_dict()

    def summary(self, plans: list[MoHLayerPlan]) -> dict:
        kept = [plan.kept_energy for plan in plans if plan.kept_energy is not None]
        return {
            "heads": self.heads,
            "active_heads": self.active,
            "shared_heads": self.n_shared,
            "router": self.options.router,
            "gate_gradient": self.options.gate_gradient,
            "shared_per_layer": [plan.shared for plan in plans],
            "kept_energy_per_layer": [round(k, 5) for k in kept] or None,
        }
