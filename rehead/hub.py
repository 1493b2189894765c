"""``rehead push``: check that a checkpoint loads as its users will load it, write its model card, upload it.

The token comes from HF_TOKEN or the saved login (huggingface_hub.get_token) and is never printed
or logged. One push is one commit: the Hub applies a commit whole or not at all.
"""

import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import yaml

from rehead.errors import ReheadError
from rehead.layouts import BY_MODEL_TYPE, layout_config
from rehead.net import check_reachable, hub_endpoint
from rehead.provenance import Provenance

log = logging.getLogger("rehead.push")
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
IGNORED = [".*", "**/.*", "__pycache__/*", "**/__pycache__/*"]
RETRIES = 3
LOAD_CHECK = textwrap.dedent(
    """
    import importlib.abc, json, sys, torch

    class NoRehead(importlib.abc.MetaPathFinder):  # load as a user without rehead installed would
        def find_spec(self, name, path=None, target=None):
            if name == "rehead" or name.startswith("rehead."):
                raise ImportError("rehead is not installed here")

    sys.meta_path.insert(0, NoRehead())
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
    ids = tokenizer("The", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    print("REHEAD_LOAD_CHECK", json.dumps({"class": type(model).__name__, "new_tokens": out.shape[1] - ids.shape[1]}))
    """
)


def check_folder(folder: Path) -> dict:
    """The folder's config; refuses anything that is not a transformers (or rehead) checkpoint."""
    if not folder.is_dir():
        raise ReheadError(f"{folder}: no such folder")
    if not (folder / "config.json").is_file():
        raise ReheadError(f"{folder}: not a checkpoint (no config.json); give the folder rehead convert or tune wrote")
    config = json.loads((folder / "config.json").read_text())
    weights = list(folder.glob("*.safetensors")) + list(folder.glob("*.bin"))
    if "model_type" not in config or not weights:
        raise ReheadError(f"{folder}: not a transformers checkpoint (config.json without model_type, or no weights)")
    return config


def load_check(folder: Path, timeout: float = 1800) -> dict:
    """Loads ``folder`` with trust_remote_code in a fresh interpreter where rehead cannot be imported, and
    generates a few tokens."""
    result = subprocess.run([sys.executable, "-c", LOAD_CHECK, str(folder.resolve())], capture_output=True,
                            text=True, timeout=timeout, env={**_clean_env(), "HF_HUB_OFFLINE": "1"})
    if result.returncode != 0:
        tail = result.stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise ReheadError(f"{folder}: does not load as its users would (trust_remote_code, no rehead): {tail[0]}")
    lines = [line.partition("REHEAD_LOAD_CHECK ")[2] for line in result.stdout.splitlines() if "REHEAD_LOAD_CHECK " in line]
    if not lines:
        raise ReheadError(f"{folder}: the load check printed no result; its output ended with: {result.stdout[-300:]!r}")
    return json.loads(lines[-1])


def _clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}


# ---- the model card ----------------------------------------------------------------------------
def _savings(folder: Path, config: dict, record: Provenance | None) -> list[str]:
    from rehead.describe import describe

    try:
        info = describe(folder)
    except Exception:  # the card describes what it can
        info = None
    lines = []
    before = record.source.kv_cache_bytes_per_token_bf16 if record and record.source else None
    if info and before:
        after = info["kv_cache_bytes_per_token_bf16"]
        lines.append(f"- KV cache: {after:,} bytes per token in bf16, {100 * after / before:.1f}% of the source's "
                     f"{before:,}")
    layout = layout_config(config)
    if layout is not None:
        lines += layout.card_lines()
    if info:
        lines.append(f"- Parameters: {info['parameters']:,}")
    return lines


# conversion options that say how the input was read or the output stored, not what the model is
NOT_ON_CARD = ("revision", "tokenizer", "allow_pickle", "max_shard_gb", "check_identity", "overwrite", "device")


def _card_options(options: dict) -> dict:
    return {k: v for k, v in options.items() if v is not None and k not in NOT_ON_CARD}


