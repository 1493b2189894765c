"""Files that appear whole or not at all, and the cache folder.

Every output of rehead is written beside its final place and renamed when complete: an
interrupted or failed run leaves the old file or folder (or none), never a half-written one.
"""

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rehead.errors import ReheadError


def cache_dir() -> Path:
    """Where downloads, built-in models, texts and eval results are kept: ``$REHEAD_CACHE`` or ~/.cache/rehead."""
    return Path(os.environ.get("REHEAD_CACHE") or "~/.cache/rehead").expanduser()


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yields a temporary path beside ``path`` that replaces ``path`` when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")  # the suffix tells writers the format
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, content: str) -> None:
    """Writes ``content`` to ``path`` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(content)


def check_output(out: Path, overwrite: bool) -> None:
    """Refuses an output folder that exists (without ``overwrite``), is a file, or cannot be created."""
    if out.exists() and not overwrite:
        raise ReheadError(f"{out} exists; pass --overwrite to replace it, or choose another output folder")
    if out.exists() and not out.is_dir():
        raise ReheadError(f"{out} exists and is not a folder; remove it or choose another output folder")
    check_writable(out.parent, f"{out}")


def check_writable(folder: Path, what: str) -> None:
    """Refuses ``what`` when its nearest existing folder is a file or not writable (checked before any work)."""
    folder = Path(folder).absolute()
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise ReheadError(f"{what}: {folder} is a file, not a folder; choose another place")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ReheadError(f"{what}: {folder} is not writable; choose a folder you can write to")


def check_disjoint(source: Path, out: Path, what: str = "the output folder") -> None:
    """Refuses an output that is, holds or lies inside ``source``: replacing it would delete the source."""
    source, out = Path(source).resolve(), Path(out).expanduser().resolve()
    if out == source:
        raise ReheadError(f"{out}: {what} is the source; choose another one")
    if source.is_relative_to(out):
        raise ReheadError(f"{out}: {what} contains the source {source}; writing it would delete the source. "
                          "Choose a folder outside the source's")
    if out.is_relative_to(source):
        raise ReheadError(f"{out}: {what} lies inside the source {source}; choose a folder outside it")


def output_mode() -> int:
    """The mode a new folder gets under the process's umask (mkdtemp's own 0700 would hide it from other users)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask


@contextmanager
def atomic_output(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary folder beside ``out`` that becomes ``out`` only when the block succeeds.

    A failure (or Ctrl-C) removes the temporary folder and leaves ``out`` as it was.
    """
    out = Path(out)
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    tmp.chmod(output_mode())
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_orphans(out: Path) -> None:
    """Removes the temporary folders of earlier runs on ``out`` whose process is gone (killed with SIGKILL)."""
    for folder in out.parent.glob(f".{out.name}.partial-*-*"):
        pid = folder.name.removeprefix(f".{out.name}.partial-").split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
