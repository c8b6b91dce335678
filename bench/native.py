"""Phase 3: ClickHouse's own Avro ingest of the same messages, the yardstick.

The benchmark's topics are read from Kafka once (not measured), then each topic's message values
go to ClickHouse as ONE stream, `INSERT INTO <staging> FORMAT AvroConfluent` with
`format_avro_schema_registry_url` (ClickHouse fetches the writer schemas itself). The staging
tables are `ENGINE = Null` with one materialized view each that maps the Debezium envelope onto
the same star-schema tables (migrations of clickhouse/): facts as signed rows (+1 after-image,
-1 before-image), dimensions as versioned rows (`_version` from the LSN, deletes marked). That is
the plain SQL a ClickHouse-only pipeline would run: no validation, no Kafka coordinates (0), no
unchanged-TOAST resolution (the placeholder is written as it comes). Measured: the ClickHouse
server's CPU seconds (/proc) and wall time of the inserts.
"""

from __future__ import annotations

import time
from typing import Any

import requests

from bench import procstat
from consumer.decode.avro_schema import fields_by_name, named_types, resolve, strip
from consumer.sink.migrate import apply_migrations
from consumer.sink.server_plan import fan_out_sql, image_record, staging_field, tuple_type
from consumer.transform.clickhouse_types import quote_identifier, sql_string, unwrap
from consumer.transform.fact_rules import FACT_RULES
from consumer.transform.mapping import Mapping, TableMapping


def _convert(column, img: str) -> str:
    inner, _nullable = unwrap(column.clickhouse_type)
    v = f"{img}.{quote_identifier(column.source)}"
    if inner.startswith("DateTime64"):
        return f"parseDateTime64BestEffortOrZero({v}, 6, 'UTC')"
    return f"CAST({v} AS {column.clickhouse_type})"


def native_ddl(
    table: TableMapping,
    writer: dict[str, Any],
    *,
    staging_prefix: str = "native",
    engine: str = "Null",
    coordinates: tuple[str, str, str] | None = None,
) -> tuple[str, list[str]]:
    """(staging table name, DDL) for one topic: a staging table (`engine`: Null for the insert,
    or a Kafka table) and its view into `table`. `coordinates`: SQL for the rows' topic,
    partition and offset read from the staging table (a Kafka table's virtual columns); constants
    by default."""
    topic_sql, partition_sql, offset_sql = coordinates or (sql_string(table.topic), "0", "0")
    carry = f"{topic_sql} AS k_topic, toUInt32({partition_sql}) AS k_partition, toUInt64({offset_sql}) AS k_offset"
    envelope = strip(writer)
    named = named_types(envelope)
    record = image_record(envelope, named)
    image = tuple_type([staging_field(f["name"], f["type"], named) for f in record["fields"]])
    source_node = resolve(fields_by_name(envelope)["source"]["type"], named)
    source = tuple_type([staging_field(f["name"], f["type"], named) for f in source_node["fields"]])
    staging = f"{staging_prefix}_in_{table.table}"
    ddl = [
        f"CREATE TABLE {staging} (op String, before Nullable({image}), after Nullable({image}), "
        f"source {source}) ENGINE = {engine}"
    ]
    if table.role == "fact":
        columns = ",\n    ".join(f"{_convert(c, 'img')} AS {quote_identifier(c.name)}" for c in table.columns)
        ddl.append(
            f"""CREATE MATERIALIZED VIEW {staging_prefix}_mv_{table.table} TO {table.table} AS
SELECT
    {columns},
    s AS _sign, k_topic AS _topic, k_partition AS _partition, k_offset AS _offset
FROM
(
    SELECT arrayJoin({fan_out_sql(tuple(FACT_RULES.values()))}) AS r, r.1 AS img, r.2 AS s, {carry}
    FROM {staging}
)"""
        )
    else:
        key = set(table.key)
        columns = ",\n    ".join(
            f"{_convert(c, 'img')} AS {quote_identifier(c.name)}"
            if c.name in key
            else f"if(op = 'd', defaultValueOfArgumentType({_convert(c, 'img')}), {_convert(c, 'img')}) "
            f"AS {quote_identifier(c.name)}"
            for c in table.columns
        )
        ddl.append(
            f"""CREATE MATERIALIZED VIEW {staging_prefix}_mv_{table.table} TO {table.table} AS
SELECT
    {columns},
    bitOr(bitShiftLeft(toUInt128(ifNull(source.lsn, 0)), 64), k_offset) AS _version,
    toUInt8(op = 'd') AS _is_deleted,
    k_topic AS _topic, k_partition AS _partition, k_offset AS _offset
FROM (SELECT *, if(op = 'd', assumeNotNull(before), assumeNotNull(after)) AS img, {carry} FROM {staging})
WHERE op IN ('c', 'r', 'u', 'd')"""
        )
    return staging, ddl


