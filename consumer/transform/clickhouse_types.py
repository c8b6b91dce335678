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
from decimal import Context, Decimal
from typing import Any

__all__ = [
    "DATETIME64_MAX",
    "DATETIME64_MAX_US",
    "DATETIME64_MIN",
    "DATETIME64_MIN_US",
    "EPOCH",
    "Converter",
    "OutOfRange",
    "canonical_type",
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
# DateTime (32-bit seconds), Date (16-bit days) and Date32.
DATETIME_MAX = dt.datetime(2106, 2, 7, 6, 28, 15, tzinfo=dt.UTC)
DATE_RANGE = (dt.date(1970, 1, 1), dt.date(2149, 6, 6))
DATE32_RANGE = (dt.date(1900, 1, 1), dt.date(2299, 12, 31))
DECIMAL_MAX_PRECISION = 76  # Decimal256

_WRAPPERS = re.compile(r"^(LowCardinality|Nullable)\((.*)\)$")
_DECIMAL = re.compile(r"Decimal\((\d+),\s*(\d+)\)")

# -- the types a mapping may name -----------------------------------------------------------------

_INTEGERS = {f"{sign}Int{bits}": bits for bits in (8, 16, 32, 64, 128, 256) for sign in ("", "U")}
_PLAIN = frozenset({"Bool", "String", "UUID", "Float32", "Float64", "Date", "Date32", "DateTime", *_INTEGERS})
_TIMEZONE = r"'([A-Za-z][A-Za-z0-9_+\-/]{0,63})'"
_SHAPES = {
    "Decimal": re.compile(r"Decimal\(\s*(\d{1,2})\s*,\s*(\d{1,2})\s*\)"),
    "DateTime64": re.compile(rf"DateTime64\(\s*(\d)\s*(?:,\s*{_TIMEZONE}\s*)?\)"),
    "DateTime": re.compile(rf"DateTime\(\s*{_TIMEZONE}\s*\)"),
    "FixedString": re.compile(r"FixedString\(\s*(\d{1,5})\s*\)"),
}


def canonical_type(text: str) -> str:
    """A column type of the allow-list, written the one way both lanes and the DDL use; ValueError
    for anything else. Allowed: [LowCardinality(] [Nullable(] a scalar [)] [)], the scalars being
    Bool, String, UUID, FixedString(N), Float32/64, (U)Int8…256, Date, Date32, DateTime[('tz')],
    DateTime64(p[, 'tz']) and Decimal(P, S). Each is read into its parts and written anew, so
    nothing but those parts reaches SQL."""
    if not isinstance(text, str):
        raise ValueError(f"a column type is a string, not {type(text).__name__}")
    inner = text.strip()
    wrappers = []
    for wrapper in ("LowCardinality", "Nullable"):
        if inner.startswith(f"{wrapper}(") and inner.endswith(")"):
            wrappers.append(wrapper)
            inner = inner[len(wrapper) + 1 : -1].strip()
    result = _scalar(inner, text)
    for wrapper in reversed(wrappers):
        result = f"{wrapper}({result})"
    return result


def _scalar(inner: str, text: str) -> str:
    if inner in _PLAIN:
        return inner
    refused = ValueError(f"unsupported column type {text!r} in the mapping")
    if match := _SHAPES["Decimal"].fullmatch(inner):
        precision, scale = int(match.group(1)), int(match.group(2))
        if not (1 <= precision <= DECIMAL_MAX_PRECISION and scale <= precision):
            raise refused
        return f"Decimal({precision}, {scale})"
    if match := _SHAPES["DateTime64"].fullmatch(inner):
        precision, zone = match.groups()
        return f"DateTime64({precision}, '{zone}')" if zone else f"DateTime64({precision})"
    if match := _SHAPES["DateTime"].fullmatch(inner):
        return f"DateTime('{match.group(1)}')"
    if match := _SHAPES["FixedString"].fullmatch(inner):
        if not 1 <= int(match.group(1)) <= 65535:
            raise refused
        return f"FixedString({int(match.group(1))})"
    raise refused


class OutOfRange(ValueError):
    """A value its column type cannot hold: poison under `error_class`."""

    def __init__(self, error_class: str, message: str) -> None:
        super().__init__(message)
        self.error_class = error_class


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
    """A converter from a decoded value to what clickhouse-connect inserts into that type (raising
    OutOfRange for a value outside the type's range), and the type's zero value (filler for the
    non-key columns of a delete marker). ValueError for a type outside `canonical_type`'s list."""
    inner, nullable = unwrap(canonical_type(clickhouse_type))
    base, zero = _base_converter(inner)
    if not nullable:
        return base, zero
    return (lambda value: None if value is None else base(value)), None


def _base_converter(inner: str) -> tuple[Converter, Any]:
    if decimal := decimal_parameters(inner):
        precision, scale = decimal
        return _decimal_converter(scale=scale, precision=precision), Decimal(0)
    if inner.startswith("DateTime64"):
        return _ranged_converter(
            _to_datetime, DATETIME64_MIN, DATETIME64_MAX, "DateTime64", "datetime_out_of_range"
        ), EPOCH
    if inner.startswith("DateTime"):
        return _ranged_converter(_to_datetime, EPOCH, DATETIME_MAX, "DateTime", "datetime_out_of_range"), EPOCH
    if inner in ("Date", "Date32"):
        low, high = DATE_RANGE if inner == "Date" else DATE32_RANGE
        return _ranged_converter(_to_date, low, high, inner, "date_out_of_range"), EPOCH.date()
    if inner in _INTEGERS:
        return _int_converter(inner), 0
    if inner.startswith("Float"):
        return _to_float, 0.0
    if inner == "Bool":
        return _to_bool, 0
    if inner in ("String", "UUID") or inner.startswith("FixedString"):
        return _to_str, ""
    raise ValueError(f"unsupported column type {inner!r} in the mapping")


def _int_converter(inner: str) -> Converter:
    bits = _INTEGERS[inner]
    low, high = (0, 2**bits - 1) if inner.startswith("U") else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)

    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise TypeError(f"expected an integer, got {value!r}")
        number = int(value)
        if not low <= number <= high:
            raise OutOfRange("int_out_of_range", f"{number} is outside {inner}'s range [{low}, {high}]")
        return number

    return convert


