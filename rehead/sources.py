"""Where a checkpoint comes from: a built-in name, a local folder, or a Hugging Face Hub id."""

import re
from dataclasses import dataclass
from pathlib import Path

from rehead import builtin
from rehead.errors import ReheadError
from rehead.formats import describe_file

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "LICENSE*"]


@dataclass(frozen=True)
class Source:
    spec: str  # what the user wrote
    path: Path  # the local folder
    revision: str | None = None  # the hub commit, when it came from the hub

    @property
    def id(self) -> str:
        """The source's name as recorded in provenance: the hub id, built-in name, or absolute folder."""
        return self.spec if not Path(self.spec).expanduser().exists() else str(self.path)


def resolve(spec: str, revision: str | None = None, allow_pickle: bool = False) -> Source:
    local = Path(spec).expanduser()
    if revision is not None and (spec in builtin.MODELS or local.exists()):
        kind = "a built-in model" if spec in builtin.MODELS else "a local folder"
        raise ReheadError(f"revision {revision!r}: {spec!r} is {kind}, which has no revisions; a revision picks a "
                          "branch, tag or commit of a Hub id: drop it, or give the Hub id")
    if spec in builtin.MODELS:
        return Source(spec, builtin.model_path(spec))
    if local.exists():
        if not local.is_dir():
            raise ReheadError(f"{spec}: is " + (describe_file(local) or "a file; give the checkpoint's folder"))
        return Source(spec, local.resolve())
    if not HUB_ID.match(spec):
        raise ReheadError(
            f"{spec!r}: not a built-in model ({', '.join(builtin.MODELS)}), an existing folder, "
            "or a Hub id of the form ORG/NAME"
        )
    return _download(spec, revision, allow_pickle)


def _download(repo_id: str, revision: str | None, allow_pickle: bool) -> Source:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    patterns = HUB_PATTERNS + (["*.bin"] if allow_pickle else [])
    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
    except GatedRepoError:
        raise ReheadError(f"{repo_id}: gated; accept its licence on the Hub and log in (hf auth login)") from None
    except RepositoryNotFoundError:
        raise ReheadError(f"{repo_id}: no such model on the Hub, or it is private and you are not logged in") from None
    except RevisionNotFoundError:
        raise ReheadError(f"{repo_id}: no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        raise ReheadError(
            f"{repo_id}: not in the local Hub cache and the Hub cannot be reached (offline?); "
            "download it where the Hub is reachable, or pass a local folder"
        ) from None
    return Source(repo_id, Path(path), Path(path).name)  # the snapshot folder is named by its commit


def card_metadata(folder: Path, source_id: str) -> dict:
    """The source's licence and Hub id, from its model card's front matter where it has one."""
    from huggingface_hub import ModelCard

    license, hub_id = None, (source_id if HUB_ID.match(source_id) and not Path(source_id).exists() else None)
    readme = Path(folder) / "README.md"
    if readme.is_file():
        try:
            data = ModelCard.load(readme).data
            license = data.get("license")
            hub_id = hub_id or data.get("base_model")
        except Exception:  # a README without (valid) front matter: nothing known
            pass
    if isinstance(hub_id, list):
        hub_id = hub_id[0] if hub_id else None
    return {"license": license, "hub_id": hub_id}
