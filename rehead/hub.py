"""``rehead push``: check that a checkpoint loads as its users will load it (rehead.load_check), write its
model card (rehead.card), upload it.

The token comes from HF_TOKEN or the saved login (huggingface_hub.get_token) and is never printed
or logged. One push is one commit: the Hub applies a commit whole or not at all.
"""

import logging
import re
import time
from pathlib import Path

from rehead.card import card, check_folder
from rehead.errors import ReheadError
from rehead.load_check import load_check
from rehead.net import check_reachable, hub_endpoint

log = logging.getLogger("rehead.push")
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
IGNORED = [".*", "**/.*", "__pycache__/*", "**/__pycache__/*"]
RETRIES = 3


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
    readme = folder / "README.md"
    kept = readme.read_bytes() if readme.is_file() else None
    model_card.save(readme)
    try:
        commit = _upload(HfApi(endpoint=endpoint, token=token), folder, repo, private, revision, create_pr, message)
    except BaseException:  # a refused (or interrupted) push leaves the folder as it was
        readme.write_bytes(kept) if kept is not None else readme.unlink(missing_ok=True)
        raise
    return {"repo": repo, "files": files, "commit": getattr(commit, "oid", None),
            "url": getattr(commit, "pr_url", None) or getattr(commit, "commit_url", None) or str(commit)}


def _upload(api, folder: Path, repo: str, private: bool, revision: str | None, create_pr: bool, message: str | None):
    """Creates the repo (and branch) and commits the folder, retrying what the Hub answers with 5xx or 429."""
    from huggingface_hub.errors import HfHubHTTPError

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
    return attempt("upload", lambda: api.upload_folder(
        repo_id=repo, folder_path=folder, revision=revision, create_pr=create_pr, ignore_patterns=IGNORED,
        commit_message=message or f"rehead push: {folder.name}",
    ), retries=1)  # huggingface_hub itself retries a commit's 5xx answers (5 times, backing off)