# Room for any Decimal256 value and its scale: quantizing never rounds for lack of digits.
_DECIMAL_CONTEXT = Context(prec=2 * DECIMAL_MAX_PRECISION)


def _decimal_converter(scale: int, precision: int) -> Converter:
    quantum = Decimal(1).scaleb(-scale)
    limit = Decimal(10) ** (precision - scale)

    def convert(value: Any) -> Decimal:
        if isinstance(value, float):
            raise TypeError(f"float {value!r} for an exact decimal column")
        number = value if isinstance(value, Decimal) else Decimal(str(value))
        if not number.is_finite():
            raise ValueError(f"{number} is not a finite number")
        # Compared before quantizing (1E+999999999 would need a billion digits), and unrounded.
        if number.copy_abs() >= limit:
            raise OutOfRange("decimal_out_of_range", f"{number} exceeds Decimal({precision}, {scale})")
        exact = number.quantize(quantum, context=_DECIMAL_CONTEXT)
        if exact != number:
            raise OutOfRange("decimal_scale_exceeded", f"{number} has more than {scale} decimal places")
        return exact

    return convert


def _ranged_converter(parse: Callable[[Any], Any], low: Any, high: Any, name: str, error_class: str) -> Converter:
    """A date or time parsed, then held to the ClickHouse type's range: poison of `error_class`
    outside it, never a batch ClickHouse refuses."""

    def convert(value: Any) -> Any:
        try:
            moment = parse(value)
        except OverflowError as exc:
            raise OutOfRange(error_class, f"{value!r} is outside {name}'s range ({exc})") from None
        if not low <= moment <= high:
            raise OutOfRange(error_class, f"{moment.isoformat()} is outside ClickHouse {name}'s range")
        return moment

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
    return moment.astimezone(dt.UTC)


def _to_date(value: Any) -> dt.date:
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).date()
    if isinstance(value, dt.date):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return dt.date(1970, 1, 1) + dt.timedelta(days=value)
    return dt.date.fromisoformat(str(value))


def _to_str(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError as exc:
            # JSON's "\ud800" decodes to a str no UTF-8 (so no insert) can carry.
            raise OutOfRange("lone_surrogate", f"a lone UTF-16 surrogate at character {exc.start}") from None
    return text


def _to_float(value: Any) -> float:
    return float(value)


def _to_bool(value: Any) -> int:
    return int(bool(value))
