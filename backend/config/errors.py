"""Configuration errors: pydantic's ValidationError turned into one ``FILE: KEY.PATH: REASON`` line per problem."""

from __future__ import annotations

import os
import re
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError


class ConfigError(Exception):
    """Every problem of one configuration file; ``str()`` is one ``FILE: KEY: REASON`` line per problem.

    ``key`` and ``reason`` are those of the first problem; ``problems`` lists them all."""

    def __init__(self, file: str | os.PathLike[str], key: str = "", reason: str = "",
                 problems: list[tuple[str, str]] | None = None):
        self.file = str(file)
        self.problems = problems or [(key, reason)]
        self.key, self.reason = self.problems[0]
        super().__init__("\n".join(self.lines))

    @property
    def lines(self) -> list[str]:
        return [f"{self.file}: {k}: {r}" if k else f"{self.file}: {r}" for k, r in self.problems]


# ---------------------------------------------------------------- pydantic errors → lines
# The gateway's config module and provision/site.py carry the same few lines: the two daemons never
# import each other and the top-level packages are fixed, so there is no neutral home for them.

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")  # TOML 1.0 bare key; anything else is written quoted
_EXPECTED = {"string_type": "a string", "bool_type": "true or false", "int_type": "an integer",
             "float_type": "a number", "list_type": "a list", "tuple_type": "a list", "dict_type": "a table",
             "model_type": "a table", "model_attributes_type": "a table", "dataclass_type": "a table"}


def key_path(loc: tuple[str | int, ...]) -> str:
    """``("listener", 0, "listen")`` → ``listener[0].listen``; keys that are not bare are quoted."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part != "[key]":  # pydantic's marker for "the key itself was invalid"
            name = part if _BARE_KEY.match(part) else '"' + part.replace('"', '\\"') + '"'
            out += f".{name}" if out else name
    return out


def error_reason(err: Any) -> str:
    """One pydantic error in the words of this file's documentation."""
    kind = err["type"]
    if kind == "config":
        return err["ctx"]["reason"]
    if kind in ("value_error", "assertion_error"):
        return str(err["ctx"]["error"])
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "missing (required)"
    if kind == "literal_error":
        return f"expected one of {err['ctx']['expected']}, got {err['input']!r}"
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}, got {err['input']!r}"
    return f"{err['msg']}, got {err['input']!r}"


def problems_of(e: ValidationError) -> list[tuple[str, str]]:
    return [(key_path(err["loc"]), error_reason(err)) for err in e.errors(include_url=False)]


def each_valid(value: Any, handler, model: type[BaseModel]) -> tuple[list[tuple[int, Any]], list]:
    """Validate a list of tables; when some are wrong, keep (index, table) of the others, so that checks
    between tables run in the same pass and the file's every mistake is reported at once."""
    try:
        return list(enumerate(handler(value))), []
    except ValidationError as e:
        problems = [(err["loc"], error_reason(err)) for err in e.errors(include_url=False)]
    indexed = []
    for i, item in enumerate(value if isinstance(value, list) else []):
        try:
            indexed.append((i, model.model_validate(item)))
        except ValidationError:
            pass
    return indexed, problems


def fail(problems: list[tuple[tuple[str | int, ...], str]]) -> ValidationError:
    """Several checks that span keys, each reported at its own key path (relative to the validated value)."""
    in_file_order = sorted(problems, key=lambda p: p[0][:1] if p[0] and isinstance(p[0][0], int) else (-1,))
    return ValidationError.from_exception_data("config", [
        InitErrorDetails(type=PydanticCustomError("config", "{reason}", {"reason": reason}), loc=loc, input=None)
        for loc, reason in in_file_order])
