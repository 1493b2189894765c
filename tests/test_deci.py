"""DeciLM (``nemotron-nas``): rehead's modeling against stock LLaMA, the constrained planner, the
``--export deci`` conversion and what it refuses. The llama.cpp check is in test_llama_cpp.py."""

import itertools
import json
import random
import re

import pytest
import torch
from conftest import load_without_rehead, logits, randomise, read_json
from huggingface_hub.errors import StrictDataclassClassValidationError
from safetensors.torch import load_file, save_file
from test_dha import IDS, shuffled_repeats
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import rehead  # noqa: F401  (registers the layouts)
from rehead import text
from rehead.app.cli import main
from rehead.convert import convert
from rehead.convert.deci import allocate_shared, ffn_mult_for
from rehead.describe import describe
from rehead.errors import ReheadError
from rehead.families.llama import repeat_heads
from rehead.layouts.configuration_deci import DeciLMConfig, ffn_mult_to_intermediate_size
from rehead.layouts.modeling_deci import DeciLMForCausalLM

FFN = 256  # the tiny sources' FFN width for DeciLM: the format expresses multiples of 256 only


# ---- the format ----


@pytest.mark.parametrize("hidden, width",
                         [(576, 1536), (4096, 14336), (2048, 8192), (8192, 28672), (48, 256), (5120, 13824)])
def test_ffn_mult_reproduces_the_width_under_the_servers_formula(hidden, width):
    ffn_mult = ffn_mult_for(width, hidden)
    assert isinstance(ffn_mult, float)
    assert ffn_mult_to_intermediate_size(json.loads(json.dumps(ffn_mult)), hidden) == width


@pytest.mark.parametrize("hidden, width", [(48, 48), (2048, 5600), (576, 1500)])
def test_widths_the_formula_cannot_reach_have_no_ffn_mult(hidden, width):
    assert ffn_mult_for(width, hidden) is None


def test_formula_rounds_up_to_a_multiple_of_256():
    assert ffn_mult_to_intermediate_size(1.0, 300) == 256  # ⌊200⌋ → 256
    assert ffn_mult_to_intermediate_size(2.0, 300) == 512  # ⌊400⌋ → 512
    assert ffn_mult_to_intermediate_size(1.28, 300) == 256  # ⌊256⌋ stays


def deci_model(groups, heads=6, tied=False, seed=0) -> DeciLMForCausalLM:
    config = DeciLMConfig(
        vocab_size=50, hidden_size=heads * 8, num_attention_heads=heads, num_hidden_layers=len(groups),
        attention_bias=True, max_position_embeddings=64, tie_word_embeddings=tied,
        block_configs=[{"attention": {"n_heads_in_group": g}, "ffn": {"ffn_mult": ffn_mult_for(FFN, heads * 8)}}
                       for g in groups],
    )
    torch.manual_seed(seed)
    model = DeciLMForCausalLM(config).eval()
    return randomise(model)


def as_mha_llama(model: DeciLMForCausalLM) -> LlamaForCausalLM:
    """The stock LLaMA with one K/V head per query head that computes the same function: each layer's
    KV heads repeated over their contiguous group of query heads."""
    c = model.config
    config = LlamaConfig(**{k: v for k, v in c.to_dict().items() if k in LlamaConfig().to_dict()
                            and k not in ("model_type", "architectures", "transformers_version")})
    config.num_key_value_heads, config.intermediate_size = c.num_attention_heads, FFN
    llama = LlamaForCausalLM(config).eval()
    state = model.state_dict()
    for i, block in enumerate(c.block_configs):
        for part in ("k_proj", "v_proj"):
            for kind in ("weight", "bias"):
                name = f"model.layers.{i}.self_attn.{part}.{kind}"
                state[name] = repeat_heads(state[name], block.attention.n_heads_in_group, c.head_dim)
    llama.load_state_dict(state, strict=True)
    return llama


