"""The consumer end to end on the real stack: every KPI in ClickHouse equals Postgres."""

from __future__ import annotations

import signal
import time
import uuid

import psycopg
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from cdc_dev.generate import generate
from cdc_dev.verify import compare
from consumer.sink.clickhouse import connect
from tests.consumer_helpers import (
    new_target,
    running_consumer,
    start_consumer,
    topics_for,
    wait_caught_up,
)
from tests.debezium_helpers import AvroReader, drain, throwaway_connector

pytestmark = [pytest.mark.stack, pytest.mark.slow]


def assert_matches_postgres(stack, target) -> None:
    assert_matches_postgres_with(stack, target.clickhouse())


def assert_matches_postgres_with(stack, client) -> None:
    report = compare(stack.postgres_dsn, client)
    assert report.ok, str(report)


@pytest.mark.secure
def test_mixed_traffic_kpis_equal_postgres(stack, tmp_path) -> None:
    target = new_target(stack, tmp_path)
    with running_consumer(target, tmp_path) as consumer:
        generate(stack.postgres_dsn, rate=4000, duration=15, seed=101)
        wait_caught_up(stack, target, consumer)
        assert_matches_postgres(stack, target)
        assert consumer.stop() == 0, consumer.output()[-3000:]


@pytest.mark.secure
def test_kill_9_after_insert_before_commit_counts_nothing_twice(stack, tmp_path) -> None:
    target = new_target(stack, tmp_path)
    generate(stack.postgres_dsn, rate=3000, duration=5, seed=202)
    crashed = start_consumer(target, tmp_path, CDC_FAULT_KILL_AFTER_INSERTS="3")
    assert crashed.proc.wait(180) == -signal.SIGKILL, crashed.output()[-3000:]
    # The moment is real: ClickHouse holds rows whose offsets Kafka has not committed.
    ch = target.clickhouse()
    committed = _committed(stack.kafka, target)
    ahead = [
        (topic, partition)
        for table, topic in _tables(target)
        for partition, applied in ch.query(
            f"SELECT _partition, max(_offset) FROM {table} WHERE _topic = '{topic}' GROUP BY _partition"
        ).result_rows
        if applied >= committed.get((topic, partition), 0)
    ]
    assert ahead, "the crash should leave inserted-but-uncommitted rows"
    with running_consumer(target, tmp_path) as consumer:
        wait_caught_up(stack, target, consumer)
        assert_matches_postgres(stack, target)


def test_two_consumers_share_partitions_and_survive_a_rebalance(stack, tmp_path) -> None:
    target = new_target(stack, tmp_path)
    first = start_consumer(target, tmp_path)
    second = start_consumer(target, tmp_path)
    try:
        generate(stack.postgres_dsn, rate=3000, duration=6, seed=303)
        members = _group_members(stack.kafka_bootstrap, target.group_id)
        assert members == 2, f"expected both consumers in the group, saw {members}"
        assert second.stop() == 0, second.output()[-3000:]  # leaves mid-stream: a rebalance
        generate(stack.postgres_dsn, rate=3000, duration=4, seed=304)
        wait_caught_up(stack, target, first)
        assert_matches_postgres(stack, target)
    finally:
        first.stop()
        second.stop()


