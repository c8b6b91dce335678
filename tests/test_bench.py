"""The benchmark's one command, small, on the real stack: it produces, runs our consumer and
ClickHouse's own ingest, measures the floors, checks the ground truth, prints its JSON last,
and leaves no topics, databases or ground-truth schema behind."""

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
        [sys.executable, "bench/run.py", "--events", str(EVENTS), "--phases", "produce,ours,native,floors"],
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
        assert len(head["ours_rounds_cpu_s_per_million"]) == len(head["native_rounds_cpu_s_per_million"]) == 2
        for key in ("ours_events_per_s", "ours_cpu_s_per_million", "native_cpu_s_per_million"):
            assert head[key] > 0, key
        for key in ("floor_consume_events_per_s", "floor_decode_events_per_s"):
            assert head[key] > 0, key
        assert results["ours"]["rows_inserted"] == EVENTS
        assert all(r["verify_ok"] for r in results["ours_rounds"])

        prefix = results["prefix"]
        topics = AdminClient({"bootstrap.servers": stack.kafka_bootstrap}).list_topics(timeout=10).topics
        assert not [t for t in topics if t.startswith(prefix + ".")]
        databases = {
            r[0] for r in clickhouse_connect.get_client(dsn=stack.clickhouse_url).query("SHOW DATABASES").result_rows
        }
        assert not [d for d in databases if prefix in d]
        with psycopg.connect(stack.postgres_dsn) as conn:
            schemas = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (prefix,)).fetchall()
        assert schemas == []
    finally:
        (REPO / kept).unlink()
        for log in (REPO / "bench" / "results" / "logs").glob(f"{results['prefix']}*"):
            log.unlink()