@pytest.mark.parametrize("tied", [False, True])
def test_per_layer_kv_heads_compute_grouped_query_attention(tied):
    model = deci_model([6, 3, 1, 2], tied=tied)  # 1, 2, 6 and 3 KV heads
    assert [layer.self_attn.k_proj.out_features // 8 for layer in model.model.layers] == [1, 2, 6, 3]
    assert all(layer.mlp.gate_proj.out_features == FFN for layer in model.model.layers)
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
    reference = as_mha_llama(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)
    generated = model.generate(ids[:1], max_new_tokens=8, do_sample=False)
    assert torch.equal(generated, reference.generate(ids[:1], max_new_tokens=8, do_sample=False))


def test_attention_implementation_reaches_every_layer():
    model = deci_model([6, 3])
    ids = torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        sdpa = model(ids).logits
        model.set_attn_implementation("eager")
        assert all(layer.self_attn.config._attn_implementation == "eager" for layer in model.model.layers)
        torch.testing.assert_close(model(ids).logits, sdpa, atol=1e-5, rtol=1e-5)


def test_config_round_trips_and_keeps_per_layer_values_only(tmp_path):
    model = deci_model([6, 3, 1])
    model.save_pretrained(tmp_path)
    saved = read_json(tmp_path / "config.json")
    assert "num_key_value_heads" not in saved and "intermediate_size" not in saved
    assert [b["attention"]["n_heads_in_group"] for b in saved["block_configs"]] == [6, 3, 1]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()  # rehead registered it
    assert type(loaded) is DeciLMForCausalLM and loaded.config.heads_kv_per_layer == [1, 2, 6]
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS % 50).logits, model(IDS % 50).logits, atol=0, rtol=0)


@pytest.mark.parametrize(
    "block, error, message",
    [
        ({"attention": {"n_heads_in_group": None, "no_op": True}, "ffn": {"ffn_mult": 8.0}}, ValueError, "no_op"),
        ({"attention": {"n_heads_in_group": None, "replace_with_linear": True}, "ffn": {"ffn_mult": 8.0}},
         ValueError, "replace_with_linear"),
        ({"attention": {"n_heads_in_group": 3}, "ffn": {"ffn_mult": None, "no_op": True}}, ValueError, "ffn has"),
        ({"attention": {"n_heads_in_group": 3, "window_length": 128}, "ffn": {"ffn_mult": 8.0}}, ValueError,
         "window_length"),
        ({"attention": {"n_heads_in_group": 4}, "ffn": {"ffn_mult": 8.0}}, StrictDataclassClassValidationError,
         "must divide the 6 query heads"),
    ],
)
def test_config_refuses_blocks_it_cannot_run(block, error, message):  # read blocks: ValueError; checks: wrapped
    with pytest.raises(error, match=message):
        DeciLMConfig(hidden_size=48, num_attention_heads=6, num_hidden_layers=1, block_configs=[block])


# ---- the constrained allocation ----


def brute_force(curves, target):
    layers = sorted(curves)
    options = [(sum(curves[layer][n] for layer, n in zip(layers, counts)), sum(counts), counts)
               for counts in itertools.product(*(sorted(curves[layer]) for layer in layers)) if sum(counts) <= target]
    return dict(zip(layers, min(options)[2]))


def test_allocation_is_optimal_over_divisor_counts():
    rng = random.Random(0)
    for trial in range(200):
        kv = rng.choice([3, 4, 6, 8])
        counts = [n for n in range(1, kv + 1) if kv % n == 0]
        layers = rng.randint(1, 5)
        curves = {}
        for layer in range(layers):  # errors fall as heads are kept, at random rates
            drops = sorted((rng.random() * rng.choice([0.01, 1, 100]) for _ in counts), reverse=True)
            curves[layer] = {n: e for n, e in zip(counts, drops)} | {kv: 0.0}
        target = rng.randint(layers, layers * kv)
        got = allocate_shared(curves, target)
        assert sum(got.values()) <= target and all(got[layer] in curves[layer] for layer in curves)
        assert got == brute_force(curves, target), (curves, target)


def test_allocation_takes_uneven_steps_a_one_head_greedy_cannot():
    # 8 KV heads: counts 1, 2, 4, 8. Layer 0 loses little from 8 to 4 and much below; layer 1 the reverse.
    curves = {0: {8: 0.0, 4: 0.1, 2: 5.0, 1: 9.0}, 1: {8: 0.0, 4: 3.0, 2: 3.1, 1: 3.2}}
    assert allocate_shared(curves, 5) == {0: 4, 1: 1}
    assert allocate_shared(curves, 16) == {0: 8, 1: 8}
    assert allocate_shared(curves, 9) == {0: 4, 1: 4}


