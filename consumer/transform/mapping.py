"""MAP stage: a decoded change becomes the ClickHouse rows that apply it.

Knows Debezium's change semantics (ops, before/after images) and the target tables' types;
knows nothing of Kafka or of how rows reach ClickHouse.

* A dimension change is one row per key with a version that orders changes of that key
  (`_version`, see `row_version`) and `_is_deleted` for deletes.
* A fact change is signed rows (+1 for the new image, -1 for the old one) as
  `consumer.transform.fact_rules` declares them for both lanes.
"""

from __future__ import annotations

import datetime as dt
import logging
import tomllib
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from functools import cached_property
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any, Literal

from cachetools import LRUCache

from consumer.core.errors import MappingError
from consumer.core.identifiers import BadIdentifier, check_identifier, is_identifier
from consumer.core.types import UNCHANGED_TOAST, ChangeEvent
from consumer.transform.clickhouse_types import Converter, OutOfRange, canonical_type, converter_for, unwrap
from consumer.transform.fact_rules import FACT_RULES

# A column whose new value is "whatever it was": the sink fills in the previous value.
KEEP_PREVIOUS = UNCHANGED_TOAST

log = logging.getLogger(__name__)

DEFAULT_MAPPING = resources.files("consumer.transform") / "default_mapping.toml"
# Decimal places ClickHouse's Decimal(38, S) of an added column can hold.
MAX_ADDED_DECIMAL_SCALE = 38
# Unmapped source columns logged once each: bounded, as change events choose the names.
IGNORED_COLUMNS_KEPT = 10_000
# A version is UInt128: the LSN in its upper 64 bits.
MAX_LSN = 2**64 - 1


@dataclass(frozen=True)
class ColumnMapping:
    name: str
    clickhouse_type: str
    source: str
    convert: Converter = field(repr=False, compare=False)
    zero: Any = field(repr=False, compare=False)

    @property
    def nullable(self) -> bool:
        return unwrap(self.clickhouse_type)[1]

    def of_type(self, clickhouse_type: str) -> ColumnMapping:
        """This column as one of another type (ValueError for a type outside the allow-list)."""
        clickhouse_type = canonical_type(clickhouse_type)
        return ColumnMapping(self.name, clickhouse_type, self.source, *converter_for(clickhouse_type))


@dataclass(frozen=True)
class TableMapping:
    table: str
    topic: str
    role: Literal["dimension", "fact"]
    key: tuple[str, ...]
    columns: tuple[ColumnMapping, ...]
    # What to do with source columns the mapping does not name: "ignore" them (logged once), or
    # "add" them to the ClickHouse table as Nullable columns of the type their values have.
    extra_columns: Literal["ignore", "add"] = "ignore"
    # The Postgres table whose changes the topic carries (Debezium's `source.table`); "" means the
    # topic name's last part, as Debezium names topics `<prefix>.<schema>.<table>`.
    source_table: str = ""

    @property
    def expected_table(self) -> str:
        return self.source_table or self.topic.rsplit(".", 1)[-1]

    @cached_property
    def sources(self) -> frozenset[str]:
        return frozenset(c.source for c in self.columns)

    def with_columns(self, added: list[ColumnMapping]) -> TableMapping:
        return replace(self, columns=self.columns + tuple(added))

    @property
    def column_names(self) -> list[str]:
        """Target columns in insert order, bookkeeping columns last."""
        extra = ["_version", "_is_deleted"] if self.role == "dimension" else ["_sign"]
        return [c.name for c in self.columns] + extra


@dataclass(frozen=True)
class Mapping:
    tables: tuple[TableMapping, ...]

    def for_topic(self, topic: str) -> TableMapping | None:
        return self._by_topic.get(topic)

    @property
    def topics(self) -> list[str]:
        return [t.topic for t in self.tables]

    @property
    def _by_topic(self) -> dict[str, TableMapping]:
        return {t.topic: t for t in self.tables}

    def replaced(self, table: TableMapping) -> Mapping:
        return Mapping(tuple(table if t.table == table.table else t for t in self.tables))


def load_mapping(path: Traversable | None = None, topic_prefix: str = "adtech") -> Mapping:
    """Read a mapping file; every problem is reported with the table and column it concerns."""
    path = path or DEFAULT_MAPPING
    try:
        document = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"mapping {path}: {exc}") from None
    tables = []
    for table, spec in document.get("tables", {}).items():
        where = f"mapping {path}, table {table}"
        try:
            tables.append(_table_mapping(table, spec, where, topic_prefix))
        except BadIdentifier as exc:
            raise ValueError(f"{where}: {exc}") from None
    topics = [t.topic for t in tables]
    if len(set(topics)) != len(topics):
        raise ValueError(f"mapping {path}: a topic is mapped to more than one table")
    return Mapping(tuple(tables))


