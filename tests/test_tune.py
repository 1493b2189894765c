"""rehead tune: the loop learns, resumes bit for bit, distils, trains only what it is told, and exports."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import byte_tokenizer, load_without_rehead, read_json
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rehead.convert import convert
from rehead.errors import ReheadError
from rehead.text import pack
from rehead.tune import load, tune
from rehead.tune.data import PackedBlocks, StreamedBlocks
from rehead.tune.loop import lr_factor
from rehead.tune.losses import Objective

ROOT = Path(__file__).resolve().parents[1]


def recipe(tmp_path, model, calib_file, **values):
    base = {"model": str(model), "data.train": str(calib_file), "data.eval": str(calib_file), "data.seq_len": 64,
            "data.eval_tokens": 512, "train.max_steps": 4, "train.micro_batch": 4, "optim.lr": 3e-3,
            "optim.warmup_steps": 1, "output_dir": str(tmp_path / "run")}
    base.update(values)
    return load(None, [], base)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def metrics(run: Path, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if row["kind"] == kind]


def test_loss_goes_down_and_the_export_loads_without_rehead(tiny, tmp_path, calib_file):
    src = tiny("gqa")
    moh = convert(src, tmp_path / "moh", to="moh", router="learned", active_heads=4, shared_heads=2,
                  calib=str(calib_file), calib_tokens=1024, calib_seq_len=128)
    out = tune(recipe(tmp_path, moh, calib_file, **{"train.max_steps": 40, "train.eval_every": 20})).model
    train = metrics(tmp_path / "run", "train")
    first = sum(r["lm"] for r in train[:5]) / 5
    last = sum(r["lm"] for r in train[-5:]) / 5
    assert last < first - 0.5, (first, last)
    evals = [r["eval_ppl"] for r in metrics(tmp_path / "run", "eval")]
    assert [r["step"] for r in metrics(tmp_path / "run", "eval")] == [0, 20, 40]
    assert evals[-1] < evals[0] / 2
    assert all(r["tokens_per_s"] > 0 and r["peak_memory_gb"] > 0 and 0 < r["grad_norm"] < 1e3 for r in train)
    assert (tmp_path / "run" / "log.csv").read_text().count("\n") == 40 + 3 + 1
    assert (tmp_path / "run" / "recipe.yaml").is_file()
    provenance = read_json(out / "rehead.json")
    assert provenance["layout"] == "moh" and provenance["tune"]["steps"] == 40
    report = load_without_rehead(out, [[5, 17, 99, 3]], tmp_path)
    assert report["class"] == "MoHForCausalLM" and report["new_tokens"] == 6
    assert any(not torch.equal(a, weights(moh)[k]) for k, a in weights(out).items())


def test_resume_after_a_kill_matches_an_uninterrupted_run(tiny, tmp_path, calib_file):
    src = tiny("gqa")
    moh = convert(src, tmp_path / "moh", to="moh", router="learned", active_heads=4, shared_heads=2,
                  calib=str(calib_file), calib_tokens=1024, calib_seq_len=128)
    values = {"teacher": str(src), "loss.kd": 0.5, "train.max_steps": 6, "train.save_every": 3, "train.grad_accum": 2,
              "train.micro_batch": 2, "train.eval_every": 2}
    straight = tune(recipe(tmp_path, moh, calib_file, **values, output_dir=str(tmp_path / "straight"))).model

    cut = recipe(tmp_path, moh, calib_file, **values, output_dir=str(tmp_path / "cut"))
    (tmp_path / "cut.yaml").write_text(cut.dump())
    env = {**os.environ, "REHEAD_FAULT": "kill-after-step:3"}
    killed = subprocess.run([sys.executable, "-m", "rehead", "tune", str(tmp_path / "cut.yaml")], env=env,
                            capture_output=True, text=True, cwd=tmp_path)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()] == ["step-00000003"]
    assert not (tmp_path / "cut" / "model").exists()

    resumed = tune(load(tmp_path / "cut.yaml")).model
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run differs from the uninterrupted one"
    assert metrics(tmp_path / "straight", "train")[-1]["loss"] == metrics(tmp_path / "cut", "train")[-1]["loss"]
    csv_steps = [line.split(",")[0] for line in (tmp_path / "cut" / "log.csv").read_text().splitlines()[1:]]
    assert csv_steps == [line.split(",")[0] for line in (tmp_path / "straight" / "log.csv").read_text().splitlines()[1:]]


def _objective(folder, teacher_folder=None, **kw):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_folder, dtype=torch.float32) if teacher_folder else None
    args = dict(lm=1.0, kd=1.0 if teacher else 0.0, temperature=1.0, layout=1.0, chunk_tokens=7)
    args.update(kw)
    return model, teacher, Objective(model, teacher, **args)


def test_distillation_from_the_model_itself_is_zero(tiny):
    src = tiny("gqa")
    model, _, objective = _objective(src, src, lm=0.0)
    ids = torch.randint(0, 256, (2, 33))
    out = objective(ids)
    assert out["kd"].abs().item() < 1e-6
    out["loss"].backward()
    assert max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None) < 1e-6


def test_chunked_losses_match_the_plain_formulas(tiny):
    student, teacher = tiny("gqa", seed=0), tiny("gqa", seed=1)
    model, teach, objective = _objective(student, teacher, temperature=2.0, kd=0.7)
    ids = torch.randint(0, 256, (2, 33))
    out = objective(ids)
    with torch.no_grad():
        s_logits = model(ids).logits[:, :-1].flatten(0, 1).double()
        t_logits = teach(ids).logits[:, :-1].flatten(0, 1).double()
    labels = ids[:, 1:].flatten()
    lm = F.cross_entropy(s_logits, labels)
    kd = F.kl_div(F.log_softmax(s_logits / 2, -1), F.log_softmax(t_logits / 2, -1), log_target=True,
                  reduction="batchmean") * 4
    assert abs(out["lm"].item() - lm.item()) < 1e-5
    assert abs(out["kd"].item() - kd.item()) < 1e-5 and kd.item() > 1e-3
    assert abs(out["loss"].item() - (lm + 0.7 * kd).item()) < 1e-5
    # the gradient flows through the checkpointed chunks as through the plain formula
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(ids).logits[:, :-1].flatten(0, 1)
    plain = F.cross_entropy(logits, labels) + 0.7 * 4 * F.kl_div(
        F.log_softmax(logits / 2, -1), F.log_softmax(t_logits.float() / 2, -1), log_target=True, reduction="batchmean")
    plain.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, atol=1e-5, rtol=1e-4)


def test_moh_load_balance_loss_is_part_of_the_objective(tiny, tmp_path, calib_file):
    moh = convert(tiny("gqa"), tmp_path / "moh", to="moh", router="learned", active_heads=4, shared_heads=2,
                  calib=str(calib_file), calib_tokens=512, calib_seq_len=128)
    model, _, objective = _objective(moh)
    objective.train()
    out = objective(torch.randint(0, 256, (2, 33)))
    assert out["layout"].item() > 0
    assert abs(out["loss"].item() - (out["lm"] + out["layout"]).item()) < 1e-6


@pytest.mark.parametrize("form", ["plain", "diff"])
def test_trainable_new_changes_only_what_the_conversion_added(tiny, tmp_path, calib_file, form):
    gda = convert(tiny("gqa"), tmp_path / "gda", to="gda", ratio=3, calib=str(calib_file), calib_tokens=512,
                  calib_seq_len=128, lambda_=form)
    out = tune(recipe(tmp_path, gda, calib_file, trainable="new", **{"optim.weight_decay": 0.0})).model
    before, after = weights(gda), weights(out)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    new = {k for k in before if re.search(r"\.self_attn\.(noise\.|diff_lambda|lambda_[qk][12])", k)}
    assert changed == new and any("lambda_q1" in k for k in new) == (form == "diff")


def test_trainable_new_on_a_stock_checkpoint_is_refused(tiny, tmp_path, calib_file):
    with pytest.raises(ReheadError, match="no parameters added by a conversion"):
        tune(recipe(tmp_path, tiny("gqa"), calib_file, trainable="new"))


def test_trainable_attention_leaves_the_rest(tiny, tmp_path, calib_file):
    src = tiny("gqa")
    out = tune(recipe(tmp_path, src, calib_file, trainable="attention")).model
    before, after = weights(src), weights(out)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if ".self_attn." in k}


def test_lora_is_merged_at_export(tiny, tmp_path, calib_file):
    src = tiny("gqa")
    out = tune(recipe(tmp_path, src, calib_file, lora={"r": 4, "alpha": 8}, **{"optim.lr": 1e-2})).model
    before, after = weights(src), weights(out)
    assert before.keys() == after.keys()  # no adapter tensors: merged into the weights
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if re.search(r"self_attn\.[qkvo]_proj\.weight", k)}


def test_a_diverging_loss_stops_and_keeps_the_last_good_checkpoint(tiny, tmp_path, calib_file):
    with pytest.raises(ReheadError, match=r"loss became nan at step 2.*last good checkpoint is .*step-00000001"):
        tune(recipe(tmp_path, tiny("gqa"), calib_file, **{"optim.lr": 1e12, "train.save_every": 1}))
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["step-00000001"] and not (tmp_path / "run" / "model").exists()


def test_bad_recipes_name_the_key(tmp_path, tiny, calib_file):
    path = tmp_path / "r.yaml"
    path.write_text("model: m\noutput_dir: o\ntrain: {max_steps: 3}\noptim: {lrr: 1}\n")
    with pytest.raises(ReheadError, match=r"optim\.lrr: unknown key"):
        load(path)
    with pytest.raises(ReheadError, match=r"optim\.lr: .*number.*'fast'"):
        load(None, ["optim.lr=fast"], {"model": "m", "output_dir": "o", "train.max_steps": 3})
    with pytest.raises(ReheadError, match=r"model: missing"):
        load(None, [], {"output_dir": "o", "train.max_steps": 3})
    with pytest.raises(ReheadError, match="needs a teacher"):
        load(None, ["loss.kd=1"], {"model": "m", "output_dir": "o", "train.max_steps": 3})
    with pytest.raises(ReheadError, match="exactly one of train.max_steps and train.max_tokens"):
        load(None, ["train.max_tokens=1000"], {"model": "m", "output_dir": "o", "train.max_steps": 3})
    with pytest.raises(ReheadError, match="write KEY=VALUE"):
        load(None, ["optim.lr"], {"model": "m", "output_dir": "o", "train.max_steps": 3})
    with pytest.raises(ReheadError, match="no such file"):
        load(tmp_path / "missing.yaml")
    r = load(None, ["optim.lr=1e-5", "train.max_tokens=4096", "train.max_steps=null"], {"model": "m", "output_dir": "o",
                                                                                      "train.max_steps": 3})
    assert r.optim.lr == 1e-5 and r.train.max_tokens == 4096


def test_a_teacher_with_another_tokenizer_is_refused(tiny, tmp_path, calib_file):
    other = tiny("gqa")
    tok = byte_tokenizer()
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(other)
    with pytest.raises(ReheadError, match="tokenizer differs"):
        tune(recipe(tmp_path, tiny("gqa"), calib_file, teacher=str(other), **{"loss.kd": 1.0}))


def test_too_little_data_is_refused(tiny, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("only a few words")
    with pytest.raises(ReheadError, match=r"has 17 tokens, fewer than one block of data.seq_len=64"):
        tune(recipe(tmp_path, tiny("gqa"), small, **{"data.eval": None}))


def test_block_order_is_fixed_by_the_seed_and_shared_across_processes():
    blocks = torch.arange(40 * 3).view(40, 3)
    one = PackedBlocks(blocks, seed=5, micro_batch=4, grad_accum=1, world=1)
    two = [PackedBlocks(blocks, seed=5, micro_batch=1, grad_accum=2, world=2) for _ in range(2)]
    for step in (0, 7, 12):  # step 12 is in the second epoch
        whole = one.micro_batches(step, 0)[0]
        parts = torch.cat([torch.cat(two[rank].micro_batches(step, rank)) for rank in range(2)])
        assert sorted(whole[:, 0].tolist()) == sorted(parts[:, 0].tolist())
    seen = torch.cat([one.micro_batches(s, 0)[0] for s in range(10)])
    assert sorted(seen[:, 0].tolist()) == list(range(0, 120, 3))  # one epoch: every block once
    other = PackedBlocks(blocks, seed=6, micro_batch=4, grad_accum=1, world=1)
    assert not torch.equal(one.micro_batches(0, 0)[0], other.micro_batches(0, 0)[0])


def test_streamed_blocks_resume_where_they_stopped(calib_file):
    tok = byte_tokenizer()
    a = StreamedBlocks(tok, str(calib_file), 32, seed=1, buffer=8, micro_batch=2, grad_accum=1, world=1)
    straight = [a.micro_batches(s, 0)[0] for s in range(6)]
    b = StreamedBlocks(tok, str(calib_file), 32, seed=1, buffer=8, micro_batch=2, grad_accum=1, world=1)
    assert all(torch.equal(x, y) for x, y in zip(straight[3:], [b.micro_batches(s, 0)[0] for s in range(3, 6)]))
    packed = pack(tok, str(calib_file), 32, None)
    assert {tuple(x.tolist()) for batch in straight for x in batch} <= {tuple(x.tolist()) for x in packed}


def test_schedules():
    def factors(schedule, **kw):
        r = load(None, [], {"model": "m", "output_dir": "o", "train.max_steps": 100, "optim.lr": 1.0,
                            "optim.min_lr": 0.1, "optim.schedule": schedule, **kw})
        f = lr_factor(r, 100)
        return [f(s) for s in range(100)]

    cos = factors("cosine", **{"optim.warmup_steps": 10})
    assert cos[0] < cos[5] < cos[9] < cos[10] == 1.0 and abs(cos[-1] - 0.1) < 1e-3
    lin = factors("linear")
    assert lin[0] == 1.0 and abs(lin[50] - 0.55) < 1e-2 and abs(lin[-1] - 0.1) < 0.01
    assert set(factors("constant")) == {1.0}
    wsd = factors("wsd", **{"optim.decay_fraction": 0.2})
    assert set(wsd[:80]) == {1.0} and wsd[80] == 1.0 and wsd[90] < 0.6 and wsd[-1] < 0.2
    # the last 20% decays linearly from 1 to min_lr/lr = 0.1: step s has 0.1 + 0.9·(100 − s)/20
    assert wsd[80:] == pytest.approx([0.1 + 0.9 * (100 - s) / 20 for s in range(80, 100)], abs=1e-12)


def test_every_shipped_recipe_is_valid():
    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    assert len(recipes) >= 6
    for path in recipes:
        load(path)


def free_port() -> int:
    """A port on 127.0.0.1 nothing listens on now (a fixed one can still be held by an earlier run)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_two_processes_train_like_one_at_the_same_global_batch(tiny, tmp_path, calib_file):
    src = tiny("gqa")
    one = recipe(tmp_path, src, calib_file, teacher=str(src), **{"loss.kd": 0.5, "output_dir": str(tmp_path / "one")})
    (tmp_path / "r.yaml").write_text(one.dump())
    single = tune(one).model
    result = subprocess.run(
        ["torchrun", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
         "-m", "rehead", "tune", str(tmp_path / "r.yaml"),
         f"output_dir={tmp_path / 'two'}", "train.micro_batch=2"],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    a, b, start = weights(single), weights(tmp_path / "two" / "model"), weights(src)
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-3  # it trained
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert result.stdout.count("wrote") == 1


@pytest.mark.real
def test_the_cpu_recipe_tunes_the_real_model_end_to_end(smollm2, tmp_path):
    moh = convert("smollm2-135m", tmp_path / "moh", to="moh", shared="first", router="query-norm")  # no calibration: fast
    r = load(ROOT / "recipes" / "smollm2-135m-moh.yaml", [
        f"model={moh}", f"output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.micro_batch=2",
        "data.seq_len=64", "data.eval_tokens=256", "train.save_every=0", "train.eval_every=0",
    ])
    assert r.teacher == "smollm2-135m" and r.loss.kd > 0
    out = tune(r).model
    evals = metrics(tmp_path / "run", "eval")
    assert [e["step"] for e in evals] == [0, 2] and all(e["eval_ppl"] > 1 for e in evals)
    assert all(row["kd"] > 0 for row in metrics(tmp_path / "run", "train"))
    report = load_without_rehead(out, [[504, 3237, 314]], tmp_path)
    assert report["class"] == "MoHForCausalLM" and report["new_tokens"] == 6


def test_a_streamed_run_trains_and_resumes_like_an_uninterrupted_one(tiny, tmp_path, calib_file):
    src = tiny("gqa")
    values = {"data.streaming": True, "data.shuffle_buffer": 16, "train.max_steps": 4, "train.save_every": 2}
    straight = tune(recipe(tmp_path, src, calib_file, **values, output_dir=str(tmp_path / "a"))).model
    cut = recipe(tmp_path, src, calib_file, **values, output_dir=str(tmp_path / "b"))
    (tmp_path / "b.yaml").write_text(cut.dump())
    killed = subprocess.run([sys.executable, "-m", "rehead", "tune", str(tmp_path / "b.yaml")], capture_output=True,
                            env={**os.environ, "REHEAD_FAULT": "kill-after-step:2"}, cwd=tmp_path)
    assert killed.returncode == -9
    resumed = tune(load(tmp_path / "b.yaml")).model
    a, b, start = weights(straight), weights(resumed), weights(src)
    assert all(torch.equal(a[k], b[k]) for k in a) and any(not torch.equal(a[k], start[k]) for k in a)


def test_a_tracker_that_is_not_installed_is_refused(tiny, tmp_path, calib_file, monkeypatch):
    from rehead.tune import loop

    monkeypatch.setattr(loop, "tracker_available", lambda name: False)
    with pytest.raises(ReheadError, match="log: wandb needs the wandb package: pip install wandb"):
        tune(recipe(tmp_path, tiny("gqa"), calib_file, log="wandb"))


@pytest.mark.parametrize("layout", ["dha", "gda"])
def test_compiled_layers_train_like_eager_ones(tiny, tmp_path, calib_file, layout):
    """train.compile compiles each decoder layer in place: same losses as eager, and the export's tensor
    names carry no compile wrapper."""
    options = {"dha": dict(kv_budget=0.5), "gda": dict(ratio=3)}[layout]
    model = convert(tiny("gqa"), tmp_path / layout, to=layout, calib=str(calib_file), calib_tokens=1024,
                    calib_seq_len=128, **options)
    losses, exports = {}, {}
    for compiled in (False, True):
        run = tmp_path / f"run-{compiled}"
        out = tune(recipe(tmp_path, model, calib_file, **{"train.max_steps": 3, "train.compile": compiled,
                                                          "output_dir": str(run), "data.eval": None})).model
        losses[compiled] = [r["loss"] for r in metrics(run, "train")]
        exports[compiled] = weights(out)
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
    assert exports[True].keys() == exports[False].keys()
    assert max((exports[True][k] - exports[False][k]).abs().max().item() for k in exports[True]) < 1e-4


def test_fused_adamw_steps_like_the_foreach_one(tiny, tmp_path, calib_file):
    outs = {}
    for fused in (False, True):
        outs[fused] = weights(tune(recipe(tmp_path, tiny("gqa"), calib_file, **{
            "train.max_steps": 2, "optim.fused": fused, "output_dir": str(tmp_path / f"run-{fused}"),
            "data.eval": None})).model)
    assert max((outs[True][k] - outs[False][k]).abs().max().item() for k in outs[True]) < 1e-5
    assert any(not torch.equal(outs[True][k], weights(tiny("gqa"))[k]) for k in outs[True])
