"""The logit sensitivity of each layer's attention output, and DHA's allocation priced by it."""

import torch
from conftest import read_json
from transformers import AutoModelForCausalLM

from rehead.convert import convert
from rehead.convert.sensitivity import LOGIT_CHUNK, attention_fisher


def test_the_streamed_fisher_is_the_full_models_gradient_squared(tiny):
    model = AutoModelForCausalLM.from_pretrained(tiny("gqa", layers=3), dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    hidden = model.model.embed_tokens(ids).detach()
    position = model.model.rotary_emb(hidden, torch.arange(40).expand(2, -1))
    layers = model.model.layers
    fisher = attention_fisher(lambda i: layers[i], len(layers), hidden, position, model.model.norm,
                              model.lm_head.weight.detach(), seed=3)
    # the reference: one backward pass through the whole model, labels drawn the same way
    outputs = []
    handles = [layer.self_attn.o_proj.register_forward_hook(lambda m, a, out: out.retain_grad() or outputs.append(out))
               for layer in layers]
    logits = model(ids).logits.flatten(0, 1)
    generator = torch.Generator().manual_seed(3)
    total = 0
    for chunk in logits.split(LOGIT_CHUNK):
        log_p = torch.log_softmax(chunk, dim=-1)
        total = total + log_p.gather(1, torch.multinomial(log_p.detach().exp(), 1, generator=generator)).sum()
    total.backward()
    for handle in handles:
        handle.remove()
    assert len(fisher) == 3 and all(f.shape == (2, 40, hidden.shape[-1]) for f in fisher)
    for f, out in zip(fisher, outputs):
        assert torch.allclose(f, out.grad.pow(2), rtol=1e-4, atol=1e-12) and f.sum() > 0


def test_dha_allocates_by_the_logits(tiny, tmp_path, calib_file):
    src = tiny("odd", layers=3)
    plans = {}
    for allocation in ("attention", "logits"):
        out = convert(src, tmp_path / allocation, to="dha", kv_budget=0.5, allocation=allocation,
                      calib=str(calib_file), calib_tokens=1024, calib_seq_len=128)
        plans[allocation] = read_json(out / "dha_plan.json")
    logits = plans["logits"]
    assert logits["allocation"] == "logits"
    assert sum(logits["key_heads_per_layer"]) + sum(logits["value_heads_per_layer"]) == round(0.5 * 2 * 3 * 3)
    # the prices are nats of KL per token: another scale than the relative attention error, same shape
    assert logits["error_curves"].keys() == plans["attention"]["error_curves"].keys()
    assert logits["error_curves"] != plans["attention"]["error_curves"]
    for curve in logits["error_curves"].values():
        values = [curve[str(n)] for n in sorted(map(int, curve))]
        assert values[-1] == 0.0 and all(v >= 0 for v in values)