def _table_mapping(table: str, spec: dict[str, Any], where: str, topic_prefix: str) -> TableMapping:
    """One table of a mapping file; every name that reaches SQL is checked, every type parsed."""
    check_identifier(table, "table")
    if spec.get("role") not in ("dimension", "fact"):
        raise ValueError(f"{where}: role must be 'dimension' or 'fact', not {spec.get('role')!r}")
    if "topic" not in spec or not spec.get("columns"):
        raise ValueError(f"{where}: needs `topic` and `columns`")
    columns = []
    for name, column in spec["columns"].items():
        check_identifier(name, "column")
        column_type, source = (
            (column, name) if isinstance(column, str) else (column["type"], column.get("source", name))
        )
        try:
            column_type = canonical_type(column_type)
            columns.append(ColumnMapping(name, column_type, source, *converter_for(column_type)))
        except ValueError as exc:
            raise ValueError(f"{where}, column {name}: {exc}") from None
    key = tuple(check_identifier(k, "key column") for k in spec.get("key", ["id"]))
    missing_key = set(key) - {c.name for c in columns}
    if missing_key:
        raise ValueError(f"{where}: key columns {sorted(missing_key)} are not mapped")
    extra = spec.get("extra_columns", "ignore")
    if extra not in ("ignore", "add"):
        raise ValueError(f"{where}: extra_columns must be 'ignore' or 'add', not {extra!r}")
    topic = spec["topic"].format(prefix=topic_prefix)
    source_table = spec.get("source_table", "")
    return TableMapping(table, topic, spec["role"], key, tuple(columns), extra, source_table)


def row_version(lsn: int | None, tiebreak: int) -> int:
    """Orders the changes of one key: Postgres' LSN first, the caller's tiebreak (the Kafka
    offset) second, so a re-snapshot of an unchanged row (same LSN) still never ties. An LSN
    outside [0, 2^64) makes no UInt128 version: MappingError("lsn_out_of_range")."""
    lsn = lsn or 0
    if not 0 <= lsn <= MAX_LSN:
        raise MappingError("lsn_out_of_range", f"source.lsn {lsn} is outside [0, 2^64)")
    return (lsn << 64) | tiebreak


class NewColumns(Exception):
    """The source table gained columns that the mapping adds to ClickHouse (extra_columns="add")."""

    def __init__(self, table: TableMapping, columns: list[ColumnMapping]):
        super().__init__(f"{table.table}: new columns {[c.name for c in columns]}")
        self.table = table
        self.columns = columns


def infer_column(name: str, value: Any) -> ColumnMapping | None:
    """A Nullable ClickHouse column for a new source column, from a decoded value's type;
    MappingError for a decimal with more places than ClickHouse's Decimal(38, S) holds."""
    if isinstance(value, bool):
        inner = "Bool"
    elif isinstance(value, int):
        inner = "Int64"
    elif isinstance(value, float):
        inner = "Float64"
    elif isinstance(value, Decimal):
        exponent = value.as_tuple().exponent
        scale = max(0, -exponent) if isinstance(exponent, int) else 0
        if scale > MAX_ADDED_DECIMAL_SCALE:
            raise MappingError(
                "decimal_scale_out_of_range",
                f"new column {name!r}: {scale} decimal places, more than a Decimal(38, S) can hold",
            )
        inner = f"Decimal(38, {scale})"
    elif isinstance(value, dt.datetime):
        inner = "DateTime64(6, 'UTC')"
    elif isinstance(value, dt.date):
        inner = "Date32"
    elif isinstance(value, str):
        inner = "String"
    else:
        return None
    clickhouse_type = f"Nullable({inner})"
    return ColumnMapping(name, clickhouse_type, name, *converter_for(clickhouse_type))