def test_poison_messages_go_to_the_dlq_and_good_ones_are_applied(stack, tmp_path) -> None:
    """Bad input between real Debezium messages, in topics of their own (prefix `poison…`)."""
    prefix = f"poison{int(time.time())}"
    real_topic = "adtech.public.impressions"
    generate(stack.postgres_dsn, rate=2000, duration=2, seed=404)
    real = [m for m in drain(stack.kafka_bootstrap, [real_topic], idle_seconds=2) if m.value][:50]
    good, truncated_source = real[:40], real[40]
    poison = {
        "wrong_magic_byte": b"\x07" + good[0].value[1:],
        "unknown_schema_id": b"\x00\x7f\xff\xff\xf0" + good[0].value[5:],
        "truncated_avro": truncated_source.value[: len(truncated_source.value) // 2],
        "invalid_json": b'{"op": "c", "after": {"id": 1,',
        "missing_op": b'{"before": null, "after": {"id": 1}, "source": {"table": "impressions"}}',
    }
    topic = f"{prefix}.public.impressions"
    admin = AdminClient({"bootstrap.servers": stack.kafka_bootstrap})
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(30)
    producer = Producer({"bootstrap.servers": stack.kafka_bootstrap})
    for i, message in enumerate(good):
        producer.produce(topic, key=message.key, value=message.value)
        if i % 8 == 0 and poison:
            error_class, value = poison.popitem()
            producer.produce(topic, key=b"poison", value=value, headers={"expect": error_class})
    producer.flush(30)

    target = new_target(stack, tmp_path, topic_prefix=prefix)
    with running_consumer(target, tmp_path) as consumer:
        wait_caught_up(stack, target, consumer)
        dead = drain(stack.kafka_bootstrap, [target.env["CDC_DLQ_TOPIC"]], idle_seconds=2)
    classes = sorted(_header(m, "cdc.error.class") for m in dead)
    assert classes == sorted(["wrong_magic_byte", "unknown_schema_id", "truncated_avro", "invalid_json", "missing_op"])
    for m in dead:
        assert _header(m, "cdc.source.topic") == topic
        assert int(_header(m, "cdc.source.offset")) >= 0
        assert _header(m, "cdc.error.message")
    reader = AvroReader(stack.schema_registry_url)
    expected_rows = sum(2 if reader.decode(m.value)["op"] == "u" else 1 for m in good)
    applied = target.clickhouse().query("SELECT count() FROM fact_impressions").result_rows[0][0]
    assert applied == expected_rows, "every good message is applied: c/r/d one row, u two (-1, +1)"


def _header(message, name: str) -> str:
    return dict(message.headers or [])[name].decode()


def _tables(target) -> list[tuple[str, str]]:
    from consumer.transform.mapping import load_mapping

    return [(t.table, t.topic) for t in load_mapping(topic_prefix=target.env["CDC_TOPIC_PREFIX"]).tables]


def _committed(kafka: dict[str, str], target) -> dict[tuple[str, int], int]:
    lag_probe = Consumer({**kafka, "group.id": target.group_id})
    try:
        metadata = lag_probe.list_topics(timeout=10)
        parts = [
            TopicPartition(t, p)
            for t in topics_for(target.env["CDC_TOPIC_PREFIX"])
            for p in metadata.topics[t].partitions
        ]
        return {(tp.topic, tp.partition): tp.offset for tp in lag_probe.committed(parts, timeout=10)}
    finally:
        lag_probe.close()


def _group_members(bootstrap: str, group_id: str, timeout: float = 60) -> int:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    deadline = time.monotonic() + timeout
    members = 0
    while time.monotonic() < deadline:
        description = admin.describe_consumer_groups([group_id])[group_id].result(10)
        members = len(description.members)
        if members >= 2 and all(m.assignment.topic_partitions for m in description.members):
            return members
        time.sleep(1)
    return members


def test_a_column_added_in_postgres_flows_through_without_restart(stack, tmp_path) -> None:
    # A fresh name per run: DDL is not captured, so the topics still hold a dropped column's values.
    column = f"priority_{uuid.uuid4().hex[:6]}"
    target = new_target(stack, tmp_path)
    with running_consumer(target, tmp_path) as consumer:
        generate(stack.postgres_dsn, rate=2000, duration=3, seed=505)
        with psycopg.connect(stack.postgres_dsn, autocommit=True) as conn:
            conn.execute(f"ALTER TABLE campaign ADD COLUMN {column} integer")
            try:
                conn.execute(
                    f"UPDATE campaign SET {column} = id % 5 + 1, updated_at = now() "
                    "WHERE id IN (SELECT id FROM campaign ORDER BY id DESC LIMIT 10)"
                )
                generate(stack.postgres_dsn, rate=2000, duration=2, seed=506)
                wait_caught_up(stack, target, consumer)
                columns = dict(
                    target.clickhouse()
                    .query(
                        "SELECT name, type FROM system.columns WHERE database = currentDatabase() "
                        "AND table = 'dim_campaign'"
                    )
                    .result_rows
                )
                assert columns.get(column) == "Nullable(Int64)"
                assert_matches_postgres(stack, target)  # compares the new column too
                assert consumer.proc.poll() is None, "no restart needed"
            finally:
                conn.execute(f"ALTER TABLE campaign DROP COLUMN IF EXISTS {column}")


def test_without_a_clickhouse_url_the_consumer_writes_into_an_embedded_clickhouse(stack, tmp_path) -> None:
    target = new_target(stack, tmp_path, CDC_CLICKHOUSE_EMBEDDED_PATH=str(tmp_path / "embedded"))
    del target.env["CDC_CLICKHOUSE_URL"]
    with running_consumer(target, tmp_path) as consumer:
        generate(stack.postgres_dsn, rate=2000, duration=2, seed=606)
        wait_caught_up(stack, target, consumer)
        assert consumer.stop() == 0, consumer.output()[-3000:]
    embedded = connect(None, tmp_path / "embedded")  # chDB allows one process per data directory
    assert_matches_postgres_with(stack, embedded)


def test_a_snapshot_delivered_twice_counts_once(stack, tmp_path) -> None:
    """Debezium starts an interrupted snapshot over, re-emitting its `r` events at new offsets.
    Two snapshots into the same topics is that case, made deterministic."""
    generate(stack.postgres_dsn, rate=2000, duration=2, seed=707)
    prefix = f"resnap{uuid.uuid4().hex[:6]}"
    live = set(_pg_ids(stack.postgres_dsn, "impressions"))
    for _ in range(2):
        with throwaway_connector(
            stack.connect_url, stack.postgres_dsn, prefix=prefix, **{"snapshot.mode": "initial_only"}
        ):
            drain(
                stack.kafka_bootstrap,
                [f"{prefix}.public.impressions"],
                idle_seconds=2,
                until=lambda ms: len({m.key for m in ms if m.value}) >= len(live),
            )
    target = new_target(stack, tmp_path, topic_prefix=prefix)
    with running_consumer(target, tmp_path) as consumer:
        wait_caught_up(stack, target, consumer)
        assert_matches_postgres(stack, target)


def _pg_ids(dsn: str, table: str) -> list[int]:
    with psycopg.connect(dsn) as conn:
        return [row[0] for row in conn.execute(f"SELECT id FROM {table}")]
