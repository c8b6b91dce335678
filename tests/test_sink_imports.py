"""The consumer's ClickHouse client takes Python lists and nothing else: an insert through it must not
import pandas or numpy (chdb-core installs both; importing them was half the consumer's start-up
CPU and about 120 MiB of its peak RSS in the benchmark)."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest

pytestmark = [pytest.mark.stack]

INSERT_AND_LIST_MODULES = """
import sys
from datetime import UTC, datetime
from decimal import Decimal

from consumer.sink.clickhouse import connect

client = connect(sys.argv[1])
table = sys.argv[2]
client.command(f"CREATE TABLE {table} (id Int64, name String, at DateTime64(6, 'UTC'), cost Decimal(12, 6)) ENGINE = Memory")
try:
    client.insert(table, [[1, "a", datetime(2026, 12, 2, tzinfo=UTC), Decimal("0.25")]], column_names=["id", "name", "at", "cost"])
    print(client.query(f"SELECT count(), sum(cost) FROM {table}").result_rows[0])
finally:
    client.command(f"DROP TABLE {table}")
print(sorted(m for m in ("pandas", "numpy") if m in sys.modules))
"""


def test_an_insert_imports_neither_pandas_nor_numpy(stack) -> None:
    table = f"default.sink_imports_{uuid.uuid4().hex[:8]}"
    run = subprocess.run(
        [sys.executable, "-c", INSERT_AND_LIST_MODULES, stack.clickhouse_url, table],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    written, imported = run.stdout.strip().splitlines()
    assert written == "(1, Decimal('0.250000'))"
    assert imported == "[]"
