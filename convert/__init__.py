"""rehead.convert: a source checkpoint rewritten into a target head layout, layer by layer."""

from pathlib import Path

from .dha import DHARewriter
from .engine import Rewriter, convert as run
from .gda import GDARewriter
from .mha import MHARewriter
from .moh import MoHRewriter
from .options import ConvertOptions

REWRITERS: dict[str, type[Rewriter]] = {"mha": MHARewriter, "moh": MoHRewriter, "dha": DHARewriter, "gda": GDARewriter}


def convert(source: str, out: str | Path, options: ConvertOptions | None = None, **values) -> Path:
    """Converts ``source`` (built-in name, folder or hub id) into ``out``; options as a model or keywords."""
    options = options or ConvertOptions(**values)
    return run(source, Path(out), options, REWRITERS[options.to](options))


__all__ = ["ConvertOptions", "REWRITERS", "convert"]
