"""rehead's error for bad input, and the one translation of pydantic's ValidationError into its words."""

from collections.abc import Callable

from pydantic import ValidationError


class ReheadError(Exception):
    """A problem with the user's input: the message says what was wrong, the value, and what to do.

    The command line prints it without a traceback and exits with status 2.
    """


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM in a run that keeps what it finished: the message says what is kept and how to go on."""


def invalid(error: ValidationError, name: Callable[[tuple], str], unknown: str, as_typed: bool = False) -> str:
    """What a ValidationError found, one wrong value after the other ("; "), each under the ``name`` the user
    knows it by (``name(loc)``: a flag, a recipe's dotted key); ``unknown`` says what a name that is not a
    field is. ``as_typed`` gives the value after its name, as typed on the command line (``--kv-budget 1.5:
    must be in (0, 1]``); otherwise after the message (``optim.lr: must be > 0 (got -1)``). A check across
    fields (no location) names its fields itself."""
    parts = []
    for item in error.errors():
        message = item["msg"].removeprefix("Value error, ")
        if not item["loc"]:
            parts.append(message)
            continue
        key = name(item["loc"])
        if item["type"] == "missing":
            parts.append(f"{key}: missing (required)")
        elif as_typed:
            parts.append(f"{key} {item.get('input')!r}: {unknown if item['type'] == 'extra_forbidden' else message}")
        elif item["type"] == "extra_forbidden":
            parts.append(f"{key}: {unknown}")
        else:
            parts.append(f"{key}: {message} (got {item.get('input')!r})")
    return "; ".join(parts)
