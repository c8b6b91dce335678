"""Topics created after the consumer started, and partitions added to a topic, join its
assignment within seconds, not at librdkafka's default metadata refresh of five minutes."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewPartitions, NewTopic

from tests.consumer_helpers import new_target, running_consumer

pytestmark = [pytest.mark.stack, pytest.mark.slow]

JOINS_WITHIN_S = 20


def impression(impression_id: int) -> bytes:
    """A Debezium change in Connect's JSON without a schema, as the JSON converter writes it."""
    return json.dumps(
        {
            "op": "c",
            "before": None,
            "after": {"id": impression_id, "campaign_id": 1, "created_at": "2026-12-02T10:00:00.000000Z", "cost": 0.25},
            "source": {"table": "impressions", "lsn": impression_id, "ts_ms": int(time.time() * 1000)},
        }
    ).encode()


def wait_for_row(client, impression_id: int, timeout: float) -> float:
    """Seconds until ClickHouse holds the impression's row."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            if client.query(f"SELECT count() FROM fact_impressions WHERE id = {impression_id}").result_rows[0][0]:
                return time.monotonic() - started
        except Exception:  # the consumer has not created its tables yet
            pass
        time.sleep(0.5)
    raise AssertionError(f"impression {impression_id} not in ClickHouse after {timeout} s")


def test_a_topic_created_after_the_start_and_its_new_partitions_join_within_seconds(stack, tmp_path) -> None:
    prefix = f"late{uuid.uuid4().hex[:8]}"
    topic = f"{prefix}.public.impressions"
    target = new_target(stack, tmp_path, topic_prefix=prefix)
    admin = AdminClient({"bootstrap.servers": stack.kafka_bootstrap})
    producer = Producer({"bootstrap.servers": stack.kafka_bootstrap})
    with running_consumer(target, tmp_path) as consumer:
        time.sleep(5)  # subscribed to topics none of which exists yet
        client = target.clickhouse()
        admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])[topic].result(30)
        producer.produce(topic, key=b"1", value=impression(1), partition=0)
        producer.flush(30)
        joined = wait_for_row(client, 1, timeout=120)
        assert joined < JOINS_WITHIN_S, f"the new topic joined after {joined:.1f} s\n{consumer.output()[-3000:]}"

        admin.create_partitions([NewPartitions(topic, 3)])[topic].result(30)
        while len(producer.list_topics(topic, timeout=10).topics[topic].partitions) < 3:
            time.sleep(0.2)  # the producer's own metadata must know partition 2
        producer.produce(topic, key=b"2", value=impression(2), partition=2)
        producer.flush(30)
        joined = wait_for_row(client, 2, timeout=120)
        assert joined < JOINS_WITHIN_S, f"the new partition joined after {joined:.1f} s\n{consumer.output()[-3000:]}"
        rows = client.query("SELECT _partition, sum(_sign) FROM fact_impressions GROUP BY _partition ORDER BY 1")
        assert rows.result_rows == [(0, 1), (2, 1)]
