"""The ``rehead`` command line: the one place that knows every stage."""

import argparse
import difflib
import errno
import json
import logging
import os
import re
import signal
import sys
import time
import traceback
from pathlib import Path
from types import UnionType
from typing import Literal, Union, get_args, get_origin

from pydantic_core import PydanticUndefined

from rehead.convert.options import flag
from rehead.errors import Interrupted, ReheadError
from rehead.files import cache_dir, write_text
from rehead.text import HELDOUT_TEXTS

log = logging.getLogger("rehead")


def cmd_inspect(args) -> int:
    from rehead.describe import describe, format_text
    from rehead.sources import resolve

    info = describe(resolve(args.src, args.revision, args.allow_pickle).path, args.allow_pickle)
    print(json.dumps(info, indent=2) if args.json else format_text(info))
    return 0


def cmd_convert(args) -> int:
    from rehead.convert import CONVERTERS, convert, options_for
    from rehead.describe import describe, format_text

    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("src", "out", "func", "command",
                                                                                  "verbose")}
    for layout, converter in CONVERTERS.items():  # every layout's flags are parsed; only --to's may be given
        wrong = [flag(name) for name in converter.Options.own_fields() if name in given and layout != args.to
                 and name not in CONVERTERS[args.to].Options.model_fields]
        if wrong:
            raise ReheadError(f"{', '.join(wrong)}: an option of --to {layout}, not of --to {args.to}")
    out = convert(args.src, args.out, options_for(given))
    print(format_text(describe(out)))
    print(f"wrote {out}")
    return 0


def cmd_perplexity(args) -> int:
    from rehead import metrics, models, text
    from rehead.validate import check_device

    check_device(args.device)
    rows = []
    for spec in args.models:
        model, tokenizer, _ = models.load(spec, args.dtype, args.device)
        if tokenizer is None:
            raise ReheadError(f"{spec}: has no tokenizer; perplexity needs one")
        rows.append((spec, [metrics.perplexity(model, text.blocks(tokenizer, kind, args.tokens, args.seq_len),
                                               args.batch_size) for kind in args.text]))
        del model
    width = max(len(spec) for spec, _ in rows)
    columns = [max(len(kind), 17) for kind in args.text]
    print(f"held-out perplexity, {args.tokens} tokens of each text in blocks of {args.seq_len} (× the first model's)")
    print(f"  {'':<{width}}  " + "  ".join(f"{kind:>{c}}" for kind, c in zip(args.text, columns)))
    base = rows[0][1]
    for spec, values in rows:
        cells = (f"{f'{ppl:.3f} ×{ppl / b:.3f}':>{c}}" for ppl, b, c in zip(values, base, columns))
        print(f"  {spec:<{width}}  " + "  ".join(cells))
    return 0


def cmd_tune(args) -> int:
    from rehead.tune import load, tune

    recipe = load(args.recipe, args.overrides)
    result = tune(recipe)
    if os.environ.get("RANK", "0") == "0":  # under accelerate launch / torchrun, one process reports
        if len(result.history) > 1:
            curve = " → ".join(f"{h.eval_ppl:.2f}" for h in result.history)
            print(f"held-out perplexity on {recipe.data.eval!r} at steps {[h.step for h in result.history]}: {curve}")
        print(f"wrote {result.model}")
    return 0


def cmd_recipes(args) -> int:
    from rehead.tune.recipe import builtin_recipes, locate

    if args.action == "ls":
        for name, path in builtin_recipes().items():
            lines = path.read_text().splitlines()
            about = lines[0].removeprefix("#").strip() if lines and lines[0].startswith("#") else ""
            print(f"{name:<24}{about}")
        return 0
    if not args.name:
        raise ReheadError("rehead recipes cp NAME [DEST]: give the recipe to copy (rehead recipes lists them)")
    source = locate(args.name)
    dest = Path(args.dest or f"{Path(args.name).name}.yaml")
    if dest.is_dir():
        dest = dest / f"{Path(args.name).name}.yaml"
    if dest.exists() and not args.overwrite:
        raise ReheadError(f"{dest} exists; pass --overwrite to replace it, or give another DEST")
    write_text(dest, source.read_text())
    print(f"copied {args.name} to {dest}; run it with: rehead tune {dest}")
    return 0


