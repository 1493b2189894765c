"""The ``rehead`` command line: the one place that knows every stage."""

import argparse
import errno
import json
import logging
import os
import signal
import sys

from pydantic import ValidationError

from rehead.errors import ReheadError

log = logging.getLogger("rehead")


def _head_value(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a count (7) or a fraction of the heads (0.75)") from None


def _options_error(error: ValidationError) -> ReheadError:
    parts = []
    for item in error.errors():
        flag = "--" + "-".join(str(p) for p in item["loc"]).replace("_", "-")
        parts.append(f"{flag} {item.get('input')!r}: {item['msg']}")
    return ReheadError("; ".join(parts))


def cmd_inspect(args) -> int:
    from rehead.inspect import describe, format_text
    from rehead.sources import resolve

    info = describe(resolve(args.src, args.revision, args.allow_pickle).path, args.allow_pickle)
    print(json.dumps(info, indent=2) if args.json else format_text(info))
    return 0


def cmd_convert(args) -> int:
    from rehead.convert import convert
    from rehead.convert.options import ConvertOptions

    values = {k: v for k, v in vars(args).items() if k not in ("src", "out", "func", "command", "verbose")}
    try:
        options = ConvertOptions(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as e:
        raise _options_error(e) from None
    from rehead.inspect import describe, format_text

    out = convert(args.src, args.out, options)
    print(format_text(describe(out)))
    print(f"wrote {out}")
    return 0


def cmd_perplexity(args) -> int:
    from rehead import metrics, models, text

    rows = []
    for spec in args.models:
        model, tokenizer, _ = models.load(spec, args.dtype, args.device)
        if tokenizer is None:
            raise ReheadError(f"{spec}: has no tokenizer; perplexity needs one")
        blocks = text.blocks(tokenizer, args.text, args.tokens, args.seq_len)
        rows.append((spec, metrics.perplexity(model, blocks, args.batch_size)))
        del model
    width = max(len(spec) for spec, _ in rows)
    print(f"held-out perplexity on {args.text!r}, {args.tokens} tokens in blocks of {args.seq_len}")
    base = rows[0][1]
    for spec, ppl in rows:
        print(f"  {spec:<{width}}  {ppl:10.3f}  ×{ppl / base:.3f}")
    return 0


def cmd_tune(args) -> int:
    from rehead.tune import load, tune

    recipe = load(args.recipe, args.overrides)
    out = tune(recipe)
    if os.environ.get("RANK", "0") == "0":  # under accelerate launch / torchrun, one process reports
        history = json.loads((out / "rehead.json").read_text()).get("tune", {}).get("eval") or []
        if len(history) > 1:
            curve = " → ".join(f"{h['eval_ppl']:.2f}" for h in history)
            print(f"held-out perplexity on {recipe.data.eval!r} at steps {[h['step'] for h in history]}: {curve}")
        print(f"wrote {out}")
    return 0


def cmd_eval(args) -> int:
    from rehead.eval import evaluate
    from rehead.eval.report import table

    outcome = evaluate(args.candidate, args.baseline, args.tasks, args.suite, args.num_fewshot, args.limit,
                       args.batch_size, args.device, args.dtype, args.out, args.bootstrap_iters, not args.no_cache)
    print(table(outcome.rows, outcome.average_retention, *_names(outcome)))
    print(f"wrote {outcome.out}/results.json, report.md, report.png")
    if args.min_retention is not None:
        average = outcome.average_retention
        if average is None or average < args.min_retention:
            print(f"rehead eval: average retention {average if average is None else round(average, 2)}% is below "
                  f"--min-retention {args.min_retention}%", file=sys.stderr)
            return 1
    return 0


def _names(outcome) -> tuple[str, str]:
    results = json.loads((outcome.out / "results.json").read_text())
    return results["baseline"]["model"], results["candidate"]["model"]


def cmd_push(args) -> int:
    from pathlib import Path

    from rehead.hub import push

    result = push(Path(args.dir), args.repo, args.private, args.revision, args.create_pr, args.message,
                  args.dry_run, not args.no_load_check)
    if args.dry_run:
        print(result["card"])
        print(f"--dry-run: would upload {len(result['files'])} files to {args.repo}:")
        for name in result["files"]:
            print(f"  {name}")
        return 0
    print(f"pushed {len(result['files'])} files to {args.repo}: {result['url']}")
    return 0


def cmd_pipeline(args) -> int:
    from pathlib import Path

    from rehead import pipeline

    settings = pipeline.Settings(
        source=args.src, layouts=tuple(x.strip() for x in args.layouts.split(",") if x.strip()), work=Path(args.work),
        steps=args.steps, limit=args.limit or None, overwrite=args.overwrite,
    )
    result = pipeline.run(settings)
    print()
    print(pipeline.table(result))
    print(f"wrote {settings.work}/summary.md, summary.json, cards/; tuned models in {settings.work}/tune-*/model")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rehead", description="Rewrite a trained LLaMA-family checkpoint's attention into MoH, DHA or GDA heads."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)

    def source_args(p):
        p.add_argument("--revision", help="hub revision of SRC (branch, tag or commit)")
        p.add_argument("--allow-pickle", action="store_true", help="read pickled .bin weights (weights_only=True)")

    p = sub.add_parser("inspect", help="show a checkpoint's attention layout, heads and KV-cache size")
    p.add_argument("src", help="built-in name (smollm2-135m, smollm2-135m-mha), local folder or hub id")
    p.add_argument("--json", action="store_true", help="print JSON")
    source_args(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("convert", help="rewrite a checkpoint's attention into another head layout")
    p.add_argument("src", help="built-in name (smollm2-135m, smollm2-135m-mha), local folder or hub id")
    p.add_argument("out", help="output folder (written atomically)")
    p.add_argument("--to", required=True, choices=["mha", "moh", "dha", "gda"], help="target layout")
    g = p.add_argument_group("MoH")
    g.add_argument("--active-heads", type=_head_value, help="heads per token: a count or a fraction (default 0.75)")
    g.add_argument("--shared-heads", type=_head_value, help="always-on heads: a count or a fraction (default 0.5)")
    g.add_argument("--router", choices=["query-norm", "learned"], help="router (default query-norm)")
    g.add_argument("--shared", choices=["calibrated", "first"], help="which heads are shared (default calibrated)")
    g = p.add_argument_group("DHA")
    g.add_argument("--kv-budget", type=float, help="fraction of the K and V heads kept over all layers, e.g. 0.25")
    g.add_argument("--k-budget", type=float, help="fraction of the key heads kept (with --v-budget)")
    g.add_argument("--v-budget", type=float, help="fraction of the value heads kept (with --k-budget)")
    g.add_argument("--fusion", choices=["optimal", "mean"], help="closed-form fusion (default) or GQA mean-pooling")
    g.add_argument("--uniform", action="store_true", default=None,
                   help="equal groups shared by K and V in every layer: a stock grouped-query checkpoint")
    g.add_argument("--refine-steps", type=int, help="layer-local refinement steps after the closed form (default 0)")
    g.add_argument("--refine-lr", type=float, help="learning rate of the refinement (default 1e-4)")
    g.add_argument("--export", choices=["deci"],
                   help="deci: a DeciLM (nemotron-nas) checkpoint that vLLM and llama.cpp serve, K and V sharing "
                        "equal groups and a KV head count per layer")
    g = p.add_argument_group("GDA")
    g.add_argument("--ratio", type=int, help="signal heads per noise-control head")
    g.add_argument("--mode", choices=["grow", "repurpose"], help="add noise heads (default) or turn heads into them")
    g.add_argument("--subln", action="store_true", default=None,
                   help="DIFF Transformer's per-head RMSNorm and (1 - λ_init) scale (changes the function)")
    g = p.add_argument_group("calibration")
    g.add_argument("--calib", help="text: built-in name, files, or datasets id (default shakespeare)")
    g.add_argument("--calib-tokens", type=int, help="calibration tokens (default 8192)")
    g.add_argument("--calib-seq-len", type=int, help="calibration sequence length (default 512)")
    g.add_argument("--check-identity", action="store_true", default=None,
                   help="verify on calibration text that every converted layer computes the source's function "
                        "(for identity settings: MoH with every head active, DHA at budget 1, GDA grow)")
    g = p.add_argument_group("input and output")
    source_args(g)
    g.add_argument("--tokenizer", help="take the tokenizer from this checkpoint or hub id")
    g.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], help="output dtype (default: the source's)")
    g.add_argument("--device", help="where calibration runs: cpu, cuda, cuda:1 (default cpu)")
    g.add_argument("--max-shard-gb", type=float, help="largest output shard in GiB (default 2)")
    g.add_argument("--overwrite", action="store_true", default=None, help="replace OUT if it exists")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("tune", help="continue-train a converted checkpoint from a YAML recipe (also under accelerate launch)")
    p.add_argument("recipe", help="YAML recipe (see recipes/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. optim.lr=1e-5 train.max_steps=20")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("eval", help="score a candidate against its baseline with lm-evaluation-harness")
    p.add_argument("candidate", help="the converted (or tuned) model: folder, built-in name or hub id")
    p.add_argument("--baseline", help="the original (default: the source named in the candidate's rehead.json)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--tasks", help="lm-eval task names, comma-separated")
    g.add_argument("--suite", help="moh14, commonsense or offline")
    p.add_argument("--num-fewshot", type=int, help="shots for every task (default: the suite's, or 0)")
    p.add_argument("--limit", type=float, help="examples per task (a count, or a fraction below 1)")
    p.add_argument("--batch-size", default="1", help="N or auto (default 1)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 (default cpu)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--out", help="report folder (default: CANDIDATE/eval for a local candidate)")
    p.add_argument("--min-retention", type=float, metavar="PERCENT",
                   help="exit with status 1 when the average retention is below this percentage, e.g. 95")
    p.add_argument("--bootstrap-iters", type=int, default=1000, help="bootstrap samples for stderrs (default 1000)")
    p.add_argument("--no-cache", action="store_true", help="score the baseline even if cached results exist")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("push", help="check, card and upload a checkpoint to the Hugging Face Hub")
    p.add_argument("dir", help="the checkpoint folder (from rehead convert or rehead tune)")
    p.add_argument("--repo", required=True, help="ORG/NAME on the Hub")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", help="branch to push to (created if needed)")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    p.add_argument("--message", help="commit message")
    p.add_argument("--dry-run", action="store_true", help="print the card and the files; touch no network")
    p.add_argument("--no-load-check", action="store_true", help="skip loading the checkpoint before the upload")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("pipeline", help="convert, tune, eval and card each layout of a source, in one command")
    p.add_argument("src", nargs="?", default="smollm2-135m", help="source (default: the embedded smollm2-135m)")
    p.add_argument("--layouts", default="moh,dha,gda", help="comma-separated layouts (default moh,dha,gda)")
    p.add_argument("--work", default="runs/pipeline", help="working folder (default runs/pipeline)")
    p.add_argument("--steps", type=int, default=8, help="tuning steps per layout (default 8)")
    p.add_argument("--limit", type=int, default=24, help="offline-suite examples per task (0: all; default 24)")
    p.add_argument("--overwrite", action="store_true", help="redo the pipeline in an existing --work folder")
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("perplexity", help="held-out perplexity of one or more models on the same text")
    p.add_argument("models", nargs="+", help="models (the first is the reference for the ratio column)")
    p.add_argument("--text", default="shakespeare-heldout", help="text spec (default shakespeare-heldout)")
    p.add_argument("--tokens", type=int, default=16384, help="tokens scored (default 16384)")
    p.add_argument("--seq-len", type=int, default=512, help="block length (default 512)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_perplexity)
    return parser


MAIN_PID = os.getpid()


def _terminated(signum, frame):
    if os.getpid() != MAIN_PID:  # a forked worker (datasets, lm-eval) ended by its parent: end quietly
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    global MAIN_PID
    MAIN_PID = os.getpid()
    signal.signal(signal.SIGTERM, _terminated)  # a killed run cleans up like Ctrl-C
    try:
        return args.func(args)
    except ReheadError as e:
        print(f"rehead {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            where = f" writing {e.filename}" if e.filename else ""
            print(f"rehead {args.command}: error: the disk is full ({e.strerror}){where}; free space or write to "
                  "another folder and run the same command again (nothing half-written was kept)", file=sys.stderr)
            return 2
        if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            print(f"rehead {args.command}: error: {e.strerror}: {e.filename}; choose a folder you can write to",
                  file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print(f"rehead {args.command}: interrupted; nothing half-written was kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
