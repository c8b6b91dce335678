"""Names that reach SQL: tables, columns and keys of the mapping file, database names, and the
column names of change events that schema evolution adds to a table.

One pattern for all of them: ``[A-Za-z_][A-Za-z0-9_]{0,62}``. Why this one:

* it is Avro's name grammar, so every column name Debezium's Avro converter writes passes;
* it is PostgreSQL's unquoted identifier without ``$`` and non-ASCII letters, and PostgreSQL cuts
  identifiers at 63 bytes (NAMEDATALEN - 1), so no source column of an ordinary schema is refused;
* such a name needs no quoting in ClickHouse at all: no backtick, quote, comment, space or
  parenthesis can be in it, so it cannot end an identifier early, whatever the quoting does.

Every such name is quoted too (`quote`), so a keyword or a name that only a bug let through is
still one identifier.
"""

from __future__ import annotations

import re

__all__ = ["IDENTIFIER", "BadIdentifier", "check_identifier", "is_identifier", "quote"]

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


class BadIdentifier(ValueError):
    """A name that may not reach SQL."""


def is_identifier(name: object) -> bool:
    return isinstance(name, str) and IDENTIFIER.fullmatch(name) is not None


def check_identifier(name: object, what: str) -> str:
    """`name` when it is an identifier; BadIdentifier naming `what` (e.g. "column", "table") otherwise."""
    if not is_identifier(name):
        shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:80] + "…"
        raise BadIdentifier(f"{what} name {shown} is not an identifier ([A-Za-z_][A-Za-z0-9_]{{0,62}})")
    return name  # type: ignore[return-value]


def quote(name: str, what: str = "identifier") -> str:
    """The checked name in backticks, for SQL."""
    return f"`{check_identifier(name, what)}`"
