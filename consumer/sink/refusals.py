"""Which insert failures are about the data (refused, and refused again whatever the retry) and
which are about ClickHouse (unreachable, busy, timing out: retry). A data refusal is bisected by
the engine to the messages that cause it; anything else backs off and retries, since
dead-lettering good changes because a server was briefly down would lose them from the tables."""

from __future__ import annotations

import struct

from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

# ClickHouse's own names for "these values do not fit": the same rows are refused on every retry.
DATA_ERRORS = frozenset(
    {
        "TYPE_MISMATCH",
        "ARGUMENT_OUT_OF_BOUND",
        "CANNOT_CONVERT_TYPE",
        "INCORRECT_DATA",
        "VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE",
        "DECIMAL_OVERFLOW",
        "CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN",
        "TOO_LARGE_STRING_SIZE",
        "FUNCTION_THROW_IF_VALUE_IS_NON_ZERO",
        "CANNOT_READ_ALL_DATA",
        "ILLEGAL_TYPE_OF_ARGUMENT",
        "INCORRECT_NUMBER_OF_COLUMNS",
    }
)


def refused_for_data(exc: BaseException) -> bool:
    # The client serializes the rows before sending them: a value that does not fit its column's
    # wire type (an integer beyond Int64, a string with a lone surrogate, an int for a String
    # column: AttributeError) fails here, nothing sent.
    if isinstance(exc, ValueError | TypeError | OverflowError | AttributeError | struct.error):
        return True
    if isinstance(exc, DatabaseError) and not isinstance(exc, OperationalError):
        name = getattr(exc, "name", None) or ""
        return name in DATA_ERRORS or name.startswith("CANNOT_PARSE")
    return False


def first_line(exc: BaseException, limit: int = 500) -> str:
    """An error's first line, for a log line or a DLQ header: ClickHouse's answers run on with
    the whole query and a stack trace."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]
