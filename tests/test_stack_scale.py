"""The scaled-out native stack: two ClickHouse shards and three Kafka brokers, on a stack of its
own (fresh state directory, ports shifted past the project's stack and test_stack's second one;
downloads shared). It needs no running stack, only the downloads, which `up` fetches if missing."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import clickhouse_connect
import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from cdc_dev.stack import manager, process
from cdc_dev.stack.layout import StackLayout
from tests.stack_helpers import down_leaving_nothing

pytestmark = pytest.mark.slow

# Beyond test_stack's second stack (+200) and the node ports of both (+10 per node).
SCALE_PORT_SHIFT = 400
CONNECT_TOPICS = ("_connect-configs", "_connect-offsets", "_connect-status")
MESSAGES = 1000


def _topic_config(admin: AdminClient, topic: str) -> dict:
    """The topic's config, asked again while the broker asked has not yet learnt of the new topic
    (metadata reaches the three brokers one after the other: UNKNOWN_TOPIC_OR_PART meanwhile)."""
    found: dict = {}

    def described() -> bool:
        try:
            (future,) = admin.describe_configs([ConfigResource(ConfigResource.Type.TOPIC, topic)]).values()
            found.update(future.result(30))
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise
        return bool(found)

    assert process.wait_until(described, 30), f"{topic}: no broker describes it"
    return found


@pytest.fixture
def scaled_stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[StackLayout]:
    home = StackLayout.from_env()
    offset = int(os.environ.get("CDC_STACK_PORT_OFFSET", "0")) + SCALE_PORT_SHIFT
    monkeypatch.setenv("CDC_STACK_LIB", str(home.lib))
    monkeypatch.setenv("CDC_STACK_DIR", str(tmp_path / "stack"))
    monkeypatch.setenv("CDC_STACK_PORT_OFFSET", str(offset))
    monkeypatch.setenv("CDC_STACK_CLICKHOUSE_SHARDS", "2")
    monkeypatch.setenv("CDC_STACK_KAFKA_BROKERS", "3")
    layout = StackLayout.from_env()
    try:
        manager.up(layout, connector=None)
        yield layout
    finally:
        down_leaving_nothing(layout)


def _pids(layout: StackLayout) -> dict[str, int | None]:
    return {s.name: s.pid for s in manager.status(layout)}


def _answering_tcp_ports(url: str) -> set[int]:
    """The native port of every node that answers `cluster('cdc', ...)` asked through `url`."""
    client = clickhouse_connect.get_client(dsn=url)
    return {row[0] for row in client.query("SELECT tcpPort() FROM cluster('cdc', system.one)").result_rows}


def _replicas(admin: AdminClient, topic: str) -> list[tuple[int, int]]:
    """(replicas, in-sync replicas) of each partition."""
    partitions = admin.list_topics(topic, timeout=10).topics[topic].partitions.values()
    return [(len(p.replicas), len(p.isrs)) for p in partitions]


def _produce(bootstrap: str, topic: str, values: range) -> None:
    failures = []
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True})
    for value in values:
        producer.produce(topic, str(value).encode(), on_delivery=lambda err, _msg: err and failures.append(err))
    assert producer.flush(60) == 0, "messages still unsent after 60 s"
    assert failures == []


def _consume_all(bootstrap: str, topic: str, expected: int) -> list[int]:
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"scale-{uuid.uuid4().hex[:8]}", "auto.offset.reset": "earliest"}
    )
    consumer.subscribe([topic])
    values: list[int] = []

    def all_read() -> bool:
        message = consumer.poll(1.0)
        if message is not None and message.error() is None:
            values.append(int(message.value()))
        return len(values) >= expected

    try:
        process.wait_until(all_read, 90, interval=0)
    finally:
        consumer.close()
    return values


def test_two_shards_and_three_brokers_survive_kill_9_and_up_restarts_only_the_dead(scaled_stack) -> None:
    layout = scaled_stack
    states = manager.status(layout)
    assert [s.name for s in states] == [
        "postgres",
        "kafka-1",
        "kafka-2",
        "kafka-3",
        "registry",
        "clickhouse-1",
        "clickhouse-2",
        "prometheus",
        "connect",
    ]
    assert [s.name for s in states if not s.healthy] == []
    env = layout.connection_env()
    assert env["CDC_CLICKHOUSE_CLUSTER"] == "cdc"
    assert len(env["CDC_KAFKA_BOOTSTRAP"].split(",")) == 3

    shard_ports = {node.tcp_port for node in layout.clickhouse_nodes}
    for node in layout.clickhouse_nodes:
        assert _answering_tcp_ports(node.url) == shard_ports, f"asked through {node.name}"

    bootstrap = layout.kafka_bootstrap
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for topic in CONNECT_TOPICS:
        assert {replicas for replicas, _ in _replicas(admin, topic)} == {3}, topic
    topic = f"scale-{uuid.uuid4().hex[:8]}"
    # No replication factor given: the brokers' default applies.
    admin.create_topics([NewTopic(topic, num_partitions=1)])[topic].result(30)
    assert process.wait_until(lambda: _replicas(admin, topic) == [(3, 3)], 30)
    assert _topic_config(admin, topic)["min.insync.replicas"].value == "2"
    _produce(bootstrap, topic, range(MESSAGES))

    leader = admin.list_topics(topic, timeout=10).topics[topic].partitions[0].leader
    dead_broker = next(node.name for node in layout.kafka_nodes if node.node_id == leader)
    before = _pids(layout)
    for name in (dead_broker, "clickhouse-2"):
        os.kill(before[name], 9)
        assert process.wait_until(lambda pid=before[name]: not process.is_alive(pid), 30)

    # Two copies left of three: acks=all writes go on, and everything written is there.
    _produce(bootstrap, topic, range(MESSAGES, 2 * MESSAGES))
    assert sorted(_consume_all(bootstrap, topic, 2 * MESSAGES)) == list(range(2 * MESSAGES))

    manager.up(layout, connector=None)
    after = _pids(layout)
    restarted = {name for name in after if after[name] != before[name]}
    assert restarted == {dead_broker, "clickhouse-2"}
    assert all(s.healthy for s in manager.status(layout))
    assert _answering_tcp_ports(layout.clickhouse_url) == shard_ports
    assert process.wait_until(lambda: _replicas(admin, topic) == [(3, 3)], 60), "the broker never caught up"
