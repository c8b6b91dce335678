"""SINK stage: rows into ClickHouse, and what ClickHouse already holds.

Knows tables, columns and versions; nothing of Debezium or Kafka beyond the three
coordinate columns every row carries (`_topic`, `_partition`, `_offset`).
"""

from __future__ import annotations

import bisect
import logging
import sys
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import clickhouse_connect
from clickhouse_connect.driver.client import Client
from pydantic import SecretStr

from consumer.core.identifiers import check_identifier, quote
from consumer.core.secrets import hide_password, redact_secrets
from consumer.sink.cluster_ddl import local_name
from consumer.sink.migrate import applied_offsets
from consumer.transform.clickhouse_types import canonical_type, sql_string
from consumer.transform.mapping import KEEP_PREVIOUS, TableMapping

log = logging.getLogger(__name__)

# The comment schema evolution gives the columns it adds: they are counted by it.
EVOLVED_COMMENT = "cdc: added by schema evolution"

# Each insert is synchronous and deduplicated by its token: a retried batch is dropped by
# ClickHouse (with non_replicated_deduplication_window on the table and its MV targets).
INSERT_SETTINGS = {
    "async_insert": 0,
    "insert_deduplicate": 1,
    "deduplicate_blocks_in_dependent_materialized_views": 1,
}


class UnresolvedPrevious(Exception):
    """Rows that carry KEEP_PREVIOUS for a key ClickHouse has never seen, by (partition, offset)."""

    def __init__(self, changes: list[tuple[int, int]], table: str):
        super().__init__(f"{table}: no previous value for unchanged columns (partition, offset: {changes[:5]}…)")
        self.changes = changes


def _lists_only() -> None:
    """The consumer hands clickhouse-connect Python lists, never a DataFrame or an ndarray. Its
    insert path asks of every data argument whether it is one, and the first such question
    imports pandas and numpy, which chdb-core installs: a large share of the consumer's start-up
    CPU and peak memory (bench/README.md). Saying neither is installed skips both."""
    from clickhouse_connect.driver import options

    options.pd = None
    options.np = None


def connect(
    url: str | None,
    embedded_path: Path | None = None,
    database: str | None = None,
    compress: bool = False,
    *,
    user: str | None = None,
    password: SecretStr | str | None = None,
    ca_cert: Path | None = None,
    client_cert: Path | None = None,
    client_key: Path | None = None,
    verify: bool = True,
    timeout_s: float = 120.0,
) -> Client:
    """A client for `CDC_CLICKHOUSE_URL` (http[s]://[user:password@]host:port/database), or, with
    no URL, an embedded ClickHouse (chDB) keeping its data in `embedded_path`. `compress`: LZ4 on
    inserts and results, for a ClickHouse across a slow network; it costs CPU on both ends
    (bench/README.md), and TOASTed values are often incompressible anyway.

    `user` and `password` stand in for the URL's; over https the server's certificate is verified
    (against `ca_cert` when given) unless `verify` is off, and `client_cert`/`client_key`
    authenticate the consumer to a server that asks for a certificate. `timeout_s` bounds each
    request (a server that stopped answering fails it). Errors name the URL with its password
    redacted."""
    _lists_only()
    if not url:
        path = embedded_path or Path(".cdc-clickhouse")
        path.mkdir(parents=True, exist_ok=True)
        return clickhouse_connect.get_client(interface="chdb", path=str(path), database=database)
    shown = hide_password(url)
    try:
        parsed = urlparse(url)
        port = parsed.port
    except ValueError:  # without the parser's words: they quote the part it choked on, maybe the password
        raise ValueError(f"CDC_CLICKHOUSE_URL {shown!r} is not a URL (a bad host or port)") from None
    if parsed.scheme not in ("http", "https"):
        raise ValueError(f"CDC_CLICKHOUSE_URL must be http(s)://host:port[/database], not {shown!r}")
    if isinstance(password, SecretStr):
        password = password.get_secret_value()
    options = {
        "host": parsed.hostname,
        "port": port or (8443 if parsed.scheme == "https" else 8123),
        "username": user or unquote(parsed.username or "default"),
        "password": password if password is not None else unquote(parsed.password or ""),
        "secure": parsed.scheme == "https",
        "connect_timeout": 10,
        "send_receive_timeout": timeout_s,
        "autogenerate_session_id": False,
        "compress": compress,
    }
    if parsed.scheme == "https":
        options["verify"] = verify
        options.update(
            (name, str(path))
            for name, path in (("ca_cert", ca_cert), ("client_cert", client_cert), ("client_cert_key", client_key))
            if path is not None
        )
    database = database or parsed.path.strip("/") or None
    if database:
        check_identifier(database, "CDC_CLICKHOUSE_URL's database")
    try:
        if database:
            # The consumer owns its database: create it on first start, like its tables.
            clickhouse_connect.get_client(**options).command(f"CREATE DATABASE IF NOT EXISTS {quote(database)}")
        return clickhouse_connect.get_client(**options, database=database)
    except Exception as exc:
        # Re-raised without the original: its text and its chain may hold the URL as given.
        text = redact_secrets(f"cannot connect to ClickHouse at {shown}: {exc}", url, options["password"])
        raise ConnectionError(text) from None


