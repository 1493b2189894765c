"""rehead.convert: a source checkpoint rewritten into a target head layout, layer by layer.

A layout's conversion is one module (its options model and its Rewriter, convert/rewriter.py) and
one ``register`` line; a second rewriter of a layout, chosen by its options (an output format such as
``--export deci``, GDA's ``--grow-signal``), is one module and one ``register_variant`` line.
"""

from pathlib import Path

from pydantic import ValidationError

from rehead.errors import ReheadError

from .deci import DeciRewriter
from .dha import DHARewriter
from .engine import convert as run
from .gda import GDARewriter
from .gda_growth import GDAGrowthRewriter
from .mha import MHARewriter
from .mla import MLARewriter
from .moh import MoHRewriter
from .options import ConvertOptions, options_error
from .rewriter import Rewriter

CONVERTERS: dict[str, type[Rewriter]] = {}  # --to NAME: the layout's rewriter, whose options are its flags
VARIANTS: dict[str, list[type[Rewriter]]] = {}  # --to NAME: rewriters its options may choose instead


def register(rewriter: type[Rewriter]) -> type[Rewriter]:
    """Makes ``rewriter.layout`` a target of ``convert`` and of ``rehead convert --to``, with its options as flags."""
    CONVERTERS[rewriter.layout] = rewriter
    return rewriter


def register_variant(rewriter: type[Rewriter]) -> type[Rewriter]:
    """Makes ``rewriter`` convert ``--to rewriter.layout`` where its ``chosen(options)`` says so."""
    VARIANTS.setdefault(rewriter.layout, []).append(rewriter)
    return rewriter


register(MHARewriter)
register(MoHRewriter)
register(DHARewriter)
register(GDARewriter)
register(MLARewriter)
register_variant(DeciRewriter)
register_variant(GDAGrowthRewriter)


def options_for(values: dict) -> ConvertOptions:
    """The options model of the layout ``values["to"]`` names, validated."""
    to = values.get("to")
    if to not in CONVERTERS:
        raise ReheadError(f"--to {to!r}: not a layout rehead converts to; choose from {', '.join(CONVERTERS)}")
    try:
        return CONVERTERS[to].Options(**values)
    except ValidationError as e:
        raise options_error(e) from None


def rewriter_for(options: ConvertOptions) -> type[Rewriter]:
    """The rewriter that converts with ``options``: a variant that chooses them, else the layout's own."""
    return next((v for v in VARIANTS.get(options.to, ()) if v.chosen(options)), CONVERTERS[options.to])


def convert(source: str, out: str | Path, options: ConvertOptions | None = None, **values) -> Path:
    """Converts ``source`` (built-in name, folder or hub id) into ``out``; options as a model or keywords."""
    options = options or options_for(values)
    return run(source, Path(out), options, rewriter_for(options))


__all__ = ["CONVERTERS", "VARIANTS", "ConvertOptions", "convert", "options_for", "register", "register_variant",
           "rewriter_for"]
