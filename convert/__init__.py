"""rehead.convert: a source checkpoint rewritten into a target head layout, layer by layer."""

from pathlib import Path

from rehead.errors import ReheadError

from .deci import DeciRewriter
from .dha import DHARewriter
from .engine import Rewriter, convert as run
from .gda import GDARewriter
from .mha import MHARewriter
from .moh import MoHRewriter
from .options import ConvertOptions

REWRITERS: dict[str, type[Rewriter]] = {"mha": MHARewriter, "moh": MoHRewriter, "dha": DHARewriter, "gda": GDARewriter}
# output formats other than the layout's own: --export NAME, and the rewriter that writes it
EXPORTS: dict[str, type[Rewriter]] = {"deci": DeciRewriter}


def convert(source: str, out: str | Path, options: ConvertOptions | None = None, **values) -> Path:
    """Converts ``source`` (built-in name, folder or hub id) into ``out``; options as a model or keywords."""
    options = options or ConvertOptions(**values)
    rewriter = REWRITERS[options.to]
    if options.export is not None:
        rewriter = EXPORTS[options.export]
        if rewriter.layout != options.to:
            raise ReheadError(f"--export {options.export} writes a {rewriter.layout.upper()} conversion: use "
                              f"--to {rewriter.layout}, or drop --export for --to {options.to}")
    return run(source, Path(out), options, rewriter(options))


__all__ = ["ConvertOptions", "EXPORTS", "REWRITERS", "convert"]
