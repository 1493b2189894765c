"""rehead.convert: a source checkpoint rewritten into a target head layout, layer by layer.

A layout's conversion is one module (its options model and its Rewriter) and one ``register`` line;
an output format other than the layout's own (``--export deci``) is one module and one
``register_export`` line.
"""

from pathlib import Path

from pydantic import ValidationError

from rehead.errors import ReheadError

from .deci import DeciRewriter
from .dha import DHARewriter
from .engine import Rewriter
from .engine import convert as run
from .gda import GDARewriter
from .mha import MHARewriter
from .mla import MLARewriter
from .moh import MoHRewriter
from .options import ConvertOptions, options_error

CONVERTERS: dict[str, type[Rewriter]] = {}
EXPORTS: dict[str, type[Rewriter]] = {}  # --export NAME: the rewriter that writes that format


def register(rewriter: type[Rewriter]) -> type[Rewriter]:
    """Makes ``rewriter.layout`` a target of ``convert`` and of ``rehead convert --to``, with its options as flags."""
    CONVERTERS[rewriter.layout] = rewriter
    return rewriter


register(MHARewriter)
register(MoHRewriter)
register(DHARewriter)
register(GDARewriter)
register(MLARewriter)


def register_export(rewriter: type[Rewriter]) -> type[Rewriter]:
    """Makes ``rewriter.export`` a value of ``--export`` for ``--to rewriter.layout``."""
    EXPORTS[rewriter.export] = rewriter
    return rewriter


register_export(DeciRewriter)


def options_for(values: dict) -> ConvertOptions:
    """The options model of the layout ``values["to"]`` names, validated."""
    to = values.get("to")
    if to not in CONVERTERS:
        raise ReheadError(f"--to {to!r}: not a layout rehead converts to; choose from {', '.join(CONVERTERS)}")
    try:
        return CONVERTERS[to].Options(**values)
    except ValidationError as e:
        raise options_error(e) from None


def convert(source: str, out: str | Path, options: ConvertOptions | None = None, **values) -> Path:
    """Converts ``source`` (built-in name, folder or hub id) into ``out``; options as a model or keywords."""
    options = options or options_for(values)
    export = getattr(options, "export", None)
    rewriter = EXPORTS[export] if export is not None else CONVERTERS[options.to]
    if rewriter.layout != options.to:
        raise ReheadError(f"--export {export} writes a {rewriter.layout.upper()} conversion: use --to "
                          f"{rewriter.layout}, or drop --export for --to {options.to}")
    return run(source, Path(out), options, rewriter(options))


__all__ = ["CONVERTERS", "EXPORTS", "ConvertOptions", "convert", "options_for", "register", "register_export"]
