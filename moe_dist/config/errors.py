"""Configuration errors: ``ConfigError`` (every ``path: message`` line at once) and the two ways
into it, pydantic's errors turned into dotted paths and a field error raised by a validator.

1. A validator that knows where a problem is (``model.dim``, not the whole ``model`` section)
   raises ``field_error(loc, message, value)``: a pydantic ``ValidationError`` whose location
   pydantic prefixes with the enclosing sections, as for any nested field.
2. ``format_pydantic_errors`` turns a ``ValidationError`` into ``path: message[, got value]``
   lines; ``ConfigError`` carries them to the CLI, which prints them and exits 2.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

# Error types whose message already says what was given (or there is nothing to show).
_NO_INPUT = ("extra_forbidden", "missing", "plugin_name")


class ConfigError(Exception):
    """Bad configuration; ``errors`` are ``path: message`` lines, all of them."""

    def __init__(self, errors: list[str], source: str | None = None) -> None:
        self.errors = errors
        self.source = source
        where = f" in {source}" if source else ""
        super().__init__(f"invalid configuration{where}:\n" + "\n".join(f"  {e}" for e in errors))


def field_error(loc: tuple[str | int, ...], kind: str, message: str, value: Any) -> ValidationError:
    """A ``ValidationError`` at ``loc`` (relative to the model being validated) for validators.

    ``kind`` is the error type; ``plugin_name`` errors are printed without the input value.
    """
    # No context given: pydantic leaves braces in the message as they are ({name: switch}).
    detail = InitErrorDetails(type=PydanticCustomError(kind, message), loc=loc, input=value)
    return ValidationError.from_exception_data("config", [detail])


def format_pydantic_errors(
    exc: ValidationError, prefix: str, unknown_key_hint: Callable[[tuple[Any, ...]], str] | None = None
) -> list[str]:
    """``path: message`` lines; ``unknown_key_hint(loc)`` may add to an unknown key's message
    (``suggest.did_you_mean``: the close known key)."""
    out = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key" + (unknown_key_hint(tuple(err["loc"])) if unknown_key_hint else "")
        elif err["type"] == "literal_error" and err["loc"] and err["loc"][-1] == "name":
            continue  # a subclass pins its own name; the registry lookup already chose the class
        if "input" in err and err["type"] not in _NO_INPUT:
            msg = f"{msg}, got {err['input']!r}"
        out.append(f"{loc}: {msg}")
    return out
