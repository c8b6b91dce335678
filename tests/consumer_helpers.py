"""Test helpers: the consumer as a real process, and 'caught up' read from Kafka itself."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import clickhouse_connect
from confluent_kafka import Consumer, TopicPartition

from consumer.mapping import load_mapping
from consumer.stack.process import terminate


@dataclass
class ConsumerProcess:
    proc: subprocess.Popen
    log: Path

    def stop(self, timeout: float = 60) -> int:
        return terminate(self.proc, timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class ConsumerTarget:
    """What one test's consumers share: a group, a ClickHouse database, a topic prefix."""

    group_id: str
    database: str
    env: dict[str, str]
    clickhouse_url: str

    def clickhouse(self):
        return clickhouse_connect.get_client(dsn=f"{self.clickhouse_url}/{self.database}")


def new_target(stack, tmp_path: Path, topic_prefix: str = "adtech", **settings: str) -> ConsumerTarget:
    run_id = uuid.uuid4().hex[:8]
    database = f"test_{run_id}"
    env = {
        **os.environ,
        **stack.env(),
        "CDC_CLICKHOUSE_URL": f"{stack.clickhouse_url}/{database}",
        "CDC_GROUP_ID": f"test-{run_id}",
        "CDC_TOPIC_PREFIX": topic_prefix,
        "CDC_DLQ_TOPIC": f"test-{run_id}.dlq",
        "CDC_METRICS_PORT": "0",
        "CDC_BATCH_MAX_AGE_S": "0.5",
        **settings,
    }
    return ConsumerTarget(env["CDC_GROUP_ID"], database, env, stack.clickhouse_url)


@contextmanager
def running_consumer(target: ConsumerTarget, tmp_path: Path, **extra_env: str) -> Iterator[ConsumerProcess]:
    process = start_consumer(target, tmp_path, **extra_env)
    try:
        yield process
    finally:
        process.stop()


def start_consumer(target: ConsumerTarget, tmp_path: Path, **extra_env: str) -> ConsumerProcess:
    log = tmp_path / f"consumer-{uuid.uuid4().hex[:6]}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "consumer.cli", "run"],
            env={**target.env, **extra_env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return ConsumerProcess(proc, log)


def group_lag(bootstrap: str, group_id: str, topics: list[str]) -> dict[tuple[str, int], int]:
    """Per partition: the last stable offset minus the group's committed offset (what a
    read_committed consumer still has to read)."""
    probe = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group_id,
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    try:
        metadata = probe.list_topics(timeout=10)
        partitions = [
            TopicPartition(t, p) for t in topics if t in metadata.topics for p in metadata.topics[t].partitions
        ]
        committed = {(tp.topic, tp.partition): tp.offset for tp in probe.committed(partitions, timeout=10)}
        lag = {}
        for tp in partitions:
            _low, high = probe.get_watermark_offsets(tp, timeout=10)
            done = max(committed[(tp.topic, tp.partition)], 0)
            lag[(tp.topic, tp.partition)] = max(high - done, 0)
        return lag
    finally:
        probe.close()


def topics_for(prefix: str) -> list[str]:
    return load_mapping(topic_prefix=prefix).topics


def wait_caught_up(stack, target: ConsumerTarget, process: ConsumerProcess | None = None, timeout: float = 300) -> None:
    """Until every partition's committed offset reached the end of its topic."""
    topics = topics_for(target.env["CDC_TOPIC_PREFIX"])
    deadline = time.monotonic() + timeout
    lag: dict = {}
    while time.monotonic() < deadline:
        if process is not None and process.proc.poll() is not None:
            raise AssertionError(f"consumer exited with {process.proc.returncode}:\n{process.output()[-5000:]}")
        lag = group_lag(stack.kafka_bootstrap, target.group_id, topics)
        if lag and all(v == 0 for v in lag.values()):
            return
        time.sleep(1)
    tail = process.output()[-5000:] if process else ""
    raise AssertionError(f"not caught up after {timeout}s: { {k: v for k, v in lag.items() if v} }\n{tail}")
