"""The training loop: one CPU process, or ``accelerate launch`` over GPUs (DDP, FSDP2) and nodes.

    output_dir/
      recipe.yaml                 the resolved recipe
      checkpoints/step-00000050/  accelerate state (model, optimizer, scheduler, RNG) + trainer_state.json
      log.csv | tensorboard/ ...  the trackers
      metrics.jsonl               every logged value (main process)
      model/                      the exported model, in its layout's checkpoint format
"""

import json
import logging
import math
import os
import re
import shutil
import signal
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from rehead import models, text, writer
from rehead.checkpoint import sha256_file
from rehead.errors import Interrupted, ReheadError
from rehead.files import check_disjoint, check_writable
from rehead.provenance import EvalPoint, Provenance, TuneRecord
from rehead.sampled import Sampler
from rehead.sources import resolve

from .data import PackedBlocks, StreamedBlocks
from .losses import Objective, unwrapped
from .meter import CSVTracker, detect_peak_tflops, flops_per_token, peak_memory_bytes
from .recipe import Recipe

log = logging.getLogger("rehead.tune")
STEP_DIR = re.compile(r"step-(\d+)$")
STATE = "trainer_state.json"


def compile_layers(model) -> None:
    """Regional compilation: torch.compile each decoder layer in place. The layers share their code, so one
    compiled graph serves them all and compiling costs one layer's time, not the model's. (MoH's layers hold
    different head lists, which dynamo guards as constants: they recompile per layer up to its limit.)"""
    for layer in unwrapped(model).get_decoder().layers:
        layer.compile()


def lr_factor(recipe: Recipe, total: int):
    o = recipe.optim
    floor = o.min_lr / o.lr

    def factor(step: int) -> float:  # step: optimizer steps taken so far
        if step < o.warmup_steps:
            return (step + 1) / (o.warmup_steps + 1)
        if o.schedule == "constant":
            return 1.0
        if o.schedule == "wsd":
            decay = max(1, round(total * o.decay_fraction))
            start = total - decay
            if step < start:
                return 1.0
            return floor + (1 - floor) * max(0.0, (total - step) / decay)
        progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
        if o.schedule == "linear":
            return floor + (1 - floor) * (1 - progress)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


# rehead's MLA export (a stock DeepseekV3ForCausalLM) runs kv_a_layernorm in its linear regime: the latent's rows
# of kv_a_proj_with_mqa are scaled far below the norm's eps and the norm's weight scales them back (README
# "MLA"). An optimizer step of the usual size on those tiny weights (Adam moves each by about lr) would lift the
# latent into the norm's nonlinear range and wreck the function, so tuning leaves these two tensors as converted.
LINEARISED_LATENT = (r"\.self_attn\.kv_a_proj_with_mqa\.", r"\.self_attn\.kv_a_layernorm\.")


def select_trainable(model, mode: str, lora: bool, frozen: tuple[str, ...] = ()) -> list[str]:
    """Sets requires_grad by ``trainable``, less the parameters ``frozen`` (patterns) names; returns the names
    of the trainable parameters."""
    base = unwrapped(model)
    if mode == "new":
        patterns = getattr(type(base), "_rehead_new_parameters", None)
        if not patterns:
            raise ReheadError(
                f"trainable: new, but {type(base).__name__} has no parameters added by a conversion "
                "(a stock checkpoint); use trainable: attention or all"
            )
    elif mode == "attention":
        patterns = (r"\.self_attn\.",)
    for name, param in model.named_parameters():
        if lora:
            wanted = "lora_" in name or (mode == "new" and any(re.search(p, name) for p in patterns))
        else:
            wanted = mode == "all" or any(re.search(p, name) for p in patterns)
        param.requires_grad_(wanted and not any(re.search(p, name) for p in frozen))
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise ReheadError(f"trainable: {mode} selects no parameters of {type(base).__name__}; use trainable: all")
    return names


def _checkpoints(root: Path) -> list[Path]:
    found = [p for p in root.glob("step-*") if STEP_DIR.search(p.name) and (p / STATE).is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.search(p.name).group(1)))