class AppliedOffsets:
    """Which offsets of one partition ClickHouse holds rows of, as sorted inclusive runs."""

    def __init__(self, runs: list[tuple[int, int]] | None = None):
        self.runs = sorted(runs or [])
        self._starts = [lo for lo, _ in self.runs]

    def __contains__(self, offset: int) -> bool:
        i = bisect.bisect_right(self._starts, offset) - 1
        return i >= 0 and self.runs[i][1] >= offset

    def __len__(self) -> int:
        return len(self.runs)


class LatestRows:
    """The last row applied for each key of one dimension partition: the next change's unchanged
    (TOASTed) columns are filled from it without asking ClickHouse — a look-up that reads every
    stored version of the large column, and grows with the table.

    Kept per partition and per assignment (another consumer may apply changes in between) and
    trusted only for a change at a later offset: a partition read again from an earlier offset,
    after a failed insert, asks ClickHouse. The least recently used keys go beyond `capacity`
    keys or `max_bytes` (Python's size of the rows and their values): the rows carry the large
    columns, so a key count alone would let memory grow with the size of the values."""

    def __init__(self, capacity: int, max_bytes: int):
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.bytes = 0
        self._rows: OrderedDict[tuple, tuple[int, tuple, int]] = OrderedDict()

    def before(self, key: tuple, offset: int) -> tuple | None:
        """The key's row applied from an offset below `offset`, if kept."""
        entry = self._rows.get(key)
        if entry is None or entry[0] >= offset:
            return None
        self._rows.move_to_end(key)
        return entry[1]

    def remember(self, key: tuple, offset: int, row: tuple | None) -> None:
        """The key's row applied from `offset`; None: deleted (ClickHouse knows what follows)."""
        old = self._rows.pop(key, None)
        if old is not None:
            self.bytes -= old[2]
        if row is None or not self.capacity:
            return
        size = sys.getsizeof(row) + sum(map(sys.getsizeof, row))
        if size > self.max_bytes:
            return
        self._rows[key] = (offset, row, size)
        self.bytes += size
        while len(self._rows) > self.capacity or self.bytes > self.max_bytes:
            self.bytes -= self._rows.popitem(last=False)[1][2]

    def __len__(self) -> int:
        return len(self._rows)


