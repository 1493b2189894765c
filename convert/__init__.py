"""rehead.convert: a source checkpoint rewritten into a target head layout, layer by layer.

A layout's conversion is one module (its options model and its Rewriter) and one ``register`` line.
"""

from pathlib import Path

from pydantic import ValidationError

from rehead.errors import ReheadError

from .dha import DHARewriter
from .engine import Rewriter
from .engine import convert as run
from .gda import GDARewriter
from .mha import MHARewriter
from .moh import MoHRewriter
from .options import ConvertOptions, options_error

CONVERTERS: dict[str, type[Rewriter]] = {}


def register(rewriter: type[Rewriter]) -> type[Rewriter]:
    """Makes ``rewriter.layout`` a target of ``convert`` and of ``rehead convert --to``, with its options as flags."""
    CONVERTERS[rewriter.layout] = rewriter
    return rewriter


register(MHARewriter)
register(MoHRewriter)
register(DHARewriter)
register(GDARewriter)


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
    return run(source, Path(out), options, CONVERTERS[options.to](options))


__all__ = ["CONVERTERS", "ConvertOptions", "convert", "options_for", "register"]
