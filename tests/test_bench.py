"""The benchmark's one command, small, on the real stack: it produces, runs our consumer,
ClickHouse's own ingest and ClickHouse's Kafka engine (in a ClickHouse of its own), kills
both pipelines in the middle of a catch-up, measures the floors, checks the ground truth,
prints its JSON last, and leaves no topics, databases, ground-truth schema or peer server behind.
Figures are not asserted (they belong to bench/README.md): only that they are there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import clickhouse_connect
import psycopg
import pytest
from confluent_kafka.admin import AdminClient

pytestmark = [pytest.mark.stack, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
EVENTS = 20_000


def test_bench_runs_in_one_command_and_cleans_up(stack):
    if stack.layout is None:
        pytest.skip("the benchmark reads ClickHouse's CPU from /proc: it needs the native stack")
    done = subprocess.run(
        [
            sys.executable,
            "bench/run.py",
            "--events",
            str(EVENTS),
            "--phases",
            "produce,ours,native,engine,faults,floors,audit",
            "--rounds",
            "1",
        ],
        cwd=REPO,
        env={**os.environ, **stack.env()},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    head = json.loads(lines[-1])
    kept = next(line for line in lines if line.startswith("results kept in ")).split()[3]
    results = json.loads((REPO / kept).read_text())
    try:
        assert head["events"] == EVENTS
        assert head["ours_verify_ok"] is True
        rounds = ("ours_rounds_cpu_s_per_million", "native_rounds_cpu_s_per_million")
        assert [len(head[key]) for key in (*rounds, "kafka_engine_rounds_cpu_s_per_million")] == [1, 1, 1]
        for key in (
            "ours_events_per_s",
            "ours_cpu_s_per_million",
            "native_cpu_s_per_million",
            "kafka_engine_cpu_s_per_million",
            "kafka_engine_events_per_s",
        ):
            assert isinstance(head[key], float) and head[key] > 0, key
        # The engine's KPIs are compared with Postgres: whichever way that comes out, it is a bool.
        assert isinstance(head["kafka_engine_kpis_exact"], bool)
        for key in ("kafka_engine_fault_lost", "kafka_engine_fault_duplicated"):
            assert isinstance(head[key], int) and head[key] >= 0, key
        # Ours loses and duplicates nothing when killed: that is a correctness claim, not a figure.
        assert (head["ours_fault_lost"], head["ours_fault_duplicated"]) == (0, 0), results["faults"]["ours"]
        assert results["faults"]["ours"]["verify_ok"] is True
        # Latency keys exist without the latency phase (None: not measured).
        for key in ("kafka_engine_e2e_p99_s", "ours_part_p99_s"):
            assert key in head and head[key] is None, key
        for key in ("floor_consume_events_per_s", "floor_decode_events_per_s"):
            assert head[key] > 0, key
        assert results["ours"]["rows_inserted"] == EVENTS
        # The audit proves the benchmark's data clean, first from Kafka, then from its checkpoint.
        assert head["audit_ok"] is True, results.get("audit")
        assert head["audit_first_cpu_s_per_million_offsets"] > 0, results["audit"]
        # Against an empty database every offset the first audit found applied is a gap.
        audit = results["audit"]
        assert audit["applied"] <= audit["gap_audit_unaccounted"] <= audit["offsets"], audit
        # A one-column scan of 20,000 rows may take less than the kernel's 10 ms CPU tick: 0.0.
        assert isinstance(head["audit_scan_cpu_s_per_million_rows"], float), results["audit"]
        assert all(r["verify_ok"] for r in results["ours_rounds"])

        prefix = results["prefix"]
        topics = AdminClient({"bootstrap.servers": stack.kafka_bootstrap}).list_topics(timeout=10).topics
        assert not [t for t in topics if t.startswith(prefix + ".")]
        databases = {
            r[0] for r in clickhouse_connect.get_client(dsn=stack.clickhouse_url).query("SHOW DATABASES").result_rows
        }
        assert not [d for d in databases if prefix in d]
        peer = stack.layout.data("bench-kafka-engine")
        assert not peer.exists()
        assert str(peer) not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        with psycopg.connect(stack.postgres_dsn) as conn:
            schemas = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (prefix,)).fetchall()
        assert schemas == []
    finally:
        (REPO / kept).unlink()
        for log in (REPO / "bench" / "results" / "logs").glob(f"{results['prefix']}*"):
            log.unlink()