class ClickHouseSink:
    """One ClickHouse server. On a cluster, one shard's: `local` writes and reads its shard-local
    tables (`<table>_local`, consumer.sink.cluster_ddl), which hold every row of the Kafka
    partitions routed to it (consumer.sink.shards)."""

    def __init__(self, client: Client, local: bool = False):
        self.client = client
        self.local = local

    def answers(self, timeout_s: float) -> bool:
        """The server answers a ping within `timeout_s`."""
        return self.client.ping(timeout=timeout_s)

    def stored(self, table: str) -> str:
        """The table that holds `table`'s rows on this server."""
        return local_name(table) if self.local else table

    def applied_offsets(self, table: str, topic: str) -> dict[int, int]:
        """partition → highest Kafka offset whose rows are in `table` (the applied watermark)."""
        return applied_offsets(self.client, self.stored(table), topic)

    def applied_in_ranges(self, table: str, topic: str, ranges: dict[int, range]) -> dict[int, AppliedOffsets]:
        """partition → the offsets inside `ranges[partition]` whose rows are in `table`.

        Exact where the watermark is not: a replay beside the live consumer, or after data was
        dropped and the live consumer went on above it, finds a gap *below* rows it must not
        re-apply. Runs of consecutive offsets are computed in ClickHouse; partitions whose
        watermark lies below the range need no scan at all."""
        watermarks = self.applied_offsets(table, topic)
        scan = {p: r for p, r in ranges.items() if len(r) and watermarks.get(p, -1) >= r.start}
        if not scan:
            return {}
        condition = " OR ".join(
            f"(_partition = {int(p)} AND _offset >= {int(r.start)} AND _offset < {int(r.stop)})"
            for p, r in scan.items()
        )
        result = self.client.query(
            f"""
            SELECT _partition, min(o), max(o) FROM (
                SELECT _partition, o, toInt64(o) - toInt64(row_number() OVER (PARTITION BY _partition ORDER BY o)) AS run
                FROM (SELECT DISTINCT _partition, _offset AS o FROM {quote(self.stored(table))} WHERE _topic = {{topic:String}} AND ({condition}))
            ) GROUP BY _partition, run""",
            parameters={"topic": topic},
        )
        runs: dict[int, list[tuple[int, int]]] = {}
        for p, lo, hi in result.result_rows:
            runs.setdefault(int(p), []).append((int(lo), int(hi)))
        return {p: AppliedOffsets(r) for p, r in runs.items()}

    def add_columns(self, table: str, columns: list[tuple[str, str]], evolved: bool = False) -> None:
        """New columns, idempotently (another consumer may have added them): the mapping's, or,
        `evolved`, those schema evolution adds (marked so by their comment). Every name is checked
        and quoted, every type parsed (consumer.core.identifiers, canonical_type)."""
        comment = f" COMMENT {sql_string(EVOLVED_COMMENT)}" if evolved else ""
        # On a shard, the local table first: its Distributed table must not name a column it lacks.
        statements = [
            f"ALTER TABLE {quote(stored, 'table')} ADD COLUMN IF NOT EXISTS {quote(name, 'column')} "
            f"{canonical_type(clickhouse_type)}{comment}"
            for stored in dict.fromkeys([self.stored(table), table])
            for name, clickhouse_type in columns
        ]
        for statement in statements:
            log.info("%s", statement)
            self.client.command(statement)

    def columns(self, table: str) -> dict[str, tuple[str, str]]:
        """name → (type, comment) of the table's columns."""
        rows = self.client.query(
            "SELECT name, type, comment FROM system.columns WHERE database = currentDatabase() AND table = {t:String}",
            parameters={"t": self.stored(table)},
        ).result_rows
        return {name: (column_type, comment) for name, column_type, comment in rows}

    def evolved_columns(self, table: str) -> set[str]:
        """The columns schema evolution added to the table."""
        return {name for name, (_, comment) in self.columns(table).items() if comment == EVOLVED_COMMENT}

    def missing_columns(self, table: TableMapping) -> list[tuple[str, str]]:
        existing = self.columns(table.table)
        return [(c.name, c.clickhouse_type) for c in table.columns if c.name not in existing]

    def insert(
        self,
        table: TableMapping,
        column_names: list[str],
        rows: list[tuple],
        token: str,
        assertions: set[int] | frozenset[int] = frozenset(),
        latest: Mapping[tuple[str, int], LatestRows | None] | None = None,
    ) -> None:
        """`latest`: for dimension tables, the rows last applied per (topic, partition), used
        for unchanged columns and updated once the insert returned."""
        latest = latest or {}
        if table.role == "dimension":
            rows = self.fill_previous(table, column_names, rows, latest)
        elif assertions:
            rows = self._reconcile_assertions(table, column_names, rows, assertions)
        if not rows:
            return
        self.client.insert(
            self.stored(table.table),
            rows,
            column_names=column_names,
            settings={**INSERT_SETTINGS, "insert_deduplication_token": token},
        )
        if table.role == "dimension" and latest:
            at = _Coordinates(table, column_names)
            for row in rows:
                kept = latest.get((row[at.topic], row[at.partition]))
                if kept is not None:
                    kept.remember(at.key(row), row[at.offset], None if row[at.deleted] else row)

    def _reconcile_assertions(
        self, table: TableMapping, column_names: list[str], rows: list[tuple], assertions: set[int] | frozenset[int]
    ) -> list[tuple]:
        """A fact row that asserts a state (+1, "this fact exists like so") is applied only as
        far as ClickHouse does not already hold that state: nothing if the fact is live with the
        same values, a retraction of the live image plus the new one if its values differ."""
        key_index = [column_names.index(k) for k in table.key]
        sign_index = column_names.index("_sign")
        values = [c.name for c in table.columns]
        value_index = [column_names.index(c) for c in values]
        live = self._live_facts(table, values, {tuple(rows[i][k] for k in key_index) for i in assertions})
        result = []
        for i, row in enumerate(rows):
            key = tuple(row[k] for k in key_index)
            image = tuple(row[v] for v in value_index)
            if i in assertions and key in live:
                if live[key] == image:
                    continue
                retraction = list(row)
                for position, old in zip(value_index, live[key], strict=True):
                    retraction[position] = old
                retraction[sign_index] = -1
                result.append(tuple(retraction))
            result.append(row)
            if row[sign_index] > 0:
                live[key] = image
            else:
                live.pop(key, None)
        return result

    def _live_facts(self, table: TableMapping, values: list[str], keys: set[tuple]) -> dict[tuple, tuple]:
        """key → current image of the live facts among `keys` (sum of signs > 0)."""
        key_list = _column_list(table.key)
        width = len(table.key)
        live = {}
        for condition, parameters in key_conditions(table, keys):
            result = self.client.query(
                f"SELECT {key_list}, argMaxIf(tuple({_column_list(values)}), _offset, _sign > 0) "
                f"FROM {quote(self.stored(table.table))} "
                f"WHERE {condition} GROUP BY {key_list} HAVING sum(_sign) > 0",
                parameters=parameters,
            )
            live.update((tuple(record[:width]), tuple(record[width])) for record in result.result_rows)
        return live

    def fill_previous(
        self,
        table: TableMapping,
        column_names: list[str],
        rows: list[tuple],
        latest: Mapping[tuple[str, int], LatestRows | None] | None = None,
    ) -> list[tuple]:
        """Replace KEEP_PREVIOUS by the column's latest value: from earlier rows of this batch,
        else from the rows last applied from the partition (`latest`), else from ClickHouse."""
        latest = latest or {}
        at = _Coordinates(table, column_names)

        def kept(row: tuple, key: tuple) -> tuple | None:
            rows_of_partition = latest.get((row[at.topic], row[at.partition]))
            return None if rows_of_partition is None else rows_of_partition.before(key, row[at.offset])

        seen: set[tuple] = set()
        ask: set[tuple] = set()  # keys whose first row in this batch needs what ClickHouse holds
        for row in rows:
            key = at.key(row)
            if key not in seen and KEEP_PREVIOUS in row and kept(row, key) is None:
                ask.add(key)
            seen.add(key)
        stored = self._latest_rows(table, column_names, ask) if ask else {}
        in_batch: dict[tuple, tuple | None] = {}  # key → its row so far in this batch; None: deleted
        resolved: list[tuple] = []
        unresolved: list[tuple[tuple[int, int], tuple, int]] = []  # ((partition, offset), key, version)
        for row in rows:
            key = at.key(row)
            if KEEP_PREVIOUS in row:
                previous = in_batch[key] if key in in_batch else kept(row, key) or stored.get(key)
                if previous is None:
                    unresolved.append(((row[at.partition], row[at.offset]), key, row[at.version]))
                    continue
                row = tuple(previous[i] if v is KEEP_PREVIOUS else v for i, v in enumerate(row))
            in_batch[key] = None if row[at.deleted] else row
            resolved.append(row)
        if unresolved:
            # A version older than one ClickHouse holds for its key changes nothing under FINAL: a
            # replay re-reading a change whose row ReplacingMergeTree merged away, of a key deleted
            # since (only the delete marker is left to take previous values from). Left out.
            newest = self._newest_versions(table, {key for _, key, _ in unresolved})
            stale = [change for change, key, version in unresolved if newest.get(key, -1) > version]
            if stale:
                log.info("%s: %d superseded change(s) left out (%s…)", table.table, len(stale), stale[:5])
            missing = [change for change, key, version in unresolved if newest.get(key, -1) <= version]
            if missing:
                raise UnresolvedPrevious(missing, table.table)
        return resolved

    def _newest_versions(self, table: TableMapping, keys: set[tuple]) -> dict[tuple, int]:
        """key → the highest _version ClickHouse holds for it, delete markers included."""
        key_list = _column_list(table.key)
        newest: dict[tuple, int] = {}
        for condition, parameters in key_conditions(table, keys):
            result = self.client.query(
                f"SELECT {key_list}, max(_version) FROM {quote(self.stored(table.table))} WHERE {condition} GROUP BY {key_list}",
                parameters=parameters,
            )
            for record in result.result_rows:
                newest[tuple(record[: len(table.key)])] = int(record[len(table.key)])
        return newest

    def _latest_rows(self, table: TableMapping, column_names: list[str], keys: set[tuple]) -> dict[tuple, tuple]:
        value_columns = [c for c in column_names if c not in table.key]
        key_list = _column_list(table.key)
        selected = ", ".join([*map(quote, table.key), *(f"argMax({quote(c)}, _version)" for c in value_columns)])
        latest = {}
        for condition, parameters in key_conditions(table, keys):
            result = self.client.query(
                f"SELECT {selected} FROM {quote(self.stored(table.table))} WHERE {condition} AND _is_deleted = 0 GROUP BY {key_list}",
                parameters=parameters,
            )
            for record in result.result_rows:
                by_name: dict[str, Any] = dict(zip([*table.key, *value_columns], record, strict=True))
                key = tuple(by_name[k] for k in table.key)
                latest[key] = tuple(by_name[c] for c in column_names)
        return latest


