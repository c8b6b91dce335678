"""DECODE stage: a Kafka message value from a Debezium PostgreSQL topic -> `ChangeEvent`.

Input formats, detected from the first byte:

* ``0x00``: Confluent wire format (magic byte, 4-byte big-endian schema id, Avro binary) as written
  by Confluent's AvroConverter. The writer schema comes from the schema registry, once per id.
* ``{``: Kafka Connect JsonConverter output, with an embedded schema (``{"schema":…,"payload":…}``)
  or without one (the envelope itself).
* anything else: ``DecodeError("wrong_magic_byte")``.

Per schema (Avro schema id, or JSON embedded-schema text) a decode plan is compiled once: for the
``before``/``after`` rows, which columns need a logical-type conversion and which could carry
Debezium's unchanged-TOAST placeholder. Per message the work is the Avro/JSON parse plus those
precomputed converters; no schema is walked per message.

Values, for Avro and for JSON with schema alike:

===========================================================  =====================================
Connect / Debezium semantic type                             Python value
===========================================================  =====================================
org.apache.kafka.connect.data.Decimal (bytes, scale)         Decimal with exactly that scale
io.debezium.data.VariableScaleDecimal ({scale, value})       Decimal with the sent scale
io.debezium.time.Date, connect Date (days)                   datetime.date
io.debezium.time.Timestamp, connect Timestamp (ms)           datetime, tz-aware UTC
io.debezium.time.MicroTimestamp (µs)                         datetime, tz-aware UTC
io.debezium.time.NanoTimestamp (ns)                          datetime, tz-aware UTC, floored to µs
io.debezium.time.ZonedTimestamp (ISO-8601 string)            datetime, tz-aware, converted to UTC
io.debezium.time.Time, connect Time (ms), MicroTime (µs)     datetime.time (naive)
io.debezium.time.NanoTime (ns)                               datetime.time, floored to µs
io.debezium.time.ZonedTime (ISO-8601 string)                 datetime.time, tz-aware UTC
io.debezium.data.Json/Xml/Uuid/Enum/EnumSet/Ltree            str, unchanged
io.debezium.time.MicroDuration (int64 µs, approximate)       int, unchanged
io.debezium.time.Interval (interval.handling.mode=string)    str (ISO-8601 duration), unchanged
array / map / struct                                         list / dict / dict, elements converted
bytes                                                        bytes (JSON: base64-decoded)
float32/float64                                              float (JSON: also "NaN"/"Infinity")
other int/long/boolean/string                                unchanged
===========================================================  =====================================

Limits, on purpose: a time of day of 24:00:00 (legal in PostgreSQL) and timestamps outside
datetime's years 1..9999 (PostgreSQL 'infinity', BC dates) do not fit Python's types and raise
``DecodeError("bad_logical_value")`` rather than being clamped silently.

JSON without schema: values pass through as JSON gives them (the mapping stage knows the column
types), except that non-integer JSON numbers are parsed as ``Decimal`` (exact; a float would lose
digits of a NUMERIC sent as a JSON number) and the TOAST placeholder is still replaced.

Unchanged TOAST: Debezium sends ``unavailable.value.placeholder`` (default
``__debezium_unavailable_value``) for a TOASTed column an UPDATE left untouched. A top-level
column of ``before``/``after`` then holds ``UNCHANGED_TOAST`` instead of a value. Recognised forms,
as Debezium's PostgreSQL connector produces them: the string (text, varchar, json, jsonb, xml,
…); its bytes (bytea; base64 in JSON); ``[placeholder]`` (text/varchar/json arrays); the list of the
placeholder's byte values (int4/int8/date arrays); ``{placeholder: placeholder}`` (hstore as map).

Messages that carry no row change: a tombstone (``None`` value) and op ``m`` (a logical decoding
message from ``pg_logical_emit_message``; it has no table row) decode to ``None``.
"""

from __future__ import annotations

import binascii
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import MAX_EMAX, MAX_PREC, MIN_EMIN, Context, Decimal, Inexact, InvalidOperation
from typing import Any

from cachetools import LRUCache
from fastavro import schemaless_reader

