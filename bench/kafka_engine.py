"""The peer: ClickHouse's own Kafka table engine consuming the same Debezium Avro topics.

Set up as a ClickHouse user would: per topic a `Kafka` table with `kafka_format =
'AvroConfluent'` and the registry (`format_avro_schema_registry_url`), and a materialized view
that turns each envelope into the star schema's rows (the views of bench/native.py: facts as
signed rows by `arrayJoin` over the before and after images, dimensions as versioned rows), with
the Kafka engine's virtual columns `_topic`, `_partition`, `_offset` as the rows' coordinates
and in the dimensions' `_version` (LSN << 64 | offset), as ours writes them.

It runs in a ClickHouse server of its own (the stack's chdb-core, started here on free ports with
its own data dir): the Kafka engine works in the background of that process, so its CPU is that
process's CPU, and killing or restarting it (the fault variant) touches nothing of ours.

chdb-core's server answers `CREATE TABLE … ENGINE = Kafka` with HTTP 500 "Code: 49 … Shutdown
was called" although the table is created and consumes (../shared/reference.md): the DDL checks
`system.tables` instead of the answer.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import clickhouse_connect

from bench import procstat
from bench.kafka_util import GroupProgress, Partition, end_offsets, last_message_ends
from bench.latency import POLL_S, TABLES, CommitReader, latencies, poll_watermarks, quantile, run_generator
from bench.native import native_ddl
from bench.ours import free_port
from cdc_dev.stack.clickhouse_server import wait_healthy
from cdc_dev.stack.process import terminate
from consumer.sink.migrate import apply_migrations
from consumer.transform.clickhouse_types import sql_string
from consumer.transform.mapping import Mapping

REPO = Path(__file__).resolve().parents[1]
FACT_TABLES = ("fact_impressions", "fact_clicks")

# What the engine does unless told otherwise (ClickHouse 26.9): blocks of up to
# max_insert_block_size rows, flushed at least every stream_flush_interval_ms (7.5 s).
DEFAULTS: dict[str, str] = {}
# Tuned for latency: flush every 0.5 s or 65,536 rows, whichever comes first, polls of at most
# 0.1 s; one consumer per topic (2 cores).
TUNED_LATENCY = {"kafka_flush_interval_ms": "500", "kafka_max_block_size": "65536", "kafka_poll_timeout_ms": "100"}
# Tuned for catching up: the largest blocks, polls of 65,536 messages.
TUNED_THROUGHPUT = {"kafka_max_block_size": "1048576", "kafka_poll_max_batch_size": "65536"}


@dataclass
class PeerServer:
    """A ClickHouse server process of the peer's own (free ports, a data dir of its own)."""

    data_dir: Path
    log: Path
    http_port: int = field(default_factory=free_port)
    tcp_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    restarts: list[float] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 120) -> float:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "cdc_dev.stack.clickhouse_server",
                    "--data-dir",
                    str(self.data_dir),
                    "--http-port",
                    str(self.http_port),
                    "--tcp-port",
                    str(self.tcp_port),
                ],
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            return wait_healthy(self.http_port, timeout=timeout, pid=self.proc.pid)
        except (RuntimeError, TimeoutError) as failed:
            raise RuntimeError(f"{failed}; its log:\n{self.log.read_text(errors='replace')[-3000:]}") from failed

    def kill(self) -> None:
        """SIGKILL: no chance to commit offsets or finish a block."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def restart(self) -> float:
        """kill -9 and start again. chdb-core's server does not start with a Kafka table in its
        metadata ("Load job 'startup table …' failed: Code: 49 … Shutdown was called"), so the
        Kafka tables' metadata files are set aside first and the caller creates them again (with
        the same group: they resume from its committed offsets, as after a real restart). The
        views and the tables they write stay as they are."""
        self.kill()
        began = time.monotonic()
        aside = self.data_dir / "kafka_tables_set_aside"
        aside.mkdir(exist_ok=True)
        for sql in self.data_dir.glob("metadata/*/kafka_in_*.sql"):
            sql.rename(aside / f"{sql.parent.name}.{sql.name}")
        self.start()
        self.restarts.append(round(time.monotonic() - began, 2))
        return self.restarts[-1]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            terminate(self.proc, 30)

    def client(self, database: str | None = None):
        return clickhouse_connect.get_client(
            dsn=self.url + (f"/{database}" if database else ""), send_receive_timeout=600
        )


def kafka_engine_clause(topic: str, *, bootstrap: str, registry: str, group: str, settings: dict[str, str]) -> str:
    options = {
        "kafka_broker_list": bootstrap,
        "kafka_topic_list": topic,
        "kafka_group_name": group,
        "kafka_format": "AvroConfluent",
        "format_avro_schema_registry_url": registry,
        **settings,
    }
    return "Kafka SETTINGS " + ", ".join(
        f"{k} = {v}" if v.isdigit() else f"{k} = {sql_string(v)}" for k, v in options.items()
    )


def create_engine_database(
    server: PeerServer,
    database: str,
    *,
    mapping: Mapping,
    writer_schemas: dict[str, dict],
    bootstrap: str,
    registry: str,
    group: str,
    settings: dict[str, str],
    kafka_tables_only: bool = False,
) -> None:
    """The star schema (the project's migrations), a Kafka table per topic, a view each; with
    `kafka_tables_only`, the Kafka tables again after a restart (see `PeerServer.restart`)."""
    admin = server.client()
    if not kafka_tables_only:
        admin.command(f"CREATE DATABASE {database}")
    db = server.client(database)
    if not kafka_tables_only:
        apply_migrations(db)
    for table in mapping.tables:
        engine = kafka_engine_clause(
            table.topic, bootstrap=bootstrap, registry=registry, group=group, settings=settings
        )
        staging, ddl = native_ddl(
            table,
            writer_schemas[table.topic],
            staging_prefix="kafka",
            engine=engine,
            coordinates=("_topic", "_partition", "_offset"),
        )
        try:
            db.command(ddl[0])
        except Exception as refused:
            if "Shutdown was called" not in str(refused):
                raise
        exists = admin.query(
            "SELECT count() FROM system.tables WHERE database = {d:String} AND name = {t:String}",
            parameters={"d": database, "t": staging},
        ).result_rows[0][0]
        if not exists:
            raise RuntimeError(f"the Kafka table {database}.{staging} was not created")
        if not kafka_tables_only:
            for statement in ddl[1:]:
                db.command(statement)


def drop_kafka_tables(server: PeerServer, database: str) -> None:
    """Stop the engine's consumers (their tables) and keep what they wrote."""
    client = server.client()
    for (name,) in client.query(
        "SELECT name FROM system.tables WHERE database = {d:String} AND engine = 'Kafka'", parameters={"d": database}
    ).result_rows:
        client.command(f"DROP TABLE IF EXISTS {database}.`{name}` SYNC")


def messages_read(server: PeerServer, database: str) -> int:
    rows = (
        server.client()
        .query(
            "SELECT sum(num_messages_read) FROM system.kafka_consumers WHERE database = {d:String}",
            parameters={"d": database},
        )
        .result_rows
    )
    return int(rows[0][0] or 0)


def wait_lag_zero(
    group: GroupProgress, ends: dict[Partition, int], timeout: float, server: PeerServer | None = None
) -> float:
    began = time.monotonic()
    lag = -1
    while time.monotonic() - began < timeout:
        if server is not None and server.proc is not None and server.proc.poll() is not None:
            raise RuntimeError(f"the peer's ClickHouse exited:\n{server.log.read_text(errors='replace')[-3000:]}")
        lag = group.lag(ends)
        if lag == 0:
            return time.monotonic()
        time.sleep(0.25)
    raise RuntimeError(f"the Kafka engine's group not caught up after {timeout}s (lag {lag})")


def run_engine_catchup(
    server: PeerServer,
    *,
    database: str,
    group_id: str,
    mapping: Mapping,
    writer_schemas: dict[str, dict],
    bootstrap: str,
    registry: str,
    ends: dict[Partition, int],
    events: int,
    settings: dict[str, str],
    timeout: float,
    progress=print,
) -> dict:
    """From CREATE to the group's lag 0 and the merges settled; the peer server's CPU from /proc
    (less its idle rate), the wall time from the first message read (as ours: from its first
    message consumed) to lag 0."""
    admin = server.client()
    settle_s = procstat.merges_settled(admin)
    idle = procstat.idle_cpu_rate(server.pid)
    cpu0 = procstat.cpu_seconds(server.pid)
    spawned = time.monotonic()
    group = GroupProgress(bootstrap, group_id, list(ends))
    try:
        create_engine_database(
            server,
            database,
            mapping=mapping,
            writer_schemas=writer_schemas,
            bootstrap=bootstrap,
            registry=registry,
            group=group_id,
            settings=settings,
        )
        started = None
        while started is None and time.monotonic() - spawned < 120:
            if messages_read(server, database) > 0:
                started = time.monotonic()
            else:
                time.sleep(0.05)
        if started is None:
            raise RuntimeError("the Kafka engine read nothing within 120 s")
        done = wait_lag_zero(group, ends, timeout, server)
    finally:
        group.close()
    merges_s = procstat.merges_settled(admin)
    settled = time.monotonic()
    cpu = max(0.0, procstat.cpu_seconds(server.pid) - cpu0 - idle * (settled - spawned))
    drop_kafka_tables(server, database)
    ingest_s = done - started
    result = {
        "database": database,
        "settings": settings,
        "events": events,
        "startup_s": round(started - spawned, 3),
        "ingest_wall_s": round(ingest_s, 3),
        "events_per_s": round(events / ingest_s, 1),
        "clickhouse_cpu_s": round(cpu, 3),
        "clickhouse_idle_cpu_per_s": round(idle, 4),
        "clickhouse_quiet_before_s": settle_s,
        "clickhouse_merges_after_s": merges_s,
        "cpu_s_per_million": round(cpu * 1e6 / events, 3),
        "events_per_cpu_s": round(events / cpu, 1) if cpu else None,
        "parts": int(
            admin.query(
                "SELECT count() FROM system.parts WHERE database = {d:String} AND active", parameters={"d": database}
            ).result_rows[0][0]
        ),
    }
    progress(
        f"  Kafka engine caught up: {result['events_per_s']:,.0f} events/s, "
        f"{result['cpu_s_per_million']} ClickHouse CPU-s per million (settings {settings or 'default'})"
    )
    return result


# ----------------------------------------------------------------------------- faults


def fact_delivery(client, expected_fact_messages: int) -> dict:
    """Lost and duplicated fact changes, by the rows' Kafka coordinates: a change writes one row
    per distinct sign (create +1, delete −1, update −1 and +1), so a coordinate with more rows
    than signs was applied twice, and a fact change without any row was lost. (Dimensions are
    left out: a ReplacingMergeTree merges a duplicated version away, and the ground truth checks
    their final state.)"""
    union = " UNION ALL ".join(
        f"SELECT _partition, _offset, count() AS rows, uniqExact(_sign) AS signs FROM {t} GROUP BY _partition, _offset"
        for t in FACT_TABLES
    )
    applied, duplicated, extra_rows = client.query(
        f"SELECT count(), countIf(rows > signs), sum(rows - signs) FROM ({union})"
    ).result_rows[0]
    return {
        "fact_changes_expected": expected_fact_messages,
        "fact_changes_applied": int(applied),
        "lost": max(0, expected_fact_messages - int(applied)),
        "duplicated": int(duplicated),
        "duplicated_rows": int(extra_rows or 0),
    }


def kill_when(progress_of, total: int, share: float, timeout: float, on_exit=None) -> float:
    """Wait until `progress_of()` reaches `share` of `total`; the share reached."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        done = progress_of()
        if done >= share * total:
            return round(done / total, 3)
        if on_exit is not None:
            on_exit()
        time.sleep(0.05)
    raise RuntimeError(f"progress stayed below {share:.0%} of {total} for {timeout}s")


def committed_messages(group: GroupProgress) -> int:
    return sum(group.committed().values())


def rows_written(client) -> int:
    counts = " + ".join(f"(SELECT count() FROM {t})" for t in FACT_TABLES)
    return int(client.query(f"SELECT {counts}").result_rows[0][0])


def wait_rows(server: PeerServer, database: str, at_least: int, timeout: float) -> None:
    """Until the fact tables hold `at_least` rows: the fault comes in the middle of the catch-up,
    whenever the pipeline has written that much, the same trigger for ours and the engine."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        try:
            if rows_written(server.client(database)) >= at_least:
                return
        except Exception:  # the database or its tables are not there yet
            pass
        time.sleep(0.05)
    raise RuntimeError(f"fewer than {at_least} fact rows after {timeout}s")


def run_engine_fault(
    server: PeerServer,
    *,
    database: str,
    group_id: str,
    mapping: Mapping,
    writer_schemas: dict[str, dict],
    bootstrap: str,
    registry: str,
    ends: dict[Partition, int],
    fact_changes: int,
    settings: dict[str, str],
    kill_at_rows: int,
    timeout: float,
    progress=print,
) -> dict:
    """The engine catching up, its ClickHouse killed (-9) once `kill_at_rows` fact rows are in,
    started again; then lost and duplicated fact changes, counted by their coordinates."""
    ddl = {
        "mapping": mapping,
        "writer_schemas": writer_schemas,
        "bootstrap": bootstrap,
        "registry": registry,
        "group": group_id,
        "settings": settings,
    }
    group = GroupProgress(bootstrap, group_id, list(ends))
    try:
        create_engine_database(server, database, **ddl)
        wait_rows(server, database, kill_at_rows, timeout)
        restart_s = server.restart()
        create_engine_database(server, database, kafka_tables_only=True, **ddl)
        wait_lag_zero(group, ends, timeout, server)
    finally:
        group.close()
    drop_kafka_tables(server, database)
    result = {"database": database, "settings": settings, "killed_at_rows": kill_at_rows, "restart_s": restart_s}
    result.update(fact_delivery(server.client(database), fact_changes))
    progress(
        f"  Kafka engine, ClickHouse killed at {kill_at_rows:,} fact rows: {result['lost']} fact changes lost, "
        f"{result['duplicated']} duplicated ({result['duplicated_rows']} extra rows)"
    )
    return result


def run_engine_latency(
    server: PeerServer,
    *,
    variants: dict[str, dict[str, str]],
    mapping: Mapping,
    writer_schemas: dict[str, dict],
    dsn: str,
    bootstrap: str,
    registry: str,
    prefix: str,
    rate: float,
    seconds: float,
    seed: int,
    logs: Path,
    progress=print,
) -> dict:
    """End to end through the real generator and Debezium, as bench/latency.py measures ours: one
    Kafka-engine database per variant (settings), all caught up with the stack's topics first,
    watched at once (the same changes) by their applied watermarks."""
    topics = [f"{prefix}.public.{t}" for t in TABLES]
    run = uuid.uuid4().hex[:6]
    databases = {label: f"benchke_lat_{label}_{run}" for label in variants}
    groups = {label: f"bench-ke-latency-{label}-{run}" for label in variants}
    for label, settings in variants.items():
        create_engine_database(
            server,
            databases[label],
            mapping=mapping,
            writer_schemas=writer_schemas,
            bootstrap=bootstrap,
            registry=registry,
            group=groups[label],
            settings=settings,
        )
    progress_of = {
        label: GroupProgress(bootstrap, groups[label], list(end_offsets(bootstrap, topics))) for label in variants
    }
    reader = None
    try:
        ends = last_message_ends(bootstrap, end_offsets(bootstrap, topics))
        for label in variants:
            wait_lag_zero(progress_of[label], ends, 1800, server)
        progress(f"  Kafka engine ({', '.join(variants)}) caught up; offering {rate:,.0f} events/s for {seconds:.0f}s")
        stop = threading.Event()
        reader = CommitReader(bootstrap, topics, registry).start()
        polls: dict[str, list] = {label: [] for label in variants}
        threads = [
            threading.Thread(
                target=poll_watermarks, args=(f"{server.url}/{databases[label]}", stop, polls[label]), daemon=True
            )
            for label in variants
        ]
        for t in threads:
            t.start()
        time.sleep(0.5)
        cpu0 = procstat.cpu_seconds(server.pid)
        started = time.monotonic()
        run_generator(dsn, rate, seconds, seed, logs / f"benchke-latency-{run}-generator.log").wait()
        ends = last_message_ends(bootstrap, end_offsets(bootstrap, topics))
        for label in variants:
            wait_lag_zero(progress_of[label], ends, 600, server)
        time.sleep(3 * POLL_S + 0.5)
        wall = time.monotonic() - started
        cpu = procstat.cpu_seconds(server.pid) - cpu0
        stop.set()
        for t in threads:
            t.join(10)
        commits = reader.stop()
    finally:
        if reader is not None:
            reader.close()
        for group in progress_of.values():
            group.close()
    out: dict = {"offered_rate": rate, "seconds": seconds, "clickhouse_cpu_cores_all_variants": round(cpu / wall, 3)}
    for label, settings in variants.items():
        drop_kafka_tables(server, databases[label])
        parts, unseen = latencies(commits, polls[label])
        out[label] = {
            "database": databases[label],
            "settings": settings,
            "changes_measured": len(parts["consumer"]),
            "changes_with_commit_time": len(parts["total"]),
            "changes_not_seen": unseen,
            "p50_s": _r(quantile(parts["total"], 0.5)),
            "p99_s": _r(quantile(parts["total"], 0.99)),
            "max_s": _r(parts["total"][-1] if parts["total"] else None),
            "engine_p50_s": _r(quantile(parts["consumer"], 0.5)),
            "engine_p99_s": _r(quantile(parts["consumer"], 0.99)),
        }
        progress(
            f"  Kafka engine {label} {settings or '(defaults)'}: p50 {out[label]['p50_s']}s p99 {out[label]['p99_s']}s, "
            f"its part p99 {out[label]['engine_p99_s']}s over {len(parts['total']):,} changes"
        )
    return out


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)
