"""ClickHouse column types as both lanes read them: the Python lane converts a decoded value to
what clickhouse-connect inserts into the type (`converter_for`), the ClickHouse lane
(consumer.sink.server_plan) compiles the same conversion into SQL. Both take a type's wrappers,
its Decimal precision and scale and DateTime64's range from here, so they cannot read a type
differently.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from decimal import Decimal
from typing import Any

__all__ = [
    "DATETIME64_MAX",
    "DATETIME64_MAX_US",
    "DATETIME64_MIN",
    "DATETIME64_MIN_US",
    "EPOCH",
    "Converter",
    "converter_for",
    "decimal_parameters",
    "quote_identifier",
    "sql_string",
    "unwrap",
]

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
# DateTime64's representable range in ClickHouse, and the same as epoch microseconds.
DATETIME64_MIN = dt.datetime(1900, 1, 1, tzinfo=dt.UTC)
DATETIME64_MAX = dt.datetime(2299, 12, 31, 23, 59, 59, 999999, tzinfo=dt.UTC)
_MICROSECOND = dt.timedelta(microseconds=1)
DATETIME64_MIN_US = (DATETIME64_MIN - EPOCH) // _MICROSECOND
DATETIME64_MAX_US = (DATETIME64_MAX - EPOCH) // _MICROSECOND

_WRAPPERS = re.compile(r"^(LowCardinality|Nullable)\((.*)\)$")
_DECIMAL = re.compile(r"Decimal\((\d+),\s*(\d+)\)")


def unwrap(clickhouse_type: str) -> tuple[str, bool]:
    """The type inside its LowCardinality/Nullable wrappers, and whether one of them is Nullable."""
    inner, nullable = clickhouse_type.strip(), False
    while match := _WRAPPERS.match(inner):
        nullable = nullable or match.group(1) == "Nullable"
        inner = match.group(2).strip()
    return inner, nullable


def decimal_parameters(inner: str) -> tuple[int, int] | None:
    """(precision, scale) of an unwrapped ``Decimal(P, S)`` type; None for any other type."""
    match = _DECIMAL.fullmatch(inner)
    return (int(match.group(1)), int(match.group(2))) if match else None


def quote_identifier(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def sql_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


# -- the Python lane's conversions ---------------------------------------------------------------

Converter = Callable[[Any], Any]


def converter_for(clickhouse_type: str) -> tuple[Converter, Any]:
    """A converter from a decoded value to what clickhouse-connect inserts into that type,
    and the type's zero value (filler for the non-key columns of a delete marker)."""
    inner, nullable = unwrap(clickhouse_type)
    base, zero = _base_converter(inner)
    if not nullable:
        return base, zero
    return (lambda value: None if value is None else base(value)), None


def _base_converter(inner: str) -> tuple[Converter, Any]:
    if decimal := decimal_parameters(inner):
        precision, scale = decimal
        return _decimal_converter(scale=scale, precision=precision), Decimal(0)
    if inner.startswith("DateTime"):
        return _to_datetime, EPOCH
    if inner in ("Date", "Date32"):
        return _to_date, EPOCH.date()
    if re.fullmatch(r"U?Int\d+", inner):
        return _to_int, 0
    if inner.startswith("Float"):
        return _to_float, 0.0
    if inner == "Bool":
        return _to_bool, 0
    if inner in ("String", "UUID") or inner.startswith("FixedString"):
        return _to_str, ""
    raise ValueError(f"unsupported column type {inner!r} in the mapping")


def _to_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(f"expected an integer, got {value!r}")
    return int(value)


def _decimal_converter(scale: int, precision: int) -> Converter:
    quantum = Decimal(1).scaleb(-scale)
    limit = Decimal(10) ** (precision - scale)

    def convert(value: Any) -> Decimal:
        if isinstance(value, float):
            raise TypeError(f"float {value!r} for an exact decimal column")
        number = value if isinstance(value, Decimal) else Decimal(str(value))
        exact = number.quantize(quantum)
        if exact != number:
            raise ValueError(f"{number} has more than {scale} decimal places")
        if abs(exact) >= limit:
            raise ValueError(f"{number} exceeds Decimal({precision}, {scale})")
        return exact

    return convert


def _to_datetime(value: Any) -> dt.datetime:
    if isinstance(value, dt.datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    elif isinstance(value, str):
        moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        moment = moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)
    elif isinstance(value, int) and not isinstance(value, bool):
        moment = EPOCH + dt.timedelta(microseconds=value)
    else:
        raise TypeError(f"expected a timestamp, got {value!r}")
    moment = moment.astimezone(dt.UTC)
    if not DATETIME64_MIN <= moment <= DATETIME64_MAX:
        raise OverflowError(f"{moment.isoformat()} is outside ClickHouse DateTime64's range")
    return moment


def _to_date(value: Any) -> dt.date:
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).date()
    if isinstance(value, dt.date):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return dt.date(1970, 1, 1) + dt.timedelta(days=value)
    return dt.date.fromisoformat(str(value))


def _to_str(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


def _to_float(value: Any) -> float:
    return float(value)


def _to_bool(value: Any) -> int:
    return int(bool(value))
