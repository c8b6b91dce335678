"""`cdc-consumer audit` on the real stack: clean after mixed traffic, and it names the partition and
offset of one applied row deleted from ClickHouse, and of one row inserted again.

The dead-lettered case runs in the fault suite (tests/faults/test_bad_input.py): every bad message
there is counted as accounted for, and the audit exits 0."""

from __future__ import annotations

import pytest

from cdc_dev.generate import generate
from tests.consumer_helpers import audit_issues, new_target, run_audit, running_consumer, wait_caught_up

pytestmark = [pytest.mark.stack, pytest.mark.slow]


def _single_row_offset(ch, table: str, sign: int) -> tuple[str, int, int]:
    """(topic, partition, offset) of a change that wrote exactly one row of this sign."""
    ((topic, partition, offset),) = ch.query(
        f"SELECT _topic, _partition, _offset FROM {table} GROUP BY _topic, _partition, _offset "
        f"HAVING count() = 1 AND sum(_sign) = {sign} ORDER BY _offset LIMIT 1"
    ).result_rows
    return topic, int(partition), int(offset)


def test_audit_is_clean_after_mixed_traffic_and_names_a_deleted_and_a_duplicated_row(stack, tmp_path) -> None:
    stats = generate(stack.postgres_dsn, rate=1500, duration=8, seed=1616)
    assert stats.events > 5_000
    target = new_target(stack, tmp_path)
    with running_consumer(target, tmp_path) as consumer:
        wait_caught_up(stack, target, consumer, timeout=600)

        code, report = run_audit(target)
        assert code == 0 and report["ok"], audit_issues(report)[:20]
        partitions = report["partitions"]
        assert sum(p["applied"] for p in partitions) > 5_000
        assert sum(p["accounted"]["markers"] for p in partitions) > 0  # Debezium writes in transactions
        assert sum(p["accounted"]["tombstones"] for p in partitions) > 0  # deletes are followed by one
        assert all(p["unaccounted"] == 0 and p["duplicated"] == 0 for p in partitions)

        # Again, from the checkpoint: nothing new to read, the history checked from its digests.
        code, again = run_audit(target)
        assert code == 0 and again["ok"] and again["buckets_checked"] > 0 and again["buckets_reproved"] == 0

    ch = target.clickhouse()
    deleted = _single_row_offset(ch, "fact_impressions", +1)
    ch.command(
        "ALTER TABLE fact_impressions DELETE WHERE _topic = {t:String} AND _partition = {p:UInt32} "
        "AND _offset = {o:UInt64} SETTINGS mutations_sync = 2",
        parameters=dict(zip("tpo", deleted, strict=True)),
    )
    code, report = run_audit(target)
    assert code == 1 and not report["ok"]
    assert audit_issues(report) == [(deleted[0], deleted[1], "missing_rows", deleted[2])]
    assert report["unaccounted"] == 1 and report["duplicated"] == 0

    duplicated = _single_row_offset(ch, "fact_clicks", +1)
    ch.command(
        "INSERT INTO fact_clicks SELECT * FROM fact_clicks WHERE _topic = {t:String} AND _partition = {p:UInt32} "
        "AND _offset = {o:UInt64}",
        parameters=dict(zip("tpo", duplicated, strict=True)),
    )
    code, report = run_audit(target)
    assert code == 1
    assert sorted(audit_issues(report)) == sorted(
        [
            (deleted[0], deleted[1], "missing_rows", deleted[2]),
            (duplicated[0], duplicated[1], "duplicate", duplicated[2]),
        ]
    )
    assert report["unaccounted"] == 1 and report["duplicated"] == 1

    # Without the checkpoint, offset by offset from the start of every partition: the same two.
    code, full = run_audit(target, "--full")
    assert code == 1 and sorted(audit_issues(full)) == sorted(audit_issues(report))