def card(folder: Path, repo: str | None = None):
    """The model card (huggingface_hub.ModelCard) of a rehead checkpoint or a transformers one."""
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    config = check_folder(folder)
    record = Provenance.load(folder)
    layout = BY_MODEL_TYPE.get(config.get("model_type"))
    layout_name = layout.name if layout else (record.layout if record and record.layout else config.get("model_type"))
    source = record.source if record and record.source else None
    tuned = record is not None and record.tune is not None
    tags = ["rehead", layout_name] + (["tuned"] if tuned else [])
    data = ModelCardData(
        base_model=source.hub_id if source else None,
        base_model_relation="finetune" if source and source.hub_id else None,
        library_name="transformers",
        license=source.license if source else None,
        tags=tags,
        pipeline_tag="text-generation",
    )
    name = repo or folder.name
    remote = layout is not None
    base = f"[{source.hub_id}](https://huggingface.co/{source.hub_id})" if source and source.hub_id else \
        f"`{source.id if source else 'unknown'}`"
    parts = [f"# {name}", ""]
    summary = layout.config_class.layout_summary if layout else f"the `{layout_name}` layout"
    parts += [f"{base} rewritten by rehead into {summary}"
              + (", then continue-tuned." if tuned else ".") if record else f"A `{layout_name}` checkpoint.", ""]
    savings = _savings(folder, config, record)
    if savings:
        parts += ["## What the layout saves", "", *savings, ""]
    if record and record.options:
        parts += ["## Conversion", "", "```yaml", yaml.safe_dump(_card_options(record.options), sort_keys=False).strip(),
                  "```", ""]
        if record.calibration:
            c = record.calibration
            parts += [f"Calibrated on {c.tokens:,} tokens of `{c.text}` (sha256 {c.sha256[:12]}…).", ""]
    if tuned:
        t = record.tune
        parts += ["## Continue-tuning", "", f"{t.steps} steps, {t.tokens:,} tokens. Recipe:", "", "```yaml",
                  yaml.safe_dump(t.recipe, sort_keys=False).strip(), "```", ""]
        if t.eval:
            curve = ", ".join(f"step {e.step}: {e.eval_ppl:.2f}" for e in t.eval)
            parts += [f"Held-out perplexity during tuning: {curve}.", ""]
    report = folder / "eval" / "report.md"
    if report.is_file():
        parts += ["## Evaluation (rehead eval, lm-evaluation-harness)", "", report.read_text().strip(), ""]
    snippet = [
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{name}"' + (", trust_remote_code=True)" if remote else ")"),
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
        'ids = tokenizer("The attention heads", return_tensors="pt").input_ids',
        "print(tokenizer.decode(model.generate(ids, max_new_tokens=20)[0]))",
    ]
    parts += ["## Usage", "", "```python", *snippet, "```", ""]
    if remote:
        parts += ["The layout's modeling code (`configuration_*.py`, `modeling_*.py`) travels with the weights and "
                  "imports only torch and transformers; with `pip install rehead` no remote code is needed.", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(parts))


# ---- the upload --------------------------------------------------------------------------------
def files_to_upload(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not any(
        part.startswith(".") or part == "__pycache__" for part in p.relative_to(folder).parts))


def _http_error(e, repo: str, reached: str) -> ReheadError:
    status = getattr(getattr(e, "response", None), "status_code", None)
    if status == 401:
        return ReheadError(f"the Hub refused the token (401 Unauthorized) for {repo}: it is invalid or expired; "
                           f"set HF_TOKEN to a write token or run `hf auth login`. {reached}")
    if status == 403:
        return ReheadError(f"the token may not write to {repo} (403 Forbidden): use a token with write access to "
                           f"{repo.split('/')[0]}, or another --repo. {reached}")
    retried = " (after retries)" if status is not None and status >= 500 else ""
    return ReheadError(f"the Hub answered {status or type(e).__name__}{retried} for {repo}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}. {reached}")


def push(folder: Path, repo: str, private: bool = False, revision: str | None = None, create_pr: bool = False,
         message: str | None = None, dry_run: bool = False, check_load: bool = True) -> dict:
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    folder = Path(folder)
    if not REPO_ID.match(repo):
        raise ReheadError(f"--repo {repo!r}: give ORG/NAME (letters, digits, '-', '_', '.'), e.g. my-org/llama-moh")
    check_folder(folder)
    model_card = card(folder, repo)
    files = [p.relative_to(folder).as_posix() for p in files_to_upload(folder) if p.name != "README.md"]
    files = sorted(files + ["README.md"])
    if dry_run:
        return {"repo": repo, "files": files, "card": str(model_card), "dry_run": True}
    token = get_token()
    if not token:
        raise ReheadError("no Hugging Face token: set HF_TOKEN to a write token, or run `hf auth login`")
    endpoint = hub_endpoint()
    check_reachable(endpoint, f"pushing to {repo} needs the Hub",
                    "Check the network (or HF_ENDPOINT); nothing was uploaded", timeout=5.0)
    if check_load:
        report = load_check(folder)
        log.info("load check: %s generated %d tokens without rehead", report["class"], report["new_tokens"])
    model_card.save(folder / "README.md")

    api = HfApi(endpoint=endpoint, token=token)
    state = {"repo_created": False}

    def attempt(what: str, call, retries: int = RETRIES):
        for tries in range(1, retries + 1):
            try:
                return call()
            except HfHubHTTPError as e:
                status = getattr(getattr(e, "response", None), "status_code", None)
                if status is not None and (status >= 500 or status == 429) and tries < retries:
                    log.warning("%s: the Hub answered %s; retrying (%d of %d)", what, status, tries, retries - 1)
                    time.sleep(2 ** (tries - 1))
                    continue
                reached = ("The repo exists; nothing was committed to it: run the same command again to finish."
                           if state["repo_created"] else "Nothing reached the Hub.")
                raise _http_error(e, repo, reached) from None

    attempt("create repo", lambda: api.create_repo(repo, private=private, exist_ok=True, repo_type="model"))
    state["repo_created"] = True
    if revision:
        attempt("create branch", lambda: api.create_branch(repo, branch=revision, exist_ok=True))
    commit = attempt("upload", lambda: api.upload_folder(
        repo_id=repo, folder_path=folder, revision=revision, create_pr=create_pr, ignore_patterns=IGNORED,
        commit_message=message or f"rehead push: {folder.name}",
    ), retries=1)  # huggingface_hub itself retries a commit's 5xx answers (5 times, backing off)
    return {"repo": repo, "files": files, "commit": getattr(commit, "oid", None),
            "url": getattr(commit, "pr_url", None) or getattr(commit, "commit_url", None) or str(commit)}
