"""SERVER-SIDE DECODE: the fast lane for fact tables. ClickHouse decodes the Avro and maps the
Debezium envelopes to signed fact rows; Python keeps batching, deduplication and commits.

Why: decoding a Debezium envelope in Python (fastavro) and mapping it costs many times the CPU
ClickHouse needs to decode the same bytes natively. So for a batch of a fact topic the pipeline
hands over the raw message values, and ClickHouse does the rest in one INSERT:

* the payload is an Avro object container (`INSERT … FORMAT Avro`) whose schema is the writer
  schema wrapped in a record ``{_k: fixed(8), _h: fixed(5), <envelope fields>, _t: fixed(8)}``:
  each message value goes in unchanged (``_h`` is its Confluent header) between two copies of its
  Kafka coordinates (``_k`` = ``_t`` = partition << 48 | offset, little-endian). Python's work per
  message is one ``int.to_bytes``. The schema travels with the insert: ClickHouse needs no access
  to the registry. ``_t`` = ``_k`` proves each record ended exactly where its value ended (a value
  with trailing bytes, or a truncated one, shifts every later field);
* the insert goes into a staging table (``ENGINE = Null``: nothing stored) whose materialized
  view writes the fact rows (signed images as consumer.transform.fact_rules declares them, the
  rules the Python path follows too) into the fact table, with
  ``_topic``/``_partition``/``_offset``, so the applied watermark works as for Python's rows;
  the fact table's own views (the KPI aggregate) follow as usual. ``insert_deduplication_token``
  deduplicates a retried insert in the fact table and in the aggregate alike (checked);
* the view re-checks everything the Python path would reject or treat specially (an op whose
  fact rule is not `server_side`: snapshot reads are reconciled with what ClickHouse holds, in
  Python; an image the rule needs that is missing, or incomplete where it retracts a row; an
  unchanged-TOAST placeholder, a NULL for a non-Nullable column, a timestamp outside
  DateTime64 or not in Debezium's canonical form, a decimal that does not fit) with ``throwIf``:
  then the whole insert fails before anything is written, and the pipeline applies that batch
  through the Python path, which dead-letters exactly the bad messages. So on every batch that
  ClickHouse accepts, the rows are those the Python path would write; on any other the Python
  path decides. Inserts are kept to one block (one `max_insert_block_size`), so a rejected insert
  leaves nothing behind.

A plan is compiled per (table mapping, writer schema id); writer schemas it does not cover (a
type outside the list in `_column_expression`, a mapping that adds columns, a dimension table)
simply stay on the Python path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

from cachetools import LRUCache, TTLCache

from consumer.core.identifiers import is_identifier
from consumer.decode.avro_schema import fields_by_name, image_records, is_optional, named_types, resolve, strip
from consumer.sink.clickhouse import INSERT_SETTINGS
from consumer.transform.clickhouse_types import (
    DATETIME64_MAX,
    DATETIME64_MAX_US,
    DATETIME64_MIN,
    DATETIME64_MIN_US,
    decimal_parameters,
    quote_identifier,
    sql_string,
    unwrap,
)
from consumer.transform.fact_rules import SERVER_RULES, SIDES, FactRule
from consumer.transform.mapping import TableMapping

log = logging.getLogger(__name__)

# Coordinates packed into 8 bytes: partition in the top 16 bits, offset in the low 48.
OFFSET_BITS = 48
MAX_OFFSET = (1 << OFFSET_BITS) - 1
MAX_PARTITION = (1 << 16) - 1
RETRY_S = 10.0
PLANS_KEPT = 1024  # after a transient failure to set a plan up, the Python path for this long
SYNC = b"cdc-consumer-ocf"  # the container's 16-byte sync marker (any constant will do)
# Messages per Avro block of a payload: enough to make the per-block overhead negligible, few
# enough that no block is a large copy.
BLOCK_MESSAGES = 1_000
_COORDINATES = struct.Struct("<Q").pack
ZONED_TIMESTAMP = "io.debezium.time.ZonedTimestamp"
MICRO_TIMESTAMP = "io.debezium.time.MicroTimestamp"
TIMESTAMP = "io.debezium.time.Timestamp"
# DateTime64's range spans whole years, so Debezium's canonical text is in range exactly when its
# year is: a text comparison, which needs no parse that could wrap around.
_DATETIME64_YEARS = f"'{DATETIME64_MIN.year:04d}' AND '{DATETIME64_MAX.year:04d}'"

# A rejected insert must leave nothing behind: one block per insert.
ONE_BLOCK_INSERT_SETTINGS = {
    **INSERT_SETTINGS,
    "max_insert_block_size": 10_000_000,
    "min_insert_block_size_rows": 0,
    "min_insert_block_size_bytes": 0,
    "input_format_parallel_parsing": 0,
}


# One partition's messages in an insert: (partition, offsets, values), offsets ascending.
Segment = tuple[int, list[int], list[bytes]]


class Unsupported(Exception):
    """This writer schema / mapping stays on the Python path (the reason is logged once)."""


_SMALL = [bytes([n]) for n in range(128)]


def zigzag_varint(n: int) -> bytes:
    """Avro `long`/`int`: zig-zag, then base-128 little-endian varint."""
    z = (n << 1) ^ (n >> 63)
    if z < 0x80:
        return _SMALL[z]
    if z < 0x4000:
        return bytes((z & 0x7F | 0x80, z >> 7))
    if z < 0x200000:
        return bytes((z & 0x7F | 0x80, (z >> 7) & 0x7F | 0x80, z >> 14))
    if z < 0x10000000:
        return bytes((z & 0x7F | 0x80, (z >> 7) & 0x7F | 0x80, (z >> 14) & 0x7F | 0x80, z >> 21))
    out = bytearray()
    while z >= 0x80:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def encode_string(s: str | bytes) -> bytes:
    """Avro `string`/`bytes`: length, then the bytes."""
    b = s.encode() if isinstance(s, str) else s
    return zigzag_varint(len(b)) + b


@dataclass(frozen=True)
class ServerPlan:
    table: str
    topic: str
    schema_id: int
    staging: str
    view: str
    ddl: tuple[str, ...]
    ocf_head: bytes

    @property
    def header(self) -> bytes:
        return b"\x00" + self.schema_id.to_bytes(4, "big")

    def payload(self, segments: Sequence[Segment]) -> Iterator[bytes]:
        """The Avro container for these messages (all with this plan's header), partition after
        partition, as a stream of Avro blocks of up to BLOCK_MESSAGES messages each: never one
        large copy of them all, since copying a batch's megabytes would cost more CPU than
        everything else Python does per message on the fast lane."""
        for partition, offsets, _ in segments:
            if not 0 <= partition <= MAX_PARTITION or (offsets and offsets[-1] > MAX_OFFSET):
                raise ValueError(f"partition {partition} / offset {offsets[-1]} do not fit the 8-byte coordinates")
        return self._blocks(segments)

    def _blocks(self, segments: Sequence[Segment]) -> Iterator[bytes]:
        yield self.ocf_head
        for partition, offsets, values in segments:
            base = partition << OFFSET_BITS
            for start in range(0, len(values), BLOCK_MESSAGES):
                chunk = values[start : start + BLOCK_MESSAGES]
                keys = list(map(_COORDINATES, map(base.__or__, offsets[start : start + BLOCK_MESSAGES])))
                parts = [zigzag_varint(len(chunk)), zigzag_varint(16 * len(chunk) + sum(map(len, chunk)))]
                parts.extend(chain.from_iterable(zip(keys, chunk, keys, strict=True)))
                parts.append(SYNC)
                yield b"".join(parts)


# -- compiling a plan ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StagingField:
    """One column of a before/after image as the staging table reads it."""

    name: str
    clickhouse: str  # the staging type of the value (inside Nullable when optional)
    avro: str  # primitive type
    optional: bool
    logical: str | None  # connect.name or Avro logicalType
    precision: int = 0
    scale: int = 0

    @property
    def staging_type(self) -> str:
        return f"Nullable({self.clickhouse})" if self.optional else self.clickhouse


_SIMPLE_TYPES = {
    "long": "Int64",
    "int": "Int32",
    "string": "String",
    "boolean": "Bool",
    "double": "Float64",
    "float": "Float32",
    "bytes": "String",
}


def staging_field(name: str, node: Any, named: dict[str, Any]) -> StagingField:
    """The staging column of an Avro field; Unsupported for a type ClickHouse is not given."""
    optional = False
    node = resolve(node, named)
    if isinstance(node, list):
        if not is_optional(node):
            raise Unsupported(f"column {name!r}: union {node}")
        optional = True
        node = resolve(next(b for b in node if b != "null"), named)
    base = node if isinstance(node, str) else node.get("type")
    logical = None if isinstance(node, str) else (node.get("connect.name") or node.get("logicalType"))
    if base == "bytes" and isinstance(node, dict) and node.get("logicalType") == "decimal":
        precision, scale = int(node.get("precision", 0)), int(node.get("scale", 0))
        if not 0 < precision <= 76 or not 0 <= scale <= precision:
            raise Unsupported(f"column {name!r}: decimal({precision}, {scale})")
        return StagingField(name, f"Decimal({precision}, {scale})", "decimal", optional, "decimal", precision, scale)
    if base not in _SIMPLE_TYPES:
        raise Unsupported(f"column {name!r}: Avro type {base!r}")
    return StagingField(name, _SIMPLE_TYPES[base], base, optional, logical)


def tuple_type(fields: Sequence[StagingField]) -> str:
    """The ClickHouse Tuple type of a record read as these fields."""
    return "Tuple(" + ", ".join(f"{quote_identifier(f.name)} {f.staging_type}" for f in fields) + ")"


def image_record(envelope: dict[str, Any], named: dict[str, Any]) -> dict[str, Any]:
    """The record of a Debezium envelope's images, when the staging table can read it: `op` a
    string, `before` and `after` optional records with the same fields. Unsupported otherwise."""
    fields = fields_by_name(envelope)
    for required in ("before", "after", "op"):
        if required not in fields:
            raise Unsupported(f"not a Debezium envelope (no {required!r})")
    if resolve(fields["op"]["type"], named) != "string":
        raise Unsupported("op is not a string")
    records = image_records(envelope, named)
    for side, record in zip(("before", "after"), records, strict=True):
        node = resolve(fields[side]["type"], named)
        if not (isinstance(node, list) and is_optional(node)):
            raise Unsupported(f"{side} is not an optional record")
        if record is None:
            raise Unsupported(f"{side} is not a record")
    before, after = records
    if before is not after and before.get("fields") != after.get("fields"):
        raise Unsupported("before and after have different records")
    return after


def _column_expression(column, source: StagingField | None, placeholder: str) -> tuple[str, list[str]]:
    """SQL for one mapped column over the tuple `img`, and the conditions that must send the
    batch to the Python path. Only conversions whose result equals consumer.transform.mapping's exactly."""
    inner, nullable = unwrap(column.clickhouse_type)
    if source is None:
        if not nullable:
            raise Unsupported(f"{column.name}: source column {column.source!r} is not in this schema")
        return f"CAST(NULL AS {column.clickhouse_type})", []
    v = f"img.{quote_identifier(source.name)}"
    checks: list[str] = []
    if source.optional and not nullable:
        checks.append(f"isNull({v})")
    x = f"assumeNotNull({v})" if source.optional else v
    value_checks: list[str] = []  # over x; every one non-NULL by construction
    if source.avro in ("string", "bytes"):
        value_checks.append(f"{x} = {sql_string(placeholder)}")  # unchanged TOAST in a fact
    if source.avro == "string":
        # Python's Avro reader refuses what is not UTF-8 (surrogates included), and so must this lane.
        value_checks.append(f"NOT isValidUTF8({x})")
    decimal = decimal_parameters(inner)
    if inner == "Int64" and source.avro in ("long", "int") and source.logical is None:
        expr = f"toInt64({x})"
    elif (inner == "Int32" and source.avro == "int" and source.logical is None) or (
        inner == "String" and source.avro == "string" and source.logical in (None, "io.debezium.data.Json")
    ):
        expr = x
    elif inner == "Float64" and source.avro in ("double", "float"):
        expr = f"toFloat64({x})"
    elif inner == "Bool" and source.avro == "boolean":
        expr = f"toUInt8({x})"
    elif decimal and source.avro == "decimal":
        precision, scale = decimal
        if source.scale > scale:
            raise Unsupported(f"{column.name}: decimal scale {source.scale} > {scale}")
        digits = precision - scale
        if digits <= 18:
            value_checks.append(f"NOT ({x} > -{10**digits} AND {x} < {10**digits})")
        else:
            limit = f"toDecimal256('{10**digits}', 0)"
            value_checks.append(f"NOT ({x} > -{limit} AND {x} < {limit})")
        expr = f"CAST({x} AS Decimal({precision}, {scale}))"
    elif inner == "DateTime64(6, 'UTC')" and source.avro == "string" and source.logical == ZONED_TIMESTAMP:
        # Debezium's canonical text for timestamptz: 'YYYY-MM-DDTHH:MM:SS.ffffffZ'. Anything else
        # (other offsets, fewer digits, invalid dates, out of range) is left to Python.
        parsed = f"parseDateTime64BestEffortOrNull({x}, 6, 'UTC')"
        value_checks.append(
            f"NOT ifNull(length({x}) = 27 AND substring({x}, 11, 1) = 'T' AND endsWith({x}, 'Z') "
            f"AND substring({x}, 1, 4) BETWEEN {_DATETIME64_YEARS} "
            f"AND formatDateTime({parsed}, '%Y-%m-%dT%H:%i:%S.%fZ', 'UTC') = {x}, 0)"
        )
        expr = parsed
    elif inner == "DateTime64(6, 'UTC')" and source.avro == "long" and source.logical in (MICRO_TIMESTAMP, TIMESTAMP):
        micros = x if source.logical == MICRO_TIMESTAMP else f"({x} * 1000)"
        value_checks.append(f"NOT ({micros} BETWEEN {DATETIME64_MIN_US} AND {DATETIME64_MAX_US})")
        expr = f"fromUnixTimestamp64Micro({micros}, 'UTC')"
    else:
        raise Unsupported(f"{column.name}: {source.avro}/{source.logical} into {column.clickhouse_type}")
    if source.optional and nullable:
        expr = f"if(isNull({v}), NULL, {expr})"
    if value_checks:
        joined = " OR ".join(f"({c})" for c in value_checks)
        # A NULL (legal only for a Nullable column, else caught above) has nothing to check.
        checks.append(f"(isNotNull({v}) AND ({joined}))" if source.optional else joined)
    return f"CAST({expr} AS {column.clickhouse_type})", checks


# -- the fact rules in SQL ----------------------------------------------------------------------


def _ops(rules: Sequence[FactRule]) -> str:
    return ", ".join(sql_string(rule.op) for rule in rules)


def fan_out_sql(rules: Sequence[FactRule]) -> str:
    """The signed images of a change as an array of (image, sign), one entry per row it writes."""
    branches = [
        f"op = {sql_string(rule.op)}, ["
        + ", ".join(f"(assumeNotNull({row.side}), toInt8({row.sign}))" for row in rule.rows)
        + "]"
        for rule in rules
    ]
    return "multiIf(\n            " + ",\n            ".join([*branches, "[]"]) + ")"


def _rule_checks(table: TableMapping, by_name: dict[str, StagingField], rules: Sequence[FactRule]) -> list[str]:
    """Conditions under which a change is not one the rules let ClickHouse apply: an op left to
    Python, an image the op needs that is NULL, an image it retracts without every non-key column."""
    checks = [f"op NOT IN ({_ops(rules)})"]
    for side in SIDES:
        needing = [rule for rule in rules if side in rule.needs]
        if needing:
            checks.append(f"(op IN ({_ops(needing)}) AND isNull({side}))")
        complete = [rule for rule in rules if any(r.side == side and r.must_be_complete for r in rule.rows)]
        if not complete:
            continue
        for column in table.columns:
            if column.name in table.key:
                continue
            source = by_name.get(column.source)
            if source is None:
                checks.append(f"op IN ({_ops(complete)})")
            elif source.optional:
                element = f"tupleElement({side}, {sql_string(source.name)})"
                checks.append(f"(op IN ({_ops(complete)}) AND isNull({element}))")
    return checks


def compile_plan(
    table: TableMapping, schema_id: int, writer: dict[str, Any], placeholder: str, target: str | None = None
) -> ServerPlan:
    """The staging table, view and container header for one fact table and writer schema.
    Raises Unsupported when this combination must stay on the Python path."""
    if table.role != "fact":
        raise Unsupported(f"{table.table} is a {table.role} table")
    envelope = strip(writer)
    if not isinstance(envelope, dict) or envelope.get("type") != "record":
        raise Unsupported("the writer schema is not a record")
    # Debezium names the envelope `<prefix>.<schema>.<table>.Envelope`: a writer schema of another
    # table (a message produced into the wrong topic) is left to the Python path, which dead-letters
    # it (consumer.transform.mapping: table_mismatch) instead of mapping its columns onto this table's.
    written_for = str(envelope.get("name", "")).rsplit(".", 2)
    if len(written_for) != 3 or written_for[1] != table.expected_table:
        raise Unsupported(f"writer schema {envelope.get('name')!r} is not of table {table.expected_table!r}")
    named = named_types(envelope)
    record = image_record(envelope, named)
    fields = [staging_field(f["name"], f["type"], named) for f in record["fields"]]
    refused = [f.name for f in fields if not is_identifier(f.name)]
    if refused:  # the Python lane dead-letters such a change (bad_identifier)
        raise Unsupported(f"column names that are not identifiers: {refused[:3]}")
    by_name = {f.name: f for f in fields}
    if table.extra_columns == "add" and set(by_name) - table.sources:
        raise Unsupported("the schema has columns the mapping would add")
    names = [c.name for c in table.columns]
    if {"_sign", "_topic", "_partition", "_offset"} & set(names):
        raise Unsupported("a mapped column uses a bookkeeping name")
    image = tuple_type(fields)
    selects, row_checks = [], []
    for column in table.columns:
        expr, checks = _column_expression(column, by_name.get(column.source), placeholder)
        selects.append(f"{expr} AS {quote_identifier(column.name)}")
        row_checks.extend(checks)
    staging_columns = f"_k FixedString(8), _h FixedString(5), op String, before Nullable({image}), after Nullable({image}), _t FixedString(8)"
    header = _sql_string_bytes(b"\x00" + schema_id.to_bytes(4, "big"))
    message_check = " OR ".join(["_t != _k", f"_h != {header}", *_rule_checks(table, by_name, SERVER_RULES)])
    fan_out = fan_out_sql(SERVER_RULES)
    row_check = " OR ".join(f"({c})" for c in row_checks) or "0"
    # Everything the view does is in the name: a plan that changed gets a table and view of its own.
    target = target or table.table
    moved = [target] if target != table.table else []  # the one-server plans keep their names
    digest_source = json.dumps(
        [table.table, table.topic, schema_id, staging_columns, selects, fan_out, message_check, row_check, *moved]
    )
    digest = hashlib.sha256(digest_source.encode()).hexdigest()[:12]
    staging = f"_cdc_in_{table.table}_{digest}"
    view = f"_cdc_mv_{table.table}_{digest}"
    select = ",\n    ".join(
        [
            *selects,
            "s AS _sign",
            f"{sql_string(table.topic)} AS _topic",
            f"toUInt32(bitShiftRight(k, {OFFSET_BITS})) AS _partition",
            f"bitAnd(k, {MAX_OFFSET}) AS _offset",
        ]
    )
    ddl = (
        f"CREATE TABLE IF NOT EXISTS {quote_identifier(staging)} ({staging_columns}) ENGINE = Null",
        f"""CREATE MATERIALIZED VIEW IF NOT EXISTS {quote_identifier(view)} TO {quote_identifier(target)} AS
SELECT
    {select}
FROM
(
    SELECT
        reinterpretAsUInt64(_k) AS k,
        arrayJoin({fan_out}) AS r,
        r.1 AS img,
        r.2 AS s
    FROM {quote_identifier(staging)}
    WHERE throwIf({message_check}, 'cdc: a change only the Python path may apply') = 0
)
WHERE throwIf({row_check}, 'cdc: a value only the Python path may convert') = 0""",
    )
    return ServerPlan(table.table, table.topic, schema_id, staging, view, ddl, _container_head(envelope))


def _container_head(envelope: dict[str, Any]) -> bytes:
    """The Avro container's header: the writer schema wrapped between two copies of the Kafka
    coordinates and the Confluent header (see the module's docstring)."""
    wrapper = dict(envelope)
    wrapper["name"] = f"{envelope.get('name', 'Envelope')}_cdc_wrapped"
    wrapper["fields"] = [
        {"name": "_k", "type": {"type": "fixed", "name": "cdc_coordinates", "size": 8}},
        {"name": "_h", "type": {"type": "fixed", "name": "cdc_confluent_header", "size": 5}},
        *envelope["fields"],
        {"name": "_t", "type": "cdc_coordinates"},
    ]
    schema_text = json.dumps(wrapper, separators=(",", ":"))
    meta = (
        zigzag_varint(2)
        + encode_string("avro.schema")
        + encode_string(schema_text)
        + encode_string("avro.codec")
        + encode_string("null")
        + b"\x00"
    )
    return b"Obj\x01" + meta + SYNC


def _sql_string_bytes(b: bytes) -> str:
    return "unhex('" + b.hex() + "')"


# -- at run time ------------------------------------------------------------------------------


def for_sink(sink: Any, decoder: Any) -> ServerDecoder | None:
    """The fast lane for this sink and decoder, when it applies: a ClickHouse server reached over
    HTTP (the embedded chDB client is left on the Python path) and Avro through a registry."""
    from clickhouse_connect.driver.httpclient import HttpClient

    client = getattr(sink, "client", None)
    if not isinstance(client, HttpClient) or getattr(decoder, "_registry", None) is None:
        return None
    return ServerDecoder(client, decoder.writer_schema, decoder.placeholder, sink.stored)


class Rejected(Exception):
    """ClickHouse answered the insert with its own error. Normally nothing was written (one block,
    refused before the write); the pipeline checks the watermark before it takes the Python path."""


class ServerDecoder:
    """Plans per (table mapping, Confluent header), their DDL applied once, and the inserts."""

    def __init__(self, client: Any, writer_schema, placeholder: str, stored: Callable[[str], str] = str):
        self.client = client
        self.stored = stored  # the table that holds a fact table's rows on this server (a shard's local)
        self.writer_schema = writer_schema  # schema id -> fastavro-parsed writer schema (may raise)
        self.placeholder = placeholder
        # (id(table mapping), header) -> (the mapping, kept alive so the id stays its own; plan)
        # Bounded: the header is the message's first five bytes, which a hostile producer chooses.
        self._plans: LRUCache[tuple[int, bytes], tuple[TableMapping, ServerPlan | None]] = LRUCache(PLANS_KEPT)
        self._retry_at: TTLCache[tuple[int, bytes], bool] = TTLCache(PLANS_KEPT, RETRY_S)

    def plan(self, table: TableMapping, header: bytes) -> ServerPlan | None:
        """The plan for messages of `table` starting with `header`; None: use the Python path."""
        key = (id(table), header)
        cached = self._plans.get(key)
        if cached is not None:
            return cached[1]
        if key in self._retry_at:
            return None
        plan, permanent = self._compile(table, header)
        if permanent:
            self._plans[key] = (table, plan)
        else:
            self._retry_at[key] = True
        return plan

    def _compile(self, table: TableMapping, header: bytes) -> tuple[ServerPlan | None, bool]:
        if table.role != "fact" or len(header) != 5 or header[0] != 0:
            return None, True
        schema_id = int.from_bytes(header[1:5], "big")
        try:
            writer = self.writer_schema(schema_id)
        except Exception as exc:  # unknown id, registry down: the Python path reports or retries it
            log.debug("no writer schema %d for server-side decoding: %s", schema_id, exc)
            return None, False
        try:
            plan = compile_plan(table, schema_id, writer, self.placeholder, self.stored(table.table))
        except Unsupported as exc:
            log.info("%s, schema id %d: decoded in Python (%s)", table.table, schema_id, exc)
            return None, True
        try:
            for statement in plan.ddl:
                self.client.command(statement, settings={"async_insert": 0})
        except Exception as exc:  # ClickHouse unavailable: try again later
            log.warning("%s: cannot create %s (%s); decoding in Python for now", table.table, plan.staging, exc)
            return None, False
        log.info("%s, schema id %d: decoded by ClickHouse through %s", table.table, schema_id, plan.staging)
        return plan, True

    def insert(self, plan: ServerPlan, segments: Sequence[Segment], token: str) -> int:
        """One INSERT of the messages; returns the rows ClickHouse wrote (facts and views).
        Raises Rejected when ClickHouse refused them, anything else when it could not be asked."""
        from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

        payload = plan.payload(segments)
        try:
            summary = self.client.raw_insert(
                plan.staging,
                insert_block=payload,
                fmt="Avro",
                settings={**ONE_BLOCK_INSERT_SETTINGS, "insert_deduplication_token": token},
            )
        except DatabaseError as exc:
            # The server's own exception (an exception code in its answer, first attempt): the
            # insert failed as a whole. A connection problem or a retried request is ambiguous.
            if not isinstance(exc, OperationalError) and getattr(exc, "code", None):
                raise Rejected(str(exc).strip().splitlines()[0][:500]) from exc
            raise
        return int(summary.written_rows or 0)