from consumer.core.errors import DecodeError
from consumer.core.types import DEFAULT_TOAST_PLACEHOLDER, UNCHANGED_TOAST, ChangeEvent
from consumer.decode.avro_schema import image_records, named_types, only_branch, resolve
from consumer.decode.limits import MAX_DECIMAL_SCALE, check_depth, check_scale, may_be_deeper
from consumer.decode.registry import SchemaRegistry

__all__ = ["EnvelopeDecoder"]

_OPS = frozenset(("c", "u", "d", "r", "t"))
_NO_CHANGE_OPS = frozenset(("m",))

# -- value converters (shared by Avro and JSON) ----------------------------------------------

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_US_PER_DAY = 86_400_000_000
_SOME_DATE = date(2000, 1, 1)
# Exact decimal arithmetic: no rounding ever goes unnoticed.
_EXACT = Context(prec=MAX_PREC, Emax=MAX_EMAX, Emin=MIN_EMIN, traps=[Inexact, InvalidOperation])


def _decimal(unscaled: int, scale: int) -> Decimal:
    # String construction is exact and keeps the exponent: 12340 with scale 4 -> Decimal('1.2340').
    return Decimal(f"{unscaled}E{-scale}")


def _date_from_days(v: int) -> date:
    return date.fromordinal(_EPOCH_ORDINAL + v)


def _ts_from_ms(v: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=v)


def _ts_from_us(v: int) -> datetime:
    return _EPOCH + timedelta(microseconds=v)