def test_allocation_ties_go_to_fewer_heads_and_impossible_targets_are_refused():
    assert allocate_shared({0: {3: 0.0, 1: 0.0}, 1: {3: 0.0, 1: 0.0}}, 6) == {0: 1, 1: 1}
    with pytest.raises(ValueError, match="fewest heads the curves allow is 2"):
        allocate_shared({0: {3: 0.0, 1: 0.0}, 1: {3: 0.0, 1: 0.0}}, 1)


# ---- the conversion ----


@pytest.mark.parametrize("variant, options", [("gqa", {}), ("mha", {}), ("bias", {}), ("qwen2", {}),
                                              ("gqa", {"tie_word_embeddings": True})])
def test_budget_one_export_is_the_source(tiny, tmp_path, variant, options):
    src = tiny(variant, intermediate_size=FFN, **options)
    out = convert(src, tmp_path / "deci", to="dha", kv_budget=1.0, export="deci")
    config, source = read_json(out / "config.json"), read_json(src / "config.json")
    assert config["architectures"] == ["DeciLMForCausalLM"] and config["model_type"] == "nemotron-nas"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_deci.DeciLMForCausalLM"
    assert {p.name for p in out.glob("*.py")} == {"configuration_deci.py", "modeling_deci.py", "modeling_stack.py"}
    groups = source["num_attention_heads"] // source["num_key_value_heads"]
    assert [b["attention"]["n_heads_in_group"] for b in config["block_configs"]] == [groups] * 2
    assert {ffn_mult_to_intermediate_size(b["ffn"]["ffn_mult"], config["hidden_size"])
            for b in config["block_configs"]} == {FFN}
    assert config["tie_word_embeddings"] == source["tie_word_embeddings"]
    assert (logits(out, IDS) - logits(src, IDS)).abs().max() <= 1e-5


def test_repeated_heads_are_fused_exactly_with_the_query_heads_permuted(tiny, tmp_path, calib_file):
    src = tiny("gqa", intermediate_size=FFN)  # 6 query heads, 2 KV heads
    mha = shuffled_repeats(src, tmp_path, [0, 3, 1, 4, 2, 5])  # KV heads 0, 2, 4 and 1, 3, 5 are copies
    out = convert(mha, tmp_path / "deci", to="dha", kv_budget=1 / 3, export="deci", calib=str(calib_file),
                  calib_tokens=1024, calib_seq_len=128)
    config, plan = read_json(out / "config.json"), read_json(out / "dha_plan.json")
    assert [b["attention"]["n_heads_in_group"] for b in config["block_configs"]] == [3, 3]
    assert plan["layers"][0]["key_groups"] == [[0, 2, 4], [1, 3, 5]] == plan["layers"][0]["value_groups"]
    # the readers of each fused head are contiguous in the exported layer: q rows and o columns moved with them
    assert (logits(out, IDS) - logits(src, IDS)).abs().max() <= 1e-4