def cmd_eval(args) -> int:
    from rehead.eval import evaluate
    from rehead.eval.report import table

    outcome = evaluate(args.candidate, args.baseline, args.tasks, args.suite, args.num_fewshot, args.limit,
                       args.batch_size, args.device, args.dtype, args.out, args.bootstrap_iters, not args.no_cache)
    print(table(outcome.rows, outcome.average_retention, outcome.baseline, outcome.candidate))
    print(f"wrote {outcome.out}/results.json, report.md, report.png")
    if args.min_retention is not None:
        average = outcome.average_retention
        if average is None or average < args.min_retention:
            print(f"rehead eval: average retention {average if average is None else round(average, 2)}% is below "
                  f"--min-retention {args.min_retention}%", file=sys.stderr)
            return 1
    return 0


def cmd_push(args) -> int:
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
    from rehead.app import pipeline

    flags = {"source": args.src, "layouts": args.layouts, "work": args.work, "tune.train.max_steps": args.steps,
             "overwrite": args.overwrite or None}
    if args.limit is not None:
        flags["eval.limit"] = args.limit or None  # 0: every example
    recipe = pipeline.load(values={key: value for key, value in flags.items() if value is not None})
    result = pipeline.run(recipe)
    print()
    print(pipeline.table(result))
    print(f"wrote {recipe.work}/summary.md, summary.json, cards/; tuned models in {recipe.work}/tune-*/model")
    return 0