def _ts_from_ns(v: int) -> datetime:
    return _EPOCH + timedelta(microseconds=v // 1000)  # floor: datetime has µs precision


def _time_from_us(v: int) -> time:
    if not 0 <= v < _US_PER_DAY:
        raise ValueError(f"{v} µs after midnight is not a datetime.time (PostgreSQL '24:00:00'?)")
    s, us = divmod(v, 1_000_000)
    m, s = divmod(s, 60)
    h, m = divmod(m, 60)
    return time(h, m, s, us)


def _time_from_ms(v: int) -> time:
    return _time_from_us(v * 1000)


def _time_from_ns(v: int) -> time:
    return _time_from_us(v // 1000)


def _zoned_timestamp(v: str) -> datetime:
    dt = datetime.fromisoformat(v)  # 3.11: accepts 'Z', any offset, 0-9 fraction digits (> 6 truncated)
    tz = dt.tzinfo
    if tz is UTC:
        return dt
    if tz is None:
        raise ValueError("ZonedTimestamp without a UTC offset")
    return dt.astimezone(UTC)


def _zoned_time(v: str) -> time:
    t = time.fromisoformat(v)
    tz = t.tzinfo
    if tz is UTC:
        return t
    if tz is None:
        raise ValueError("ZonedTime without a UTC offset")
    return datetime.combine(_SOME_DATE, t).astimezone(UTC).timetz()


def _b64(v: str) -> bytes:
    return binascii.a2b_base64(v, strict_mode=True)


def _float(v: Any) -> float:
    # JSON: numbers arrive as int/Decimal; Jackson writes NaN and ±Infinity as strings.
    return float(v)


def _avro_decimal(scale: int) -> Callable[[bytes], Decimal]:
    def conv(v: bytes) -> Decimal:
        return _decimal(int.from_bytes(v, "big", signed=True), scale)

    return conv


def _json_decimal(scale: int) -> Callable[[Any], Decimal]:
    quantum = Decimal(f"1E{-scale}")

    def conv(v: Any) -> Decimal:
        if type(v) is str:  # decimal.format=BASE64 (JsonConverter's default)
            return _decimal(int.from_bytes(_b64(v), "big", signed=True), scale)
        if type(v) is bool or not isinstance(v, int | Decimal):
            raise TypeError(f"a Decimal is base64 or a number, not {type(v).__name__}")
        number = Decimal(v)
        # Quantizing 1E+999999999 exactly would write out a billion digits.
        if not number.is_finite() or abs(number.adjusted()) > MAX_DECIMAL_SCALE:
            raise ValueError(f"{_short(v)} is beyond ±1E{MAX_DECIMAL_SCALE}")
        return number.quantize(quantum, context=_EXACT)  # decimal.format=NUMERIC

    return conv


def _avro_variable_scale_decimal(v: dict[str, Any]) -> Decimal:
    scale = check_scale(v["scale"], "VariableScaleDecimal")
    return _decimal(int.from_bytes(v["value"], "big", signed=True), scale)


def _json_variable_scale_decimal(v: dict[str, Any]) -> Decimal:
    scale = check_scale(v["scale"], "VariableScaleDecimal")
    return _decimal(int.from_bytes(_b64(v["value"]), "big", signed=True), scale)


# Connect / Debezium semantic name -> converter of the underlying value. Connect's own Date, Time,
# Timestamp and Decimal are handled separately: in Avro, fastavro has usually converted them already.
_NAMED: dict[str, Callable[[Any], Any]] = {
    "io.debezium.time.Date": _date_from_days,
    "io.debezium.time.Timestamp": _ts_from_ms,
    "io.debezium.time.MicroTimestamp": _ts_from_us,
    "io.debezium.time.NanoTimestamp": _ts_from_ns,
    "io.debezium.time.ZonedTimestamp": _zoned_timestamp,
    "io.debezium.time.Time": _time_from_ms,
    "io.debezium.time.MicroTime": _time_from_us,
    "io.debezium.time.NanoTime": _time_from_ns,
    "io.debezium.time.ZonedTime": _zoned_time,
}
_CONNECT_DECIMAL = "org.apache.kafka.connect.data.Decimal"
_VARIABLE_SCALE_DECIMAL = "io.debezium.data.VariableScaleDecimal"
# Connect logical type -> (Avro logicalType that fastavro converts on read, converter otherwise).
_CONNECT_LOGICAL: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "org.apache.kafka.connect.data.Date": ("date", _date_from_days),
    "org.apache.kafka.connect.data.Time": ("time-millis", _time_from_ms),
    "org.apache.kafka.connect.data.Timestamp": ("timestamp-millis", _ts_from_ms),
}

# -- decode plans -------------------------------------------------------------------------------

# What a column needs: nothing, a TOAST check (str or bytes columns), or a converter.
_NONE, _STR, _BYTES, _FN = 0, 1, 2, 3
_Conv = tuple[int, Callable[[Any], Any] | None]
_NOTHING: _Conv = (_NONE, None)


class _RowPlan:
    """Precomputed per-column work for one row schema (`before`/`after`, or a nested struct)."""

    __slots__ = ("bytes_fields", "converters", "placeholder", "placeholder_bytes", "str_fields")

    def __init__(
        self,
        str_fields: tuple[str, ...],
        bytes_fields: tuple[str, ...],
        converters: tuple[tuple[str, Callable[[Any], Any]], ...],
        placeholder: str,
        placeholder_bytes: bytes,
    ) -> None:
        self.str_fields = str_fields
        self.bytes_fields = bytes_fields
        self.converters = converters
        self.placeholder = placeholder
        self.placeholder_bytes = placeholder_bytes

    @property
    def empty(self) -> bool:
        return not (self.str_fields or self.bytes_fields or self.converters)

    def apply(self, row: dict[str, Any]) -> dict[str, Any]:
        """Convert `row` in place (and return it). Converter errors propagate as _BadValue."""
        placeholder = self.placeholder
        for name in self.str_fields:
            if row.get(name) == placeholder:
                row[name] = UNCHANGED_TOAST
        placeholder = self.placeholder_bytes
        for name in self.bytes_fields:
            if row.get(name) == placeholder:
                row[name] = UNCHANGED_TOAST
        for name, conv in self.converters:
            v = row.get(name)
            if v is not None:
                try:
                    row[name] = conv(v)
                except _BadValue as e:
                    raise _BadValue(f"{name}.{e.column}" if e.column else name, e.value, e.cause) from None
                except (ValueError, TypeError, OverflowError, ArithmeticError, KeyError, AttributeError) as e:
                    raise _BadValue(name, v, e) from None
        return row


class _BadValue(Exception):
    def __init__(self, column: str, value: Any, cause: BaseException) -> None:
        super().__init__(column)
        self.column = column
        self.value = value
        self.cause = cause


class _PlanBuilder:
    """Compiles Avro writer schemas and Connect JSON schemas into `_RowPlan`s."""

    def __init__(self, placeholder: str, placeholder_bytes: bytes) -> None:
        self.placeholder = placeholder
        self.placeholder_bytes = placeholder_bytes
        self.toast_lists = ([placeholder], list(placeholder_bytes))
        self.toast_map = {placeholder: placeholder}

    def row_plan(self, fields: list[tuple[str, _Conv]]) -> _RowPlan:
        return _RowPlan(
            tuple(name for name, (kind, _) in fields if kind == _STR),
            tuple(name for name, (kind, _) in fields if kind == _BYTES),
            tuple((name, fn) for name, (kind, fn) in fields if kind == _FN and fn is not None),
            self.placeholder,
            self.placeholder_bytes,
        )

    # containers -----------------------------------------------------------------------------

    def _array(self, elem: _Conv) -> _Conv:
        text_list, number_list = self.toast_lists
        fn = elem[1] if elem[0] == _FN else None

        def conv(v: list[Any]) -> Any:
            if v in (text_list, number_list):
                return UNCHANGED_TOAST
            if fn is None:
                return v
            return [None if x is None else fn(x) for x in v]

        return (_FN, conv)

    def _map(self, value: _Conv) -> _Conv:
        toast_map = self.toast_map
        fn = value[1] if value[0] == _FN else None

        def conv(v: dict[str, Any]) -> Any:
            if v == toast_map:
                return UNCHANGED_TOAST
            if fn is None:
                return v
            return {k: None if x is None else fn(x) for k, x in v.items()}

        return (_FN, conv)

    @staticmethod
    def _struct(plan: _RowPlan) -> _Conv:
        if plan.empty:
            return _NOTHING
        return (_FN, plan.apply)

    # Avro ---------------------------------------------------------------------------------------

    def avro_envelope(self, schema: dict[str, Any]) -> tuple[_RowPlan | None, _RowPlan | None]:
        if not (isinstance(schema, dict) and schema.get("type") == "record"):
            return None, None
        names = named_types(schema)
        plans: dict[str, _RowPlan | None] = {}
        before, after = (
            self._avro_record(record, names, plans) if record is not None else None
            for record in image_records(schema, names)
        )
        return before, after

    def _avro_record(
        self, record: dict[str, Any], names: dict[str, Any], plans: dict[str, _RowPlan | None]
    ) -> _RowPlan:
        key = record.get("name") or id(record)
        cached = plans.get(key)
        if cached is not None:
            return cached
        if key in plans:  # recursive record: do not descend again
            return self.row_plan([])
        plans[key] = None
        plan = self.row_plan([(f["name"], self._avro(f["type"], names, plans)) for f in record["fields"]])
        plans[key] = plan
        return plan

    def _avro(self, t: Any, names: dict[str, Any], plans: dict[str, _RowPlan | None]) -> _Conv:
        if isinstance(t, str):
            if t == "string":
                return (_STR, None)
            if t == "bytes":
                return (_BYTES, None)
            named = resolve(t, names)  # any other primitive resolves to itself
            return _NOTHING if named is t else self._avro(named, names, plans)
        if isinstance(t, list):
            # Debezium only writes optional unions ["null", T] / [T, "null"]; wider unions pass through.
            branch = only_branch(t)
            return self._avro(branch, names, plans) if branch is not None else _NOTHING
        if not isinstance(t, dict):
            return _NOTHING
        typ = t.get("type")
        if isinstance(typ, dict | list):
            return self._avro(typ, names, plans)
        cname = t.get("connect.name")
        if cname is not None:
            fn = _NAMED.get(cname)
            if fn is not None:
                return (_FN, fn)
            if cname == _CONNECT_DECIMAL:
                if t.get("logicalType") == "decimal":
                    return _NOTHING  # fastavro returns Decimal with exponent -scale already
                return (_FN, _avro_decimal(_scale(t)))
            if cname == _VARIABLE_SCALE_DECIMAL:
                return (_FN, _avro_variable_scale_decimal)
            connect_logical = _CONNECT_LOGICAL.get(cname)
            if connect_logical is not None:
                avro_logical, fn = connect_logical
                return _NOTHING if t.get("logicalType") == avro_logical else (_FN, fn)
        if typ in ("string", "enum"):
            return (_STR, None)
        if typ == "bytes":
            return (_BYTES, None)
        if typ == "array":
            return self._array(self._avro(t["items"], names, plans))
        if typ == "map":
            return self._map(self._avro(t["values"], names, plans))
        if typ == "record":
            return self._struct(self._avro_record(t, names, plans))
        return _NOTHING

    # JSON (Connect schema as embedded by JsonConverter) ------------------------------------------

    def json_envelope(self, schema: Any) -> tuple[_RowPlan | None, _RowPlan | None]:
        before = after = None
        if isinstance(schema, dict) and schema.get("type") == "struct":
            for field in schema.get("fields") or ():
                if field.get("field") in ("before", "after") and field.get("type") == "struct":
                    plan = self._json_struct(field)
                    if field["field"] == "before":
                        before = plan
                    else:
                        after = plan
        return before, after

    def _json_struct(self, schema: dict[str, Any]) -> _RowPlan:
        return self.row_plan([(f["field"], self._json(f)) for f in schema.get("fields") or ()])

    def _json(self, t: dict[str, Any]) -> _Conv:
        typ = t.get("type")
        name = t.get("name")
        if name is not None:
            fn = _NAMED.get(name)
            if fn is not None:
                return (_FN, fn)
            if name == _CONNECT_DECIMAL:
                return (_FN, _json_decimal(_scale(t)))
            if name == _VARIABLE_SCALE_DECIMAL:
                return (_FN, _json_variable_scale_decimal)
            connect_logical = _CONNECT_LOGICAL.get(name)
            if connect_logical is not None:
                return (_FN, connect_logical[1])
        if typ == "string":
            return (_STR, None)
        if typ == "bytes":
            placeholder_bytes = self.placeholder_bytes

            def conv(v: str) -> Any:
                b = _b64(v)
                return UNCHANGED_TOAST if b == placeholder_bytes else b

            return (_FN, conv)
        if typ in ("float32", "float64"):
            return (_FN, _float)
        if typ == "array":
            return self._array(self._json(t.get("items") or {}))
        if typ == "map":
            keys = t.get("keys") or {}
            if keys.get("type") == "string":
                return self._map(self._json(t.get("values") or {}))
            return _NOTHING  # non-string keys: JsonConverter writes [[k, v], …]; Debezium never does
        if typ == "struct":
            return self._struct(self._json_struct(t))
        return _NOTHING


def _scale(t: dict[str, Any]) -> int:
    """A Connect Decimal's scale (Connect writes its parameters as strings), within the limit."""
    params = t.get("connect.parameters") if "connect.parameters" in t else t.get("parameters")
    scale = params["scale"] if isinstance(params, dict) and "scale" in params else t.get("scale", 0)
    return check_scale(int(scale), "Connect Decimal")


# -- the decoder --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _EnvelopePlan:
    before: _RowPlan | None
    after: _RowPlan | None
    avro_schema: dict[str, Any] | None = None


_SCHEMALESS = _EnvelopePlan(None, None)
_JSON_SCHEMA_PREFIX = b'{"schema":'
_JSON_PAYLOAD_SEP = b',"payload":'
_MAX_AVRO_PLANS = 4096
_MAX_JSON_PLANS = 256
_MAX_CACHED_SCHEMA_BYTES = 64 * 2**10  # Connect's schema of a Debezium table is a few kilobytes


class EnvelopeDecoder:
    """Decodes Debezium PostgreSQL change-event values. Reusable; one per thread (its plan caches are not locked).

    `registry` may be None for JSON-only topics; an Avro message then raises
    `DecodeError("avro_without_registry")`. `toast_placeholder` must match the connector's
    `unavailable.value.placeholder` (a ``hex:`` prefix means hex-encoded bytes, as in Debezium).
    """

    def __init__(self, registry: SchemaRegistry | None, *, toast_placeholder: str = DEFAULT_TOAST_PLACEHOLDER) -> None:
        self._registry = registry
        self._toast_placeholder = toast_placeholder
        if toast_placeholder.startswith("hex:"):
            placeholder_bytes = bytes.fromhex(toast_placeholder[4:])
            placeholder = placeholder_bytes.decode("utf-8", errors="replace")
        else:
            placeholder, placeholder_bytes = toast_placeholder, toast_placeholder.encode()
        self._placeholder = placeholder
        self._placeholder_b64 = binascii.b2a_base64(placeholder_bytes, newline=False).decode()
        self._builder = _PlanBuilder(placeholder, placeholder_bytes)
        # Bounded by count, and JSON schemas by size too: hostile producers choose ids and schemas.
        self._avro_plans: LRUCache[int, _EnvelopePlan | DecodeError] = LRUCache(_MAX_AVRO_PLANS)
        self._json_plans: LRUCache[bytes | str, _EnvelopePlan] = LRUCache(_MAX_JSON_PLANS)

    def for_another_thread(self) -> EnvelopeDecoder:
        """A decoder like this one, with plan caches of its own (the registry's is shared)."""
        return EnvelopeDecoder(self._registry, toast_placeholder=self._toast_placeholder)

    def decode(self, value: bytes | None) -> ChangeEvent | None:
        """The change in `value` (the message value as `bytes`, as confluent-kafka returns it);
        None for a tombstone or a message with no row change (op 'm'). Raises DecodeError for a
        poison message, RegistryUnavailable when the registry cannot be asked (retry later)."""
        if value is None:
            return None
        if not value:
            raise DecodeError("empty_value", "empty message value (0 bytes); a tombstone's value is null")
        first = value[0]
        if first == 0:
            envelope, plan = self._decode_avro(value)
        elif first == 0x7B:  # '{'
            envelope, plan = self._decode_json(value)
        else:
            raise DecodeError(
                "wrong_magic_byte",
                f"wrong magic byte 0x{first:02x}: neither Confluent Avro (0x00) nor JSON ('{{'); "
                f"first bytes {bytes(value[:16])!r}",
            )
        return self._event(envelope, plan)

    @property
    def placeholder(self) -> str:
        """The unchanged-TOAST placeholder as text (what a string column carries)."""
        return self._placeholder

    def writer_schema(self, schema_id: int) -> dict[str, Any]:
        """The fastavro-parsed writer schema of a Confluent schema id (for consumer.sink.server_plan).
        Raises DecodeError / RegistryUnavailable like `decode`."""
        if self._registry is None:
            raise DecodeError("avro_without_registry", f"schema id {schema_id} but this decoder has no schema registry")
        return self._registry.schema(schema_id)

    # -- Avro -----------------------------------------------------------------------------------

    def _decode_avro(self, value: bytes) -> tuple[Any, _EnvelopePlan]:
        if len(value) < 5:
            raise DecodeError(
                "truncated_avro",
                f"{len(value)} bytes: too short for the Confluent wire-format header (magic byte + 4-byte schema id)",
            )
        schema_id = int.from_bytes(value[1:5], "big")
        plan = self._avro_plans.get(schema_id)
        if plan is None:
            plan = self._compile_avro(schema_id)
        if isinstance(plan, DecodeError):
            raise DecodeError(plan.error_class, plan.reason)
        buf = io.BytesIO(value)
        buf.seek(5)
        try:
            record = schemaless_reader(buf, plan.avro_schema, None)
        except (EOFError, StopIteration) as e:
            raise DecodeError(
                "truncated_avro",
                f"Avro body ended early ({len(value)} bytes in all) for schema id {schema_id}: {e!r}",
            ) from None
        except IndexError as e:
            # fastavro's C reader raises IndexError when a varint runs off the end of the buffer,
            # and for a union branch index out of range.
            if buf.tell() >= len(value):
                raise DecodeError(
                    "truncated_avro",
                    f"Avro body ended early ({len(value)} bytes in all) for schema id {schema_id}",
                ) from None
            raise DecodeError("corrupt_avro", f"Avro body does not match schema id {schema_id}: {e!r}") from None
        except OverflowError as e:  # a logical type fastavro converts (e.g. date) is out of range
            raise DecodeError("bad_logical_value", f"schema id {schema_id}: {e}") from None
        except UnicodeDecodeError as e:  # surrogates too: UTF-8 has none
            raise DecodeError("invalid_utf8", f"a string of schema id {schema_id} is not UTF-8: {e}") from None
        except Exception as e:  # UnicodeDecodeError, ValueError, MemoryError on a huge length, ...
            raise DecodeError("corrupt_avro", f"Avro body does not decode with schema id {schema_id}: {e!r}") from None
        if buf.tell() != len(value):
            raise DecodeError(
                "corrupt_avro",
                f"{len(value) - buf.tell()} bytes left after the record of schema id {schema_id}: "
                "the message was not written with this schema",
            )
        return record, plan

    def _compile_avro(self, schema_id: int) -> _EnvelopePlan | DecodeError:
        if self._registry is None:
            raise DecodeError(
                "avro_without_registry",
                f"Avro message (schema id {schema_id}) but this decoder has no schema registry",
            )
        schema = self._registry.schema(schema_id)  # DecodeError / RegistryUnavailable propagate
        plan: _EnvelopePlan | DecodeError
        try:
            before, after = self._builder.avro_envelope(schema)
            plan = _EnvelopePlan(before, after, schema)
        except DecodeError as e:
            plan = DecodeError(e.error_class, f"schema id {schema_id}: {e.reason}")
        except (KeyError, ValueError, TypeError, AttributeError, RecursionError) as e:
            plan = DecodeError("invalid_writer_schema", f"schema id {schema_id}: cannot compile a plan: {e!r}")
        self._avro_plans[schema_id] = plan
        return plan

    # -- JSON -----------------------------------------------------------------------------------

    def _decode_json(self, value: bytes) -> tuple[Any, _EnvelopePlan]:
        # Fast path for JsonConverter's compact `{"schema":S,"payload":P}`: the schema text (the
        # larger part) is used as the plan-cache key as bytes and only the payload is parsed. The
        # split is trusted only once S itself parsed as JSON (a `,"payload":` inside S would leave
        # an unbalanced prefix); anything unusual takes the general path below.
        if value.startswith(_JSON_SCHEMA_PREFIX) and value.endswith(b"}"):
            cut = value.find(_JSON_PAYLOAD_SEP, len(_JSON_SCHEMA_PREFIX))
            if cut > 0:
                key = bytes(value[:cut])
                plan = self._json_plans.get(key)
                if plan is None:
                    try:
                        schema = json.loads(key[len(_JSON_SCHEMA_PREFIX) :])
                    except (ValueError, RecursionError):
                        schema = None
                    else:
                        plan = self._store_json_plan(key, schema)
                if plan is not None:
                    text = value[cut + len(_JSON_PAYLOAD_SEP) : -1]
                    try:
                        payload = json.loads(text, parse_float=Decimal)
                    except (ValueError, RecursionError):
                        pass  # the general path reports the error on the whole value
                    else:
                        if may_be_deeper(text):
                            check_depth(payload, "the JSON payload")
                        return payload, plan
        try:
            doc = json.loads(value, parse_float=Decimal)
        except RecursionError:
            raise DecodeError("too_deep", "the JSON value nests too deep to parse") from None
        except ValueError as e:
            raise DecodeError("invalid_json", f"invalid JSON: {e}") from None
        if may_be_deeper(value):
            check_depth(doc, "the JSON value")
        if isinstance(doc, dict) and "schema" in doc and "payload" in doc:
            schema = doc["schema"]
            if schema is None:
                return doc["payload"], _SCHEMALESS
            key = json.dumps(schema, sort_keys=True, separators=(",", ":"))
            plan = self._json_plans.get(key) or self._store_json_plan(key, schema)
            return doc["payload"], plan
        return doc, _SCHEMALESS

    def _store_json_plan(self, key: bytes | str, schema: Any) -> _EnvelopePlan:
        check_depth(schema, "the embedded Connect schema")
        try:
            before, after = self._builder.json_envelope(schema)
        except (KeyError, ValueError, TypeError, AttributeError) as e:
            raise DecodeError("invalid_json_schema", f"cannot compile the embedded Connect schema: {e!r}") from None
        plan = _EnvelopePlan(before, after)
        if len(key) <= _MAX_CACHED_SCHEMA_BYTES:
            self._json_plans[key] = plan
        return plan

    def _toast_scan(self, row: dict[str, Any]) -> None:
        """Schemaless JSON: find the placeholder without knowing the column types."""
        placeholder, placeholder_b64 = self._placeholder, self._placeholder_b64
        text_list, number_list = self._builder.toast_lists
        toast_map = self._builder.toast_map
        for k, v in row.items():
            t = type(v)
            if (
                (t is str and (v in (placeholder, placeholder_b64)))
                or (t is list and (v in (text_list, number_list)))
                or (t is dict and v == toast_map)
            ):
                row[k] = UNCHANGED_TOAST

    # -- envelope ---------------------------------------------------------------------------------

    def _event(self, envelope: Any, plan: _EnvelopePlan) -> ChangeEvent | None:
        if not isinstance(envelope, dict):
            raise DecodeError(
                "not_a_debezium_envelope", f"the value is a {type(envelope).__name__}, not a record/object"
            )
        op = envelope.get("op")
        if op is None:
            raise DecodeError(
                "missing_op",
                f"no 'op' in a value with fields {sorted(envelope)[:12]} "
                "(a heartbeat, transaction-metadata or other non-change message?)",
            )
        if type(op) is not str:
            raise DecodeError("unsupported_op", f"op {_short(op)} is not a string")
        if op in _NO_CHANGE_OPS:
            return None
        if op not in _OPS:
            raise DecodeError("unsupported_op", f"unsupported op {op!r} (expected one of c, u, d, r, t, m)")
        source = envelope.get("source")
        if not isinstance(source, dict):
            raise DecodeError("not_a_debezium_envelope", f"op {op!r} without a 'source' block")
        table = source.get("table")
        if not isinstance(table, str):
            raise DecodeError("not_a_debezium_envelope", f"op {op!r} without source.table")
        lsn = source.get("lsn")
        commit_ts_ms = source.get("ts_ms")
        if (lsn is not None and type(lsn) is not int) or (commit_ts_ms is not None and type(commit_ts_ms) is not int):
            raise DecodeError(
                "not_a_debezium_envelope",
                f"{table}: source.lsn {lsn!r} / source.ts_ms {commit_ts_ms!r} are not integers",
            )
        snapshot = source.get("snapshot") not in (None, "false", False)
        if op == "t":
            return ChangeEvent(op, table, None, None, lsn, commit_ts_ms, snapshot)
        if "before" not in envelope or "after" not in envelope:
            raise DecodeError("not_a_debezium_envelope", f"{table}: op {op!r} without 'before'/'after' fields")
        before, after = envelope["before"], envelope["after"]
        if not (before is None or isinstance(before, dict)) or not (after is None or isinstance(after, dict)):
            raise DecodeError("not_a_debezium_envelope", f"{table}: 'before'/'after' are not records")
        if after is None and op != "d":
            raise DecodeError("not_a_debezium_envelope", f"{table}: op {op!r} without an 'after' row")
        if plan is _SCHEMALESS:
            if before is not None:
                self._toast_scan(before)
            if after is not None:
                self._toast_scan(after)
        else:
            try:
                if before is not None and plan.before is not None:
                    plan.before.apply(before)
                if after is not None and plan.after is not None:
                    plan.after.apply(after)
            except _BadValue as e:
                raise DecodeError(
                    "bad_logical_value",
                    f"{table}.{e.column}: cannot convert {_short(e.value)}: {type(e.cause).__name__}: {e.cause}",
                ) from None
        return ChangeEvent(op, table, before, after, lsn, commit_ts_ms, snapshot)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"