def test_planner_gives_each_layer_its_own_count(tiny, tmp_path, calib_file):
    src = tiny("gqa", intermediate_size=FFN)
    mha = shuffled_repeats(src, tmp_path, [0, 3, 1, 4, 2, 5])
    tensors = load_file(mha / "model.safetensors")  # layer 1's K and V heads become distinct: no free merge left
    generator = torch.Generator().manual_seed(3)
    for part in ("k_proj", "v_proj"):
        name = f"model.layers.1.self_attn.{part}.weight"
        tensors[name] = torch.randn(tensors[name].shape, generator=generator) * tensors[name].std()
    save_file(tensors, mha / "model.safetensors", metadata={"format": "pt"})
    # 6 of 12 KV heads, counts from {1, 2, 3, 6}: layer 0 merges its copies into 2 for free, layer 1 keeps 3
    out = convert(mha, tmp_path / "deci", to="dha", kv_budget=0.5, export="deci", calib=str(calib_file),
                  calib_tokens=1024, calib_seq_len=128)
    config, record = read_json(out / "config.json"), read_json(out / "rehead.json")
    assert [b["attention"]["n_heads_in_group"] for b in config["block_configs"]] == [3, 2]
    assert record["plan"]["key_heads_per_layer"] == [2, 3] == record["plan"]["value_heads_per_layer"]
    assert record["plan"]["export"] == "deci" and record["options"]["export"] == "deci"
    assert set(read_json(out / "dha_plan.json")["error_curves"]) == {"0.kv", "1.kv"}
    info = describe(out)
    assert info["layout"] == "deci" and info["key_heads_per_layer"] == [2, 3] == info["value_heads_per_layer"]
    assert info["kv_cache_bytes_per_token_bf16"] == (2 + 3) * 2 * 8 * 2
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert [layer.self_attn.k_proj.out_features // 8 for layer in model.model.layers] == [2, 3]
    assert model.generate(IDS[:1, :6], max_new_tokens=5, do_sample=False).shape == (1, 11)


def test_export_loads_without_rehead(tiny, tmp_path):
    out = convert(tiny("gqa", intermediate_size=FFN), tmp_path / "deci", to="dha", kv_budget=1.0, export="deci")
    ids = [[5, 17, 99, 3, 250, 42, 7]]
    report = load_without_rehead(out, ids, tmp_path)
    assert report["class"] == "DeciLMForCausalLM" and report["new_tokens"] == 6
    torch.testing.assert_close(torch.tensor(report["logits"]), logits(out, torch.tensor(ids))[0, -1],
                               atol=1e-5, rtol=1e-5)


def test_tuning_an_export_keeps_the_format(tiny, tmp_path, calib_file):
    from test_tune import recipe, weights

    from rehead.tune import tune

    src = tiny("gqa", intermediate_size=FFN)
    deci = convert(src, tmp_path / "deci", to="dha", kv_budget=1.0, export="deci")
    out = tune(recipe(tmp_path, deci, calib_file, trainable="new", **{"optim.weight_decay": 0.0})).model
    config, converted = read_json(out / "config.json"), read_json(deci / "config.json")
    assert config["architectures"] == ["DeciLMForCausalLM"] and config["auto_map"] == converted["auto_map"]
    assert config["block_configs"] == converted["block_configs"]
    before, after = weights(deci), weights(out)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if re.search(r"\.self_attn\.[kv]_proj\.", k)}
    assert load_without_rehead(out, [[5, 17, 99]], tmp_path)["class"] == "DeciLMForCausalLM"


@pytest.mark.parametrize(
    "variant, overrides, options, message",
    [
        ("gqa", {}, dict(k_budget=0.5, v_budget=1.0), "groups K and V alike"),
        ("gqa", {}, dict(k_budget=0.5), "groups K and V alike"),
        ("gqa", {}, dict(kv_budget=0.5, uniform=True), "--uniform writes a stock Llama checkpoint"),
        ("gqa", {}, dict(kv_budget=0.2), "below one head per layer"),
        ("gqa", {"intermediate_size": 48}, dict(kv_budget=0.5), "intermediate_size 48: .* multiples of 256"),
        ("odd", {}, dict(kv_budget=1.0), "head_dim 8 with 9 heads and hidden_size 36"),
        ("gqa", {"hidden_act": "gelu"}, dict(kv_budget=1.0), "hidden_act 'gelu'"),
        ("gqa", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}, dict(kv_budget=1.0),
         "'rope_type': 'linear'"),
    ],
)
def test_what_the_export_cannot_honour_is_refused_before_any_work(tiny, tmp_path, variant, overrides, options,
                                                                     message):
    src = tiny(variant, **{"intermediate_size": FFN, **overrides})
    with pytest.raises(ReheadError, match=message):
        convert(src, tmp_path / "out", to="dha", export="deci", **options)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_export_of_another_layout_is_refused_on_the_command_line(tiny, tmp_path, capsys):
    src = tiny("gqa", intermediate_size=FFN)
    assert main(["convert", str(src), str(tmp_path / "out"), "--to", "moh", "--export", "deci"]) == 2
    assert "--export: an option of --to dha, not of --to moh" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.real
def test_real_model_at_budget_one_is_the_real_model(smollm2, tmp_path):
    """SmolLM2-135M: tied embeddings, rope_theta 1e5, FFN 1536 = ffn_mult 4.0 under the servers' formula."""
    out = convert("smollm2-135m", tmp_path / "deci", to="dha", kv_budget=1.0, export="deci")
    config = read_json(out / "config.json")
    assert config["tie_word_embeddings"] and config["rope_parameters"]["rope_theta"] == 100000.0
    assert {(b["attention"]["n_heads_in_group"], b["ffn"]["ffn_mult"]) for b in config["block_configs"]} == {(3, 4.0)}
    ids = text.blocks(AutoTokenizer.from_pretrained(smollm2), "shakespeare-heldout", 512, 256)
    assert (logits(out, ids) - logits(smollm2, ids)).abs().max().item() <= 1e-4