def run_native(
    *,
    ch_client,
    clickhouse_url: str,
    database: str,
    registry_url: str,
    mapping: Mapping,
    writer_schemas: dict[str, dict],
    messages_by_topic: dict[str, list[bytes]],
    events: int,
    clickhouse_pid: int | None,
    progress=print,
) -> dict:
    ch_client.command(f"DROP DATABASE IF EXISTS {database}")
    ch_client.command(f"CREATE DATABASE {database}")
    import clickhouse_connect

    db = clickhouse_connect.get_client(dsn=f"{clickhouse_url}/{database}", send_receive_timeout=600)
    apply_migrations(db)
    stagings = {}
    for table in mapping.tables:
        staging, ddl = native_ddl(table, writer_schemas[table.topic])
        for statement in ddl:
            db.command(statement)
        stagings[table.topic] = staging
    settle_s = procstat.merges_settled(ch_client)
    idle = procstat.idle_cpu_rate(clickhouse_pid) if clickhouse_pid else 0.0
    per_topic = {}
    inserts_cpu = wall_total = 0.0
    phase_cpu0 = procstat.cpu_seconds(clickhouse_pid) if clickhouse_pid else 0.0
    phase_started = time.monotonic()
    for topic, values in messages_by_topic.items():
        body = b"".join(values)
        cpu0 = procstat.cpu_seconds(clickhouse_pid) if clickhouse_pid else 0.0
        started = time.monotonic()
        response = requests.post(
            clickhouse_url,
            params={
                "query": f"INSERT INTO {stagings[topic]} FORMAT AvroConfluent",
                "database": database,
                "format_avro_schema_registry_url": registry_url,
                "async_insert": "0",
            },
            data=body,
            timeout=1800,
        )
        wall = time.monotonic() - started
        cpu = (procstat.cpu_seconds(clickhouse_pid) - cpu0 - idle * wall) if clickhouse_pid else 0.0
        if response.status_code != 200:
            raise RuntimeError(f"native insert into {stagings[topic]} failed: {response.text[:2000]}")
        per_topic[topic] = {
            "messages": len(values),
            "bytes": len(body),
            "wall_s": round(wall, 3),
            "cpu_s": round(cpu, 3),
        }
        inserts_cpu += max(cpu, 0.0)
        wall_total += wall
        progress(f"  {topic}: {len(values):,} messages in {wall:.2f}s, ClickHouse {cpu:.2f} CPU-s")
    # The merges of what the inserts wrote are part of the ingest's cost, as they are of ours.
    merges_s = procstat.merges_settled(ch_client)
    cpu_total = 0.0
    if clickhouse_pid:
        elapsed = time.monotonic() - phase_started
        cpu_total = max(inserts_cpu, procstat.cpu_seconds(clickhouse_pid) - phase_cpu0 - idle * elapsed)
    counts = {
        t.table: int(
            db.query(f"SELECT {'sum(_sign)' if t.role == 'fact' else 'count()'} FROM {t.table}").result_rows[0][0]
        )
        for t in mapping.tables
    }
    return {
        "database": database,
        "events": events,
        "wall_s": round(wall_total, 3),
        "events_per_s": round(events / wall_total, 1) if wall_total else None,
        "clickhouse_cpu_s": round(cpu_total, 3),
        "clickhouse_idle_cpu_per_s": round(idle, 4),
        "clickhouse_inserts_cpu_s": round(inserts_cpu, 3),
        "clickhouse_quiet_before_s": settle_s,
        "clickhouse_merges_after_s": merges_s,
        "cpu_s_per_million": round(cpu_total * 1e6 / events, 3),
        "events_per_cpu_s": round(events / cpu_total, 1) if cpu_total else None,
        "per_topic": per_topic,
        "rows": counts,
    }
