"""`cdc-consumer audit` on the real stack: clean after mixed traffic, and it names the partition and
offset of an applied row deleted from ClickHouse, of one row inserted again, and of the half of an
update's pair of rows that was deleted.

The dead-lettered case runs in the fault suite (tests/faults/test_bad_input.py): every bad message
there is counted as accounted for, and the audit exits 0; every fault scenario ends with it."""

from __future__ import annotations

import pytest

from cdc_dev.generate import generate
from consumer.ops import audit
from consumer.settings import load_settings
from tests.consumer_helpers import audit_issues, new_target, run_audit, running_consumer, wait_caught_up

pytestmark = [pytest.mark.stack, pytest.mark.slow]


def _offset_of(ch, table: str, rows: int, sign: int) -> tuple[str, int, int]:
    """(topic, partition, offset) of a change that left `rows` rows of sign sum `sign`."""
    ((topic, partition, offset),) = ch.query(
        f"SELECT _topic, _partition, _offset FROM {table} GROUP BY _topic, _partition, _offset "
        f"HAVING count() = {rows} AND sum(_sign) = {sign} ORDER BY _offset LIMIT 1"
    ).result_rows
    return topic, int(partition), int(offset)


def _delete(ch, table: str, at: tuple[str, int, int], sign: int) -> None:
    ch.command(
        f"ALTER TABLE {table} DELETE WHERE _topic = {{t:String}} AND _partition = {{p:UInt32}} "
        "AND _offset = {o:UInt64} AND _sign = {s:Int8} SETTINGS mutations_sync = 2",
        parameters={"t": at[0], "p": at[1], "o": at[2], "s": sign},
    )


def test_audit_is_clean_after_mixed_traffic_and_names_deleted_and_duplicated_rows(stack, tmp_path, monkeypatch) -> None:
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
    created = _offset_of(ch, "fact_impressions", 1, +1)
    _delete(ch, "fact_impressions", created, +1)
    updated = _offset_of(ch, "fact_impressions", 2, 0)
    _delete(ch, "fact_impressions", updated, -1)  # the retraction of an update: (1, +1) looks like a create
    duplicated = _offset_of(ch, "fact_clicks", 1, +1)
    ch.command(
        "INSERT INTO fact_clicks SELECT * FROM fact_clicks WHERE _topic = {t:String} AND _partition = {p:UInt32} "
        "AND _offset = {o:UInt64}",
        parameters=dict(zip("tpo", duplicated, strict=True)),
    )

    # From the checkpoint: the changed buckets proved again, each offset against its own op.
    code, report = run_audit(target)
    assert code == 1 and not report["ok"]
    assert sorted(audit_issues(report)) == sorted(
        [
            (created[0], created[1], "missing_rows", created[2]),
            (updated[0], updated[1], "missing_rows", updated[2]),
            (duplicated[0], duplicated[1], "duplicate", duplicated[2]),
        ]
    )
    assert report["unaccounted"] == 2 and report["duplicated"] == 1 and report["buckets_reproved"] >= 2

    # Without the checkpoint, from the start of every partition and without decoding what has
    # rows: the deleted create is a gap, the duplicate is named; the half update looks like a
    # create there, which is why a changed bucket is proved again op by op.
    code, full = run_audit(target, "--full")
    assert code == 1
    assert sorted(audit_issues(full)) == sorted(
        [(created[0], created[1], "gap", created[2]), (duplicated[0], duplicated[1], "duplicate", duplicated[2])]
    )

    # A whole partition's rows deleted: every offset of it a gap, found window by window in one
    # read of Kafka. Windows of 1,000 offsets (the audit's is 65,536) put the gap across many
    # windows, and the report must be the one the default window gives.
    partition = created[1]
    lost = ch.query(
        "SELECT uniqExact(_offset), min(_offset) FROM fact_impressions WHERE _topic = {t:String} AND _partition = {p:UInt32}",
        parameters={"t": created[0], "p": partition},
    ).result_rows[0]
    assert lost[0] > 2_000, "too little traffic for a gap across windows"
    ch.command(
        "ALTER TABLE fact_impressions DELETE WHERE _topic = {t:String} AND _partition = {p:UInt32} "
        "SETTINGS mutations_sync = 2",
        parameters={"t": created[0], "p": partition},
    )
    code, default_window = run_audit(target, "--full")
    for name, value in target.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(audit, "WINDOW", 1_000)
    small_windows = audit.auditor_for(load_settings()).run(full=True).as_dict()
    assert code == 1
    for report in (default_window, small_windows):
        (emptied,) = [p for p in report["partitions"] if (p["topic"], p["partition"]) == created[:2]]
        before = next(p for p in full["partitions"] if (p["topic"], p["partition"]) == created[:2])
        assert emptied["issue_counts"]["gap"] == before["issue_counts"].get("gap", 0) + lost[0]
        assert emptied["applied"] == 0
        listed = [i["offset"] for i in emptied["issues"] if i["kind"] == "gap"]
        first = min([lost[1]] + [i["offset"] for i in before["issues"] if i["kind"] == "gap"])
        assert len(listed) == audit.LISTED and listed[0] == first
    assert _comparable(small_windows) == _comparable(default_window)


def _comparable(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "seconds"}