class Mapper:
    """Turns one change into rows (tuples in `TableMapping.column_names` order)."""

    def __init__(self, mapping: Mapping, truncate_action: Literal["dlq", "skip"] = "dlq"):
        self.mapping = mapping
        self.truncate_action = truncate_action
        self._ignored: LRUCache[tuple[str, str], bool] = LRUCache(IGNORED_COLUMNS_KEPT)

    def rows(self, table: TableMapping, event: ChangeEvent, tiebreak: int) -> list[tuple]:
        if event.table != table.expected_table:
            # A valid change of another table (its writer schema, its source.table) in this topic:
            # its columns may well fit (a click has every column of an impression), so it must
            # not be applied here.
            raise MappingError(
                "table_mismatch",
                f"a change of table {event.table!r} in topic {table.topic}, which carries table "
                f"{table.expected_table!r} (mapped to {table.table}); set `source_table` in the mapping "
                "if a router renamed the topic",
            )
        if event.op == "t":
            if self.truncate_action == "skip":
                log.warning("TRUNCATE of %s skipped (truncate_action=skip)", event.table)
                return []
            raise MappingError("truncate", f"TRUNCATE of {event.table} is not applied (truncate_action=dlq)")
        if event.before:
            _check_column_names(table, event.before)
        if event.after:
            _check_column_names(table, event.after)
            self._check_new_columns(table, event.after)
        if table.role == "dimension":
            return [self._dimension_row(table, event, tiebreak)]
        return self._fact_rows(table, event)

    def _check_new_columns(self, table: TableMapping, image: dict[str, Any]) -> None:
        # (A Nullable column absent from an event is NULL: events written before the source
        # column existed keep flowing from other partitions after the table was widened.)
        unknown = image.keys() - table.sources
        if not unknown:
            return
        added = []
        for name in sorted(unknown):
            if (table.table, name) in self._ignored:
                continue
            column = infer_column(name, image[name]) if table.extra_columns == "add" else None
            if column is not None:
                added.append(column)
            elif table.extra_columns == "ignore" or image[name] not in (None, UNCHANGED_TOAST):
                log.info("%s: source column %r is not mapped; ignored", table.table, name)
                self._ignored[(table.table, name)] = True
        if added:
            raise NewColumns(table, added)

    def key(self, table: TableMapping, event: ChangeEvent) -> tuple:
        """The changed row's key in the table's types: from the after-image, a delete's before-image."""
        side = "before" if event.op == "d" else "after"
        image = _require(getattr(event, side), event, side)
        by_name = {c.name: c for c in table.columns}
        return tuple(self._convert(table, by_name[k], image) for k in table.key)

    def _dimension_row(self, table: TableMapping, event: ChangeEvent, tiebreak: int) -> tuple:
        version = row_version(event.lsn, tiebreak)
        if event.op == "d":
            if event.before is None:
                raise MappingError("missing_before_image", f"delete on {event.table} without a before-image")
            key = set(table.key)
            values = [self._convert(table, c, event.before) if c.name in key else c.zero for c in table.columns]
            return (*values, version, 1)
        if event.after is None:
            raise MappingError("missing_after_image", f"op {event.op!r} on {event.table} without an after-image")
        return (*self._image(table, event.after), version, 0)

    def _fact_rows(self, table: TableMapping, event: ChangeEvent) -> list[tuple]:
        rule = FACT_RULES.get(event.op)
        if rule is None:
            raise MappingError("unsupported_op", f"op {event.op!r} on fact table {event.table} has no fact rule")
        rows = []
        for signed in rule.rows:
            image = _require(getattr(event, signed.side), event, signed.side)
            if signed.must_be_complete and any(
                image.get(c.source) is None and c.name not in table.key for c in table.columns
            ):
                raise MappingError(
                    f"incomplete_{signed.side}_image",
                    f"{event.op!r} on fact table {event.table} lacks its full {signed.side}-image; "
                    "set REPLICA IDENTITY FULL on the source table",
                )
            rows.append((*self._image(table, image), signed.sign))
        return rows

    def _image(self, table: TableMapping, image: dict[str, Any]) -> list[Any]:
        return [self._convert(table, column, image) for column in table.columns]

    @staticmethod
    def _convert(table: TableMapping, column: ColumnMapping, image: dict[str, Any]) -> Any:
        value = image.get(column.source)
        if value is UNCHANGED_TOAST:
            if table.role == "fact":
                raise MappingError(
                    "unchanged_toast_in_fact",
                    f"{table.table}.{column.name}: TOAST placeholder in a fact; facts need REPLICA IDENTITY FULL",
                )
            return KEEP_PREVIOUS
        if value is None:
            nullable = column.nullable
            if column.source not in image and not nullable:
                raise MappingError(
                    "missing_column",
                    f"{table.table}.{column.name}: source column {column.source!r} is not in the change event",
                )
            if not nullable:
                raise MappingError("null_value", f"{table.table}.{column.name}: NULL for a non-Nullable column")
            return None
        try:
            return column.convert(value)
        except OutOfRange as exc:
            raise MappingError(
                exc.error_class, f"{table.table}.{column.name} ({column.clickhouse_type}): {exc}"
            ) from None
        except OverflowError as exc:
            raise MappingError("value_out_of_range", f"{table.table}.{column.name}: {exc}") from None
        except (TypeError, ValueError, InvalidOperation, ArithmeticError) as exc:
            raise MappingError("bad_value", f"{table.table}.{column.name} ({column.clickhouse_type}): {exc}") from None


def _check_column_names(table: TableMapping, image: dict[str, Any]) -> None:
    """Every column name of a change event is an identifier (consumer.core.identifiers), so none
    can reach SQL through schema evolution: the change is dead-lettered whole otherwise. Mapped
    names were checked when the mapping was read; only the others are looked at."""
    if image.keys() <= table.sources:
        return
    for name in image.keys() - table.sources:
        if not is_identifier(name):
            raise MappingError(
                "bad_identifier",
                f"{table.table}: the change event carries a column {_shown(name)} that is not an identifier "
                "([A-Za-z_][A-Za-z0-9_]{0,62}); nothing of it is applied",
            )


def _shown(name: str, limit: int = 80) -> str:
    text = repr(name)
    return text if len(text) <= limit else text[:limit] + "…"


def _require(image: dict[str, Any] | None, event: ChangeEvent, side: str) -> dict[str, Any]:
    if image is None:
        raise MappingError(f"missing_{side}_image", f"op {event.op!r} on {event.table} without a {side}-image")
    return image