def tracker_available(name: str) -> bool:
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    return {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}[name]()


def _fault(step: int) -> None:
    """Test hook: REHEAD_FAULT=kill-after-step:N kills the process (SIGKILL) once step N is done."""
    fault = os.environ.get("REHEAD_FAULT", "")
    if fault.startswith("kill-after-step:") and step == int(fault.split(":")[1]):
        os.kill(os.getpid(), signal.SIGKILL)


def check_output_dir(recipe: Recipe) -> None:
    """Refuses an output_dir that is a file, cannot be written, or overlaps the model or the teacher (the
    export replaces output_dir/model)."""
    out = Path(recipe.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ReheadError(f"output_dir {out}: is a file; give a folder (it holds checkpoints, logs and the model)")
    check_writable(out, f"output_dir {out}")
    for key in ("model", "teacher"):
        spec = getattr(recipe, key)
        if spec is not None and Path(spec).expanduser().exists():
            check_disjoint(Path(spec).expanduser(), out, f"output_dir (it overlaps {key} {spec})")


def run_identity(recipe: Recipe, processes: int) -> dict:
    """What a checkpoint must share with this run to be resumed by it: the model (its name and files'
    hashes) and the recipe's fields that decide the data a step sees and the shapes trained."""
    source = resolve(recipe.model, recipe.revision).path
    files = {p.name: sha256_file(p) for p in sorted(source.iterdir())
             if p.suffix in (".safetensors", ".bin") or p.name == "config.json"}
    return {"model": recipe.model, "model_files": files, "teacher": recipe.teacher,
            "data": recipe.data.model_dump(mode="json", include={"train", "seq_len", "streaming", "shuffle_buffer"}),
            "global_batch": recipe.train.micro_batch * recipe.train.grad_accum * processes, "seed": recipe.seed,
            "trainable": recipe.trainable, "lora": recipe.lora.model_dump(mode="json") if recipe.lora else None}


def check_belongs(checkpoint: Path, identity: dict, explicit: bool) -> None:
    """Refuses to resume a checkpoint of another run, saying which run it is."""
    recorded = json.loads((checkpoint / STATE).read_text()).get("run")
    if recorded is None and explicit:
        log.warning("%s does not record its run (an older rehead wrote it); resuming it as resume: asked", checkpoint)
        return
    if recorded == identity:
        return
    if recorded is None:
        raise ReheadError(f"{checkpoint}: an older rehead wrote it without recording its run, so it cannot be told "
                          "apart from another model's; give resume: that folder to continue it, or another output_dir")
    differ = [key for key in identity if recorded.get(key) != identity[key]]
    held = f"model {recorded.get('model')!r}" + (" (other files)" if "model_files" in differ else "")
    raise ReheadError(
        f"{checkpoint}: a checkpoint of another run ({held}, data {recorded.get('data', {}).get('train')!r}); this "
        f"recipe differs in {', '.join(differ)}. Use another output_dir, or remove {checkpoint.parent} to start over"
    )


class Trainer:
    def __init__(self, recipe: Recipe):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        check_output_dir(recipe)
        self.recipe = recipe
        self.out = Path(recipe.output_dir).expanduser()
        trackers = {"none": None, "csv": None, "tensorboard": "tensorboard", "wandb": "wandb"}[recipe.log]
        if trackers is not None and not tracker_available(trackers):
            # accelerate would only warn and log nothing
            raise ReheadError(f"log: {recipe.log} needs the {recipe.log} package: pip install {recipe.log} "
                              "(or use log: csv, which needs nothing)")
        self.csv = None
        if recipe.log == "csv":
            self.out.mkdir(parents=True, exist_ok=True)
            self.csv = CSVTracker("rehead", self.out)
            trackers = [self.csv]
        try:
            self.acc = Accelerator(
                mixed_precision="bf16" if recipe.precision == "bf16" else "no",
                # several processes and no GPU (torchrun --nproc_per_node N on CPUs): gloo over the CPU
                cpu=int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available(),
                log_with=trackers,
                project_dir=str(self.out),
            )
        except (ImportError, ValueError) as e:
            raise ReheadError(
                f"log: {recipe.log}: the tracker could not start ({e}); install it or use log: csv") from None
        set_seed(recipe.seed)
        if not log.isEnabledFor(logging.DEBUG):  # accelerate logs every file it saves at INFO
            logging.getLogger("accelerate").setLevel(logging.WARNING)
        self.device = self.acc.device
        self.ckpt_root = self.out / "checkpoints"
        self.identity = run_identity(recipe, self.acc.num_processes)

    # ---- setup -------------------------------------------------------------------------------
    def _load(self):
        r = self.recipe
        model, tokenizer, source = models.load(r.model, "fp32", "cpu", attn=r.attn_implementation, revision=r.revision)
        if tokenizer is None:
            raise ReheadError(f"model {r.model}: has no tokenizer; tuning needs one to read data.train")
        teacher = None
        if r.teacher is not None and r.loss.kd > 0:
            teacher, teacher_tok, _ = models.load(r.teacher, "bf16" if r.precision == "bf16" else "fp32", "cpu",
                                                  attn=r.attn_implementation)
            if teacher_tok is None or teacher_tok.get_vocab() != tokenizer.get_vocab():
                raise ReheadError(
                    f"teacher {r.teacher}: its tokenizer differs from the model's ({r.model}); distillation compares "
                    "the two models' distributions token by token, so both must use the same tokenizer"
                )
            if teacher.config.vocab_size != model.config.vocab_size:
                raise ReheadError(
                    f"teacher {r.teacher}: vocabulary of {teacher.config.vocab_size} tokens, the model's has "
                    f"{model.config.vocab_size}; distillation needs the same vocabulary"
                )
            teacher.requires_grad_(False)
        return model, tokenizer, source, teacher

    def _data(self, tokenizer, total_steps: int | None):
        r, world = self.recipe, self.acc.num_processes
        sampler = None
        if "self" in text.parts(r.data.train):  # the teacher's own text, sampled once by the main process
            teacher = resolve(r.teacher).path
            sampler = Sampler(teacher, AutoTokenizer.from_pretrained(teacher), str(self.device), r.seed)
        with self.acc.main_process_first():
            if r.data.streaming:
                train = StreamedBlocks(tokenizer, r.data.train, r.data.seq_len, r.seed, r.data.shuffle_buffer,
                                       r.train.micro_batch, r.train.grad_accum, world, sampler)
            else:
                per_step = r.train.micro_batch * r.train.grad_accum * world
                train = PackedBlocks(text.pack(tokenizer, r.data.train, r.data.seq_len, total_steps * per_step, sampler),
                                     r.seed, r.train.micro_batch, r.train.grad_accum, world)
        held = None
        if r.data.eval is not None:
            held = text.blocks(tokenizer, r.data.eval, r.data.eval_tokens, r.data.seq_len)
        return train, held

    def total_steps(self) -> int:
        r = self.recipe
        if r.train.max_steps is not None:
            return r.train.max_steps
        per_step = r.train.micro_batch * r.train.grad_accum * self.acc.num_processes * r.data.seq_len
        return max(1, math.ceil(r.train.max_tokens / per_step))

    # ---- checkpoints -------------------------------------------------------------------------
    def _resume_from(self) -> Path | None:
        r = self.recipe
        if r.resume == "never":
            if _checkpoints(self.ckpt_root):
                raise ReheadError(
                    f"output_dir {self.out} holds checkpoints of an earlier run and resume is never; "
                    "use resume: auto to continue it, or another output_dir"
                )
            return None
        if r.resume == "auto":
            found = _checkpoints(self.ckpt_root)
            if found:
                check_belongs(found[-1], self.identity, explicit=False)
            return found[-1] if found else None
        path = Path(r.resume).expanduser()
        if not (path / STATE).is_file():
            raise ReheadError(f"resume: {r.resume} is not a rehead tune checkpoint (no {STATE} in it)")
        check_belongs(path, self.identity, explicit=True)
        return path

    def save_checkpoint(self, step: int, state: dict) -> Path:
        final = self.ckpt_root / f"step-{step:08d}"
        tmp = self.ckpt_root / f".step-{step:08d}.partial"
        if self.acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.acc.wait_for_everyone()
        try:
            self.acc.save_state(str(tmp))
        except (OSError, RuntimeError, SafetensorError) as e:  # torch.save and safetensors' own words for a full disk
            shutil.rmtree(tmp, ignore_errors=True)
            free = shutil.disk_usage(self.ckpt_root).free / 2**20
            last = _checkpoints(self.ckpt_root)
            raise ReheadError(
                f"could not save the checkpoint of step {step} in {self.ckpt_root} ({str(e).splitlines()[0]}); "
                f"{free:.0f} MiB are free there. Free space (or lower train.keep_last) and run again: resume: auto "
                f"continues from {last[-1] if last else 'the start (no checkpoint was saved yet)'}"
            ) from None
        if self.acc.is_main_process:
            (tmp / STATE).write_text(json.dumps(state, indent=2) + "\n")
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)  # complete checkpoints only: a kill mid-save leaves a .partial that is ignored
            for old in _checkpoints(self.ckpt_root)[: -self.recipe.train.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()
        return final

    # ---- evaluation --------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, objective, held: torch.Tensor) -> float:
        objective.eval()
        rank, world = self.acc.process_index, self.acc.num_processes
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        mine = held[rank::world]
        batch = self.recipe.train.micro_batch
        for start in range(0, len(mine), batch):
            ids = mine[start : start + batch].to(self.device)
            out = objective(ids)
            total[0] += out["lm"].double() * out["tokens"]
            total[1] += out["tokens"]
        objective.train()
        total = self.acc.reduce(total, reduction="sum")
        return math.exp(total[0].item() / total[1].item())

    # ---- the run -----------------------------------------------------------------------------
    def _prepare(self, model, teacher, total: int, source=None):
        """LoRA, the trainable selection, AdamW, the schedule and the objective, prepared by accelerate."""
        r, acc = self.recipe, self.acc
        record = Provenance.load(source.path) if source is not None else None
        frozen = LINEARISED_LATENT if record is not None and record.layout == "mla" else ()
        if frozen:
            log.info("%s is rehead's MLA export: kv_a_proj_with_mqa and kv_a_layernorm stay as converted (their "
                     "norm runs linear only at the converted scale)", r.model)
        if r.train.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if r.lora is not None:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=r.lora.r, lora_alpha=r.lora.alpha, lora_dropout=r.lora.dropout,
                                                     target_modules=r.lora.target_modules, task_type="CAUSAL_LM"))
        self.trainable = select_trainable(model, r.trainable, r.lora is not None, frozen)
        self.flops = flops_per_token(unwrapped(model), r.data.seq_len)
        decay, no_decay = [], []
        for param in model.parameters():
            if param.requires_grad:
                (decay if param.ndim >= 2 else no_decay).append(param)
        fused = r.optim.fused if r.optim.fused is not None else self.device.type == "cuda"
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": r.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=r.optim.lr, betas=r.optim.betas, eps=r.optim.eps, fused=fused or None,
        )
        if r.train.compile:
            compile_layers(model)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(r, total))
        objective = Objective(model, teacher, r.loss.lm, r.loss.kd, r.loss.kd_temperature, r.loss.layout,
                              r.loss.chunk_tokens)
        objective, optimizer = acc.prepare(objective, optimizer)
        # the scheduler is stepped by hand (once per optimizer step on every process) and is not saved:
        # its state is a function of the step, and accelerate would pickle it (loaded with weights_only=False)
        if teacher is not None:
            teacher.to(self.device).eval()
        if r.log != "none":
            acc.init_trackers("rehead", config={"model": r.model, "layout": writer.layout_of(model.config) or "stock",
                                                "lr": r.optim.lr, "seq_len": r.data.seq_len})
        return objective, optimizer, scheduler

    def _resume(self, resume: Path, scheduler) -> tuple[int, int, list]:
        """Loads a checkpoint's state; returns (step, tokens seen, held-out history)."""
        try:
            self.acc.load_state(str(resume))
        except ValueError as e:  # torch: the optimizer's parameter groups differ from the checkpoint's
            raise ReheadError(
                f"{resume}: its optimizer state holds other parameters than this run trains ({len(self.trainable)} "
                f"tensors: another trainable selection, or a rehead that selects differently: {e}); remove "
                f"{resume.parent} to start over, or use another output_dir"
            ) from None
        state = json.loads((resume / STATE).read_text())
        with warnings.catch_warnings():  # stepping a scheduler without its optimizer is the point here
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(state["step"]):
                scheduler.step()
        if self.csv is not None and self.acc.is_main_process:
            self.csv.truncate(state["step"])
        log.info("resumed from %s at step %d", resume, state["step"])
        return state["step"], state["tokens"], state["history"]

    def _record(self, values: dict, at: int) -> None:
        self.acc.log(values, step=at)
        if self.acc.is_main_process:
            with (self.out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps({"step": at, **values}) + "\n")

    def _step(self, objective, optimizer, scheduler, train, step: int, last_good: Path | None) -> dict:
        """One optimizer step over the step's micro-batches; returns the logged values."""
        r, acc = self.recipe, self.acc
        started = time.perf_counter()
        micro = train.micro_batches(step, acc.process_index)
        sums = torch.zeros(3, device=self.device)
        for i, ids in enumerate(micro):
            sync = i == len(micro) - 1
            with nullcontext() if sync else acc.no_sync(objective):
                out = objective(ids.to(self.device))
                acc.backward(out["loss"] / len(micro))
            sums += torch.stack([out["loss"].detach(), out["lm"], out["kd"]]) / len(micro)
        grad_norm = acc.clip_grad_norm_(objective.parameters(), r.optim.clip) if r.optim.clip else None
        sums = acc.reduce(sums, reduction="mean")
        if grad_norm is not None:  # a sharded (FSDP2) norm is a DTensor
            norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            sums = torch.cat([sums, torch.as_tensor(norm, dtype=sums.dtype, device=sums.device).reshape(1)])
        host = sums.tolist()  # the step's one host synchronisation: the loss terms and the gradient norm together
        loss, lm, kd = host[:3]
        if not all(math.isfinite(x) for x in (loss, lm, kd)):
            where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was saved yet"
            raise ReheadError(
                f"the loss became {loss} at step {step + 1} (lm {lm}, kd {kd}); "
                f"stopped before the update; {where}. Lower optim.lr, raise optim.warmup_steps, or use precision: fp32"
            )
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens = train.per_step * r.data.seq_len
        tps = tokens / (time.perf_counter() - started)
        values = {"kind": "train", "loss": loss, "lm": lm, "kd": kd, "lr": lr,
                  "tokens_per_s": tps, "peak_memory_gb": peak_memory_bytes(self.device) / 2**30}
        if grad_norm is not None:
            values["grad_norm"] = host[3]
        if self.peak:
            values["mfu"] = tps * self.flops / (self.peak * 1e12 * acc.num_processes)
        return values

    def run(self) -> "TuneResult":
        r, acc = self.recipe, self.acc
        total = self.total_steps()
        resume = self._resume_from()
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            self._drop_partials()
            (self.out / "recipe.yaml").write_text(r.dump())
        model, tokenizer, source, teacher = self._load()
        train, held = self._data(tokenizer, total)
        objective, optimizer, scheduler = self._prepare(model, teacher, total, source)
        step, tokens_seen, history = self._resume(resume, scheduler) if resume is not None else (0, 0, [])
        self.peak = r.train.peak_tflops or detect_peak_tflops(self.device)
        log.info("tuning %s: %d trainable tensors, %d steps of %d tokens on %d process(es)",
                 r.model, len(self.trainable), total, train.per_step * r.data.seq_len, acc.num_processes)
        if step == 0 and held is not None:
            history.append({"step": 0, "eval_ppl": self.evaluate(objective, held)})
            self._record({"kind": "eval", "eval_ppl": history[-1]["eval_ppl"]}, 0)
        bar = tqdm(total=total, initial=step, disable=not acc.is_main_process, desc="tune", unit="step")
        objective.train()
        try:
            step, tokens_seen = self._loop(objective, optimizer, scheduler, train, held, history, bar, step,
                                           tokens_seen, total, last_good=resume)
        except KeyboardInterrupt:  # Ctrl-C: the complete checkpoints stay, a half-saved one goes
            if acc.is_main_process:
                self._drop_partials()
            last = _checkpoints(self.ckpt_root)
            raise Interrupted(
                f"the last complete checkpoint, {last[-1]}, is kept: run the same command to resume from it"
                if last else f"no checkpoint was saved yet (train.save_every: {r.train.save_every}); nothing "
                             "half-written was kept") from None
        finally:
            bar.close()  # before any message: the error's line starts a line of its own
        final = self.export(objective, tokenizer, source, step, tokens_seen, history)
        acc.end_training()
        return TuneResult(final, step, tokens_seen, [EvalPoint(**point) for point in history])

    def _drop_partials(self) -> None:
        """Removes half-saved checkpoints (a kill mid-save leaves its .partial folder)."""
        for partial in self.ckpt_root.glob(".step-*.partial"):
            shutil.rmtree(partial, ignore_errors=True)

    def _loop(self, objective, optimizer, scheduler, train, held, history, bar, step: int, tokens_seen: int,
              total: int, last_good: Path | None) -> tuple[int, int]:
        """The training steps from ``step`` to ``total``, each checkpointed as the recipe says."""
        r, acc = self.recipe, self.acc
        while step < total:
            values = self._step(objective, optimizer, scheduler, train, step, last_good)
            step += 1
            tokens_seen += train.per_step * r.data.seq_len
            values["tokens"] = tokens_seen
            if step % r.train.log_every == 0 or step == total:
                self._record(values, step)
            bar.set_postfix(loss=f"{values['loss']:.4f}", tok_s=f"{values['tokens_per_s']:.0f}")
            bar.update(1)
            if held is not None and ((r.train.eval_every and step % r.train.eval_every == 0) or step == total):
                history.append({"step": step, "eval_ppl": self.evaluate(objective, held)})
                self._record({"kind": "eval", "eval_ppl": history[-1]["eval_ppl"]}, step)
                if acc.is_main_process:
                    bar.write(f"step {step}: held-out perplexity {history[-1]['eval_ppl']:.3f}")
            if (r.train.save_every and step % r.train.save_every == 0) or step == total:
                last_good = self.save_checkpoint(step, {"step": step, "tokens": tokens_seen, "history": history,
                                                        "run": self.identity})
            _fault(step)
        return step, tokens_seen

    def export(self, objective, tokenizer, source, step: int, tokens: int, history: list) -> Path:
        r, acc = self.recipe, self.acc
        acc.wait_for_everyone()
        student = acc.unwrap_model(objective).student
        state = None
        if r.lora is not None:
            student = student.merge_and_unload()
        else:
            state = acc.get_state_dict(objective)  # gathered on the main process (FSDP shards included)
            if state is not None:
                state = {k.removeprefix("student."): v for k, v in state.items()}
        out = self.out / "model"
        if acc.is_main_process:
            record = Provenance.load(source.path) or Provenance(layout=writer.layout_of(student.config))
            record.tune = TuneRecord(recipe=r.model_dump(mode="json"), steps=step, tokens=tokens,
                                     eval=[EvalPoint(**point) for point in history])
            writer.save_model(student, out, record, source.path, tokenizer, state_dict=state, overwrite=True)
            log.info("wrote %s", out)
        acc.wait_for_everyone()
        return out


@dataclass(frozen=True)
class TuneResult:
    """What a tuning run made: the exported model, and its held-out perplexity at the steps it was measured."""

    model: Path
    steps: int
    tokens: int
    history: list[EvalPoint]


def tune(recipe: Recipe) -> TuneResult:
    return Trainer(recipe).run()
