"""The MoH modeling code against a plain reference written from the paper's formulas."""

import math

import pytest
import torch
from conftest import assert_matches_reference, randomise
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import LlamaConfig

import rehead  # noqa: F401  (registers the layouts)
from rehead.layouts.configuration_moh import MoHConfig
from rehead.layouts.modeling_moh import MoHForCausalLM


def moh_model(router="query-norm", active=4, shared=((1,), (0, 2)), heads=6, kv=2, attn="sdpa", seed=0,
              gate_gradient="straight-through"):
    base = dict(
        vocab_size=50, hidden_size=heads * 4, intermediate_size=32, num_hidden_layers=len(shared),
        num_attention_heads=heads, num_key_value_heads=kv, attention_bias=True, max_position_embeddings=64,
    )
    config = MoHConfig(**base, moh_active_heads=active, moh_shared_heads=[list(s) for s in shared], moh_router=router,
                       moh_gate_gradient=gate_gradient)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = MoHForCausalLM(config).eval()
    return randomise(model, also=lambda name: "router" in name)  # random routers too: a wrong formula shows


def rope(x, cos, sin):
    """x: (T, d); rotate-half RoPE written out: pairs (t, t + d/2)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos[..., :half] - x2 * sin[..., :half], x2 * cos[..., half:] + x1 * sin[..., half:]], -1)


def head_norm(params: dict, name: str, x: torch.Tensor, eps: float) -> torch.Tensor:
    """A per-head RMSNorm over head_dim (Qwen3's q_norm, k_norm) where ``params`` has ``name``.weight: x / rms(x) · g."""
    if f"{name}.weight" not in params:
        return x
    return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt() * params[f"{name}.weight"]


def reference_gates(attn, x_t, q_t):
    """Gates of one token from the formulas. x_t: (D,), q_t: (H, d) before RoPE."""
    heads = q_t.shape[0]
    shared = attn.shared_heads
    routed = [h for h in range(heads) if h not in shared]
    k = attn.top_k
    gates = torch.ones(heads, dtype=x_t.dtype)
    if attn.router == "query-norm":
        norms = torch.stack([q_t[h].norm() for h in routed])
        logits = norms / norms.std()
        chosen = sorted(range(len(routed)), key=lambda j: -logits[j].item())[:k]
        for j, h in enumerate(routed):
            gates[h] = 1.0 if j in chosen else 0.0
        return gates
    pr = torch.softmax(attn.router_routed.weight.double() @ x_t, 0)
    chosen = sorted(range(len(routed)), key=lambda j: -pr[j].item())[:k]
    total = sum(pr[j] for j in chosen)
    alpha = torch.softmax(attn.router_mix.weight.double() @ x_t, 0) if shared else torch.tensor([0.0, 1.0])
    scale = 2 if shared else 1
    for j, h in enumerate(routed):
        gates[h] = scale * alpha[1] * k * pr[j] / total if j in chosen else 0.0
    if shared:
        ps = torch.softmax(attn.router_shared.weight.double() @ x_t, 0)
        for j, h in enumerate(shared):
            gates[h] = scale * alpha[0] * len(shared) * ps[j]
    return gates


def reference_attention(attn, x, cos, sin):
    """out_t = Σ_i g_i(t) W_o^i softmax_s≤t(q_i(t)·k_g(i)(s)/√d) v_g(i)(s) + b_o, in float64, one token at a time."""
    d, heads = attn.head_dim, attn.config.num_attention_heads
    group = heads // attn.config.num_key_value_heads
    p = {n: t.double() for n, t in attn.named_parameters()}
    seq = x.shape[0]
    q = (x @ p["q_proj.weight"].T + p["q_proj.bias"]).view(seq, heads, d)
    k = (x @ p["k_proj.weight"].T + p["k_proj.bias"]).view(seq, -1, d)
    v = (x @ p["v_proj.weight"].T + p["v_proj.bias"]).view(seq, -1, d)
    eps = attn.config.rms_norm_eps
    qn, kn = head_norm(p, "q_norm", q, eps), head_norm(p, "k_norm", k, eps)  # the router reads q as q_proj gives it
    out = torch.zeros(seq, x.shape[1], dtype=torch.float64)
    for t in range(seq):
        gates = reference_gates(attn, x[t], q[t])
        for i in range(heads):
            qi = rope(qn[t, i], cos[t], sin[t])
            keys = torch.stack([rope(kn[s, i // group], cos[s], sin[s]) for s in range(t + 1)])
            weights = torch.softmax(keys @ qi / math.sqrt(d), 0)
            head = weights @ v[: t + 1, i // group]
            out[t] += gates[i] * (p["o_proj.weight"][:, i * d : (i + 1) * d] @ head)
        out[t] += p["o_proj.bias"]
    return out


def reference_logits(model, ids):
    """The whole model with reference attention, float64, one sequence."""
    inner = model.model
    h = inner.embed_tokens.weight.double()[ids]
    positions = torch.arange(len(ids))[None]
    cos, sin = (t[0].double() for t in inner.rotary_emb(h[None].float(), positions))
    for layer in inner.layers:
        dbl = lambda module, x: module.double()(x)  # noqa: E731
        h = h + reference_attention(layer.self_attn, dbl(layer.input_layernorm, h), cos, sin)
        h = h + dbl(layer.mlp, dbl(layer.post_attention_layernorm, h))
    out = model.lm_head.double()(dbl(inner.norm, h))
    model.float()
    return out


@pytest.mark.parametrize("router", ["query-norm", "learned"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("shared", [((1,), (0, 2)), ((), ())])
def test_fast_path_matches_reference(router, attn, shared):
    model = moh_model(router, active=4 if shared[0] else 3, shared=shared, attn=attn)
    ids = torch.randint(0, 50, (2, 7))
    assert_matches_reference(model, reference_logits, ids)


def test_routing_drops_heads_per_token():
    """Gates are 0/1 in the forward pass and each token keeps exactly its shared heads plus top-k."""
    model = moh_model("query-norm", active=3, shared=((1,), (0,)))
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 5, attn.config.hidden_size)
    q = attn.q_proj(x).view(2, 5, -1, attn.head_dim).transpose(1, 2)
    gates = attn.gates(x, q)
    assert set(gates.unique().tolist()) == {0.0, 1.0}
    assert (gates.sum(-1) == 3).all() and (gates[..., 1] == 1).all()


@pytest.mark.parametrize("router", ["query-norm", "learned"])
def test_generate_with_cache_equals_full_forward(router):
    model = moh_model(router, active=3)
    prompt = torch.randint(0, 50, (2, 5))
    out = model.generate(
        prompt, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0
    )
    with torch.no_grad():
        full = model(out.sequences).logits
    stepwise = torch.stack(out.logits, 1)
    torch.testing.assert_close(stepwise, full[:, prompt.shape[1] - 1 : -1], atol=1e-5, rtol=1e-5)


def test_eager_and_sdpa_agree():
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        a = moh_model(attn="eager")(ids).logits
        b = moh_model(attn="sdpa")(ids).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("router", ["query-norm", "learned"])
def test_gradient_checkpointing_gives_the_same_gradients(router):
    ids = torch.randint(0, 50, (2, 9))
    grads = []
    for checkpointing in (False, True):
        model = moh_model(router, active=3).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert model.is_gradient_checkpointing
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


def test_query_norm_router_passes_a_straight_through_gradient():
    """The 0/1 gates carry the softmax's gradient to q_proj: without it q_proj's gradient differs."""
    ids = torch.randint(0, 50, (2, 9))
    model = moh_model("query-norm", active=3).train()
    model(ids, labels=ids).loss.backward()
    with_st = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    model.zero_grad()
    model.eval()  # eval: hard gates, no straight-through term
    model(ids, labels=ids).loss.backward()
    without = model.model.layers[0].self_attn.q_proj.weight.grad
    assert not torch.allclose(with_st, without)


@pytest.mark.parametrize("gate_gradient", ["straight-through", "none"])
def test_gate_gradient_none_is_a_mask_without_a_gradient_path(gate_gradient):
    """--gate-gradient none (the released MoH-LLaMA3-8B): in training the gates are a constant 0/1 mask, so
    q_proj gets only the attention path's gradient, the one eval mode (hard gates, nothing else) gives."""
    ids = torch.randint(0, 50, (2, 9))
    model = moh_model("query-norm", active=3, gate_gradient=gate_gradient).train()
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 5, attn.config.hidden_size)
    gates = attn.gates(x, attn.q_proj(x).view(2, 5, -1, attn.head_dim).transpose(1, 2))
    torch.testing.assert_close(gates, gates.round(), atol=1e-6, rtol=0)  # 0/1 in the forward pass either way
    assert (gates.grad_fn is None) == (gate_gradient == "none")
    model(ids, labels=ids).loss.backward()
    trained = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.eval()(ids, labels=ids).loss.backward()
    same = all(torch.equal(trained[n], p.grad) for n, p in model.named_parameters())
    assert same == (gate_gradient == "none")


def test_learned_router_load_balance_loss():
    ids = torch.randint(0, 50, (2, 9))
    model = moh_model("learned", active=3).train()
    out = model(ids, labels=ids)
    extra = model.layout_loss()
    per_layer = torch.stack([layer.self_attn.aux_loss for layer in model.model.layers])
    assert (per_layer >= 2 - 1e-6).all()  # E·Σ P_i f_i >= k (equality at perfect balance)
    assert per_layer[0] != per_layer[1]  # so that a sum and a mean over layers differ below
    torch.testing.assert_close(extra, 0.01 * per_layer.mean())  # averaged over layers, as the references do
    lm = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(out.loss, lm + extra)
    model.model.layers[0].self_attn.router_routed.weight.grad = None
    out.loss.backward()
    assert model.model.layers[0].self_attn.router_routed.weight.grad.abs().sum() > 0
    assert model.eval()(ids).loss is None and model.layout_loss() is None


def test_zero_routers_give_unit_gates():
    model = moh_model("learned", active=6)  # every head active: no routing at all
    assert all(layer.self_attn.all_active for layer in model.model.layers)
    model = moh_model("learned", active=4)
    for layer in model.model.layers:
        for name in ("router_routed", "router_shared", "router_mix"):
            torch.nn.init.zeros_(getattr(layer.self_attn, name).weight)
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 4, attn.config.hidden_size)
    gates = attn.gates(x, attn.q_proj(x).view(1, 4, -1, attn.head_dim).transpose(1, 2))
    assert ((gates == 0) | ((gates - 1).abs() < 1e-6)).all() and (gates.sum(-1) == 4).all()


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(moh_active_heads=7), "moh_active_heads 7"),
        (dict(moh_shared_heads=[[0, 0], []]), "distinct"),
        (dict(moh_shared_heads=[[6], []]), "distinct heads in [0, 6)"),
        (dict(moh_shared_heads=[[]]), "has 1 layers"),
        (dict(moh_router="softmax"), "moh_router"),
        (dict(moh_gate_gradient="soft"), "moh_gate_gradient 'soft': must be one of straight-through, none"),
        (dict(moh_router="learned", moh_gate_gradient="none"), "applies to the query-norm router"),
    ],
)
def test_config_refuses_what_it_cannot_honour(values, message):
    base = dict(hidden_size=24, num_attention_heads=6, num_hidden_layers=2)
    with pytest.raises(StrictDataclassClassValidationError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        MoHConfig(**base, **values)


def test_config_round_trips(tmp_path):
    config = MoHConfig(hidden_size=24, num_attention_heads=6, num_hidden_layers=2, moh_active_heads=4,
                       moh_shared_heads=[[1], [0, 5]], moh_router="learned")
    config.save_pretrained(tmp_path)
    again = MoHConfig.from_pretrained(tmp_path)
    assert (again.moh_active_heads, again.moh_shared_heads, again.moh_router) == (4, [[1], [0, 5]], "learned")
    assert LlamaConfig.from_pretrained(tmp_path).num_attention_heads == 6


def test_conversion_records_the_gate_gradient(tiny, tmp_path):
    from conftest import read_json

    from rehead.convert import convert
    from rehead.errors import ReheadError

    out = convert(tiny("gqa"), tmp_path / "moh", to="moh", active_heads=4, shared_heads=2, shared="first",
                  router="query-norm", gate_gradient="none")
    assert read_json(out / "config.json")["moh_gate_gradient"] == "none"
    assert read_json(out / "rehead.json")["plan"]["gate_gradient"] == "none"
    with pytest.raises(ReheadError, match="--gate-gradient none applies to the query-norm router.*add --router query-norm"):
        convert(tiny("gqa"), tmp_path / "learned", to="moh", active_heads=4, shared_heads=2, gate_gradient="none")


def test_router_logits_stay_float32_under_bf16_autocast():
    from rehead.layouts.modeling_moh import _fp32

    router = torch.nn.Linear(16, 4, bias=False)
    x = torch.randn(2, 3, 16).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _fp32(router, x)
        plain = router(x)
    assert out.dtype == torch.float32 and plain.dtype == torch.bfloat16
    torch.testing.assert_close(out, x.float() @ router.weight.T)