def _count(least: int):
    """An argparse type: an integer of at least ``least``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: give a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value}: must be at least {least}")
        return value
    return parse


SOURCE_HELP = "built-in name (smollm2-135m, smollm2-135m-mha), local folder or hub id"


def add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="show a checkpoint's attention layout, heads and KV-cache size")
    p.add_argument("src", help=SOURCE_HELP)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--revision", help="hub revision of SRC (branch, tag or commit)")
    p.add_argument("--allow-pickle", action="store_true", help="read pickled .bin weights (weights_only=True)")
    p.set_defaults(func=cmd_inspect)


def _add_option(group, name: str, field) -> None:
    """One flag from an options field: its type, choices, help and default come from the model."""
    annotation = field.annotation
    if get_origin(annotation) in (Union, UnionType):
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    kwargs = {"dest": name, "help": field.description or ""}
    if annotation is bool:
        kwargs.update(action="store_true", default=None)
    elif get_origin(annotation) is Literal:
        kwargs["choices"] = list(get_args(annotation))
    else:
        kwargs["type"] = annotation
    if field.default not in (None, False, PydanticUndefined):
        kwargs["help"] += f" (default {field.default})"
    group.add_argument(flag(name), **kwargs)


def add_convert(sub) -> None:
    from rehead.convert import CONVERTERS, ConvertOptions

    p = sub.add_parser("convert", help="rewrite a checkpoint's attention into another head layout")
    p.add_argument("src", help=SOURCE_HELP)
    p.add_argument("out", help="output folder (written atomically)")
    p.add_argument("--to", required=True, choices=list(CONVERTERS), help="target layout")
    added = {"to"}
    for layout, converter in CONVERTERS.items():  # each layout's own options, from its options model
        fields = {k: f for k, f in converter.Options.own_fields().items() if k not in added}
        if fields:
            group = p.add_argument_group(f"--to {layout}")
            for name, field in fields.items():
                _add_option(group, name, field)
            added.update(fields)
    groups = {}
    for name, field in ConvertOptions.model_fields.items():
        if name not in added:
            title = (field.json_schema_extra or {}).get("group", "input and output")
            _add_option(groups.setdefault(title, p.add_argument_group(title)), name, field)
    p.set_defaults(func=cmd_convert)


def add_tune(sub) -> None:
    p = sub.add_parser("tune", help="continue-train a converted checkpoint from a YAML recipe (also under "
                                    "accelerate launch)")
    p.add_argument("recipe", help="a YAML recipe file, or a built-in recipe's name (rehead recipes lists them)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, e.g. optim.lr=1e-5 train.max_steps=20")
    p.override_keys = _recipe_keys
    p.set_defaults(func=cmd_tune)


def _recipe_keys() -> list[str]:
    """Every dotted key a recipe override can set (train.max_steps, optim.lr, ...)."""
    from pydantic import BaseModel

    from rehead.tune.recipe import Lora, Recipe

    def walk(model, prefix: str):
        for name, field in model.model_fields.items():
            kind = Lora if name == "lora" else field.annotation
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                yield from walk(kind, f"{prefix}{name}.")
            else:
                yield prefix + name

    return list(walk(Recipe, ""))


def add_recipes(sub) -> None:
    p = sub.add_parser("recipes", help="list the built-in recipes, or copy one out to edit")
    p.add_argument("action", nargs="?", choices=["ls", "cp"], default="ls", help="ls (default) or cp")
    p.add_argument("name", nargs="?", help="cp: the recipe (or accelerate/CONFIG) to copy")
    p.add_argument("dest", nargs="?", help="cp: where to (default ./NAME.yaml)")
    p.add_argument("--overwrite", action="store_true", help="cp: replace DEST if it exists")
    p.set_defaults(func=cmd_recipes)


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="score a candidate against its baseline with lm-evaluation-harness")
    p.add_argument("candidate", help="the converted (or tuned) model: folder, built-in name or hub id")
    p.add_argument("--baseline", help="the original (default: the source named in the candidate's rehead.json)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--tasks", help="lm-eval task names, comma-separated")
    g.add_argument("--suite", help="moh14, commonsense or offline")
    p.add_argument("--num-fewshot", type=_count(0), help="shots for every task (default: the suite's, or 0)")
    p.add_argument("--limit", type=float, help="examples per task (a count, or a fraction below 1)")
    p.add_argument("--batch-size", default="1", help="N or auto (default 1)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 (default cpu)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--out", help="report folder (default: CANDIDATE/eval for a local candidate)")
    p.add_argument("--min-retention", type=float, metavar="PERCENT",
                   help="exit with status 1 when the average retention is below this percentage, e.g. 95")
    p.add_argument("--bootstrap-iters", type=_count(0), default=1000, help="bootstrap samples for stderrs (default 1000)")
    p.add_argument("--no-cache", action="store_true", help="score the baseline even if cached results exist")
    p.set_defaults(func=cmd_eval)


def add_push(sub) -> None:
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


def add_pipeline(sub) -> None:
    p = sub.add_parser("pipeline", help="convert, tune, eval and card each layout of a source, in one command; "
                       "every default is the recipe's (rehead recipes cp pipeline/default shows it)")
    p.add_argument("src", nargs="?", help="source (default: the recipe's source, the embedded smollm2-135m)")
    p.add_argument("--layouts", help="comma-separated layouts (default: the recipe's layouts)")
    p.add_argument("--work", help="working folder (default: the recipe's work)")
    p.add_argument("--steps", type=_count(1), help="tuning steps per layout (default: the recipe's tune.train.max_steps)")
    p.add_argument("--limit", type=_count(0), help="eval examples per task (0: all; default: the recipe's eval.limit)")
    p.add_argument("--overwrite", action="store_true", help="redo the pipeline in an existing --work folder")
    p.set_defaults(func=cmd_pipeline)


def add_perplexity(sub) -> None:
    p = sub.add_parser("perplexity", help="held-out perplexity of one or more models on the same text")
    p.add_argument("models", nargs="+", help="models (the first is the reference for the ratio column)")
    p.add_argument("--text", nargs="+", default=list(HELDOUT_TEXTS), metavar="SPEC",
                   help="text specs, one column each (default: the held-out texts of three kinds, "
                        f"{' '.join(HELDOUT_TEXTS)})")
    p.add_argument("--tokens", type=_count(1), default=16384, help="tokens scored (default 16384)")
    p.add_argument("--seq-len", type=_count(2), default=512, help="block length (default 512)")
    p.add_argument("--batch-size", type=_count(1), default=4)
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_perplexity)


COMMANDS = (add_inspect, add_convert, add_tune, add_recipes, add_eval, add_push, add_pipeline, add_perplexity)


class Parser(argparse.ArgumentParser):
    """argparse with a suggestion for a mistyped choice (a command, --to, --dtype) or option."""

    def error(self, message: str):
        wrong = re.match(r"argument (.+?): invalid choice: '([^']*)' \(choose from (.*)\)$", message)
        if wrong:
            choices = re.findall(r"'([^']*)'", wrong[3])
            message += _did_you_mean(wrong[2], choices)
        super().error(message)

    def unrecognized(self, extras: list[str]):
        """Refuses arguments no option takes, with this parser's usage and the closest option's name."""
        flags = [e.split("=", 1)[0] for e in extras if e.startswith("--")]
        override_keys = getattr(self, "override_keys", None)
        if override_keys and flags:  # tune: a recipe value given as a flag
            name, keys = flags[0][2:].replace("-", "_"), override_keys()
            close = [k for k in keys if k.rsplit(".", 1)[-1] == name] or difflib.get_close_matches(name, keys, 1)
            hint = f"; recipe values are KEY=VALUE overrides{f', e.g. {close[0]}=...' if close else ''}"
        else:
            options = [o for action in self._actions for o in action.option_strings if o.startswith("--")]
            hint = "".join(_did_you_mean(flag, options) for flag in flags)
        self.error(f"unrecognized arguments: {' '.join(extras)}{hint}")


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if not close and word.startswith("--"):  # --heads for --active-heads: a word of the options' names
        close = [c for c in choices if word[2:] and word[2:] in c[2:].split("-")][:3]
    return f"; did you mean {' or '.join(close)}?" if close else ""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="rehead", description="Rewrite a trained LLaMA-family checkpoint's attention into MoH, DHA, "
                                               "GDA or MLA heads.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    parser.commands = sub.choices
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
    args, extras = parser.parse_known_args(argv)
    if extras:
        parser.commands[args.command].unrecognized(extras)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    global MAIN_PID
    MAIN_PID = os.getpid()
    previous = signal.signal(signal.SIGTERM, _terminated)  # a killed run cleans up like Ctrl-C
    try:
        return args.func(args)
    except KeyboardInterrupt as e:
        kept = str(e) if isinstance(e, Interrupted) else "nothing half-written was kept"
        print(f"rehead {args.command}: interrupted; {kept}", file=sys.stderr)
        return 130
    except Exception as e:  # every error ends in one line; an unforeseen one also leaves its traceback
        return _report(args.command, e, args.verbose)
    finally:
        # main() called in-process (tests, notebooks) must not leave its handler behind: a Python-level
        # SIGTERM handler inherited by a later fork (lm-eval's bootstrap pool) can lose the pool's
        # terminate signal in the child's start-up and hang the parent's join
        signal.signal(signal.SIGTERM, previous)


def _report(command: str, e: Exception, verbose: bool) -> int:
    """One line on stderr: exit 2 for what rehead foresees (bad input, a full or read-only disk, a missing
    file); exit 1 for anything else, with the full traceback written to a file (or shown with -v)."""
    if isinstance(e, ReheadError):
        print(f"rehead {command}: error: {e}", file=sys.stderr)
        return 2
    full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
    if full or "No space left on device (os error 28)" in str(e):  # the last: safetensors' and torch's words
        where = f" writing {e.filename}" if full and e.filename else ""
        print(f"rehead {command}: error: the disk is full ({e.strerror if full else 'No space left on device'})"
              f"{where}; free space or write to "
              "another folder and run the same command again (nothing half-written was kept)", file=sys.stderr)
        return 2
    if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        print(f"rehead {command}: error: {e.strerror}: {e.filename}; choose a folder you can write to",
              file=sys.stderr)
        return 2
    if isinstance(e, OSError) and e.errno in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR) and e.filename:
        print(f"rehead {command}: error: {e.strerror}: {e.filename}; check the path", file=sys.stderr)
        return 2
    trace = "".join(traceback.format_exception(e))
    if verbose:
        sys.stderr.write(trace)
    where = _save_traceback(command, trace)
    summary = str(e).strip().splitlines()[0] if str(e).strip() else ""
    kept = f"the traceback is in {where}" if where else "the traceback could not be saved; run with -v to see it"
    print(f"rehead {command}: unexpected error: {type(e).__name__}: {summary[:300]} ({kept}; please report it, "
          "this input is not checked yet)", file=sys.stderr)
    return 1


def _save_traceback(command: str, trace: str) -> Path | None:
    folder = cache_dir() / "errors"
    path = folder / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(trace)
    except OSError:
        return None
    return path


if __name__ == "__main__":
    sys.exit(main())