class _Coordinates:
    """Where a row of `column_names` keeps its key, version, delete flag and Kafka coordinates."""

    def __init__(self, table: TableMapping, column_names: list[str]):
        self._key = [column_names.index(k) for k in table.key]
        self.version = column_names.index("_version")
        self.deleted = column_names.index("_is_deleted")
        self.topic = column_names.index("_topic")
        self.partition = column_names.index("_partition")
        self.offset = column_names.index("_offset")

    def key(self, row: tuple) -> tuple:
        return tuple(row[i] for i in self._key)


KEYS_PER_QUERY = 2_000  # query parameters travel as HTTP form fields, which have a size limit


def key_conditions(table: TableMapping, keys: set[tuple]) -> list[tuple[str, dict]]:
    """`key IN {keys}` conditions with their parameters, in chunks of KEYS_PER_QUERY keys."""
    key_list = _column_list(table.key)
    ordered = sorted(keys)
    chunks = [ordered[i : i + KEYS_PER_QUERY] for i in range(0, len(ordered), KEYS_PER_QUERY)]
    if len(table.key) == 1:
        # ClickHouse has no 1-tuples: a single-column key is compared as a plain array.
        condition = f"{key_list} IN {{keys:Array({_key_types(table)})}}"
        return [(condition, {"keys": [k[0] for k in chunk]}) for chunk in chunks]
    condition = f"({key_list}) IN {{keys:Array(Tuple({_key_types(table)}))}}"
    return [(condition, {"keys": [tuple(k) for k in chunk]}) for chunk in chunks]


def _column_list(names) -> str:
    return ", ".join(map(quote, names))


def _key_types(table: TableMapping) -> str:
    types = {c.name: c.clickhouse_type for c in table.columns}
    return ", ".join(types[k] for k in table.key)
