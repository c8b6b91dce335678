"""Issue 16's "done when", at CI scale: on a stack of two ClickHouse shards and three Kafka brokers
(a stack of its own: fresh state directory, ports shifted past the others), three consumers in
cluster mode apply mixed traffic (inserts, updates, deletes, cascades, TOASTed values) while one
broker is killed with kill -9 and brought back, and one shard is frozen (SIGSTOP) for 30 s.
Meanwhile the frozen shard's partitions back off, /readyz and cdc_clickhouse_shard_up name it,
and the other shard keeps taking rows. Afterwards every KPI view and dimension equals Postgres,
nothing is lost or counted twice, `cdc-consumer audit` exits 0 (every offset below the committed
positions applied once or accounted for, read through the Distributed tables), and both shards
hold fact rows.

The consumers run as a supervisor would run them (systemd Restart=always): one that exits (its
watchdog, CDC_STALL_EXIT_S, when librdkafka lost the coordinator for good, or a rebalance that
found the frozen shard unreachable) is started again, and the test reports how often."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import clickhouse_connect
import pytest

from cdc_dev.stack import manager, process
from cdc_dev.stack.components import ClickHouse, Kafka
from cdc_dev.stack.layout import StackLayout
from consumer.sink.shards import ClusterMismatch, check_cluster
from tests.conftest import StackEndpoints
from tests.consumer_helpers import ConsumerProcess, group_lag, new_target, start_consumer, topics_for
from tests.faults.helpers import (
    Result,
    Traffic,
    free_port,
    metric_sum,
    readiness,
    scaled,
    scrape,
    settle_and_check,
)
from tests.stack_helpers import down_leaving_nothing

# `slow` only, like tests/test_stack_scale.py: it brings up a stack of its own and needs no running one
# (the `stack` marker would start the session's single-node stack beside it for nothing).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # its own stack starts in 2-3 min under load

# Past the project's stack, test_stack's second one (+200) and test_stack_scale's (+400), with
# room for their node ports (+10 per node).
CLUSTER_PORT_SHIFT = 700
CONSUMERS = 3
FREEZE_S = 30
RATE = scaled(400, 1500)  # change events per second: two cores carry the stack, traffic and three consumers


@pytest.fixture(scope="module")
def cluster_stack() -> Iterator[StackEndpoints]:
    home = StackLayout.from_env()
    # Not under pytest's temporary root: another pytest on the machine may set that back to 0700
    # while Postgres (another user) needs to reach its data directory.
    state = Path(tempfile.mkdtemp(prefix="cdc-cluster-stack-"))
    env = {
        "CDC_STACK_LIB": str(home.lib),
        "CDC_STACK_DIR": str(state / "stack"),
        "CDC_STACK_PORT_OFFSET": str(int(os.environ.get("CDC_STACK_PORT_OFFSET", "0")) + CLUSTER_PORT_SHIFT),
        "CDC_STACK_CLICKHOUSE_SHARDS": "2",
        "CDC_STACK_KAFKA_BROKERS": "3",
    }
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        layout = StackLayout.from_env()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    try:
        manager.up(layout)
        yield StackEndpoints.native(layout)
    finally:
        try:
            down_leaving_nothing(layout)
        finally:
            shutil.rmtree(state, ignore_errors=True)


class Supervisor:
    """Three consumers of one group, each restarted when it exits (Restart=always)."""

    def __init__(self, target, tmp_path: Path):
        self.target, self.tmp_path = target, tmp_path
        self.ports = [free_port() for _ in range(CONSUMERS)]
        self.consumers: list[ConsumerProcess] = [self._start(port) for port in self.ports]
        self.restarts = 0

    def _start(self, port: int) -> ConsumerProcess:
        return start_consumer(self.target, self.tmp_path, CDC_METRICS_PORT=str(port))

    def check(self) -> None:
        for i, consumer in enumerate(self.consumers):
            if consumer.proc.poll() is not None:
                self.restarts += 1
                assert self.restarts <= 12, f"consumers keep exiting:\n{consumer.output()[-5000:]}"
                self.consumers[i] = self._start(self.ports[i])

    def sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.check()
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))

    def wait_in_step(self, stack: StackEndpoints, timeout: float = 300) -> None:
        """Until the group's lag is under a few seconds of traffic (so the freeze hits members in
        step, not ones still starting or catching up after the broker)."""
        topics = topics_for(self.target.env["CDC_TOPIC_PREFIX"])
        deadline = time.monotonic() + timeout
        lag: dict = {}
        while time.monotonic() < deadline:
            lag = group_lag(stack.kafka_bootstrap, self.target.group_id, topics)
            if lag and sum(lag.values()) < 5 * RATE:
                return
            self.sleep(2)
        raise AssertionError(f"the group did not catch up in {timeout}s: {lag}")

    def probes(self) -> list[tuple[int, dict, dict]]:
        """(readiness status, readiness body, metrics) of each consumer that answers."""
        found = []
        for port in self.ports:
            try:
                status, body = readiness(port)
                found.append((status, body, scrape(port)))
            except Exception:  # restarting, or busy in an insert that waits for its timeout
                continue
        return found

    def stop(self) -> None:
        for consumer in self.consumers:
            consumer.stop()


def _local_rows(url: str, database: str, table: str) -> int:
    client = clickhouse_connect.get_client(dsn=f"{url}/{database}")
    return int(client.query(f"SELECT count() FROM {table}_local").result_rows[0][0])


def test_two_shards_three_brokers_three_consumers_through_a_broker_kill_and_a_frozen_shard(
    cluster_stack: StackEndpoints, tmp_path: Path
) -> None:
    layout = cluster_stack.layout
    assert layout is not None
    nodes = layout.clickhouse_nodes
    # What `cdc-consumer stack env` exports for this stack: the cluster, every shard, every broker.
    exported = layout.connection_env()
    assert exported["CDC_CLICKHOUSE_CLUSTER"] == "cdc"
    assert exported["CDC_CLICKHOUSE_SHARD_URLS"].split(",") == [node.url for node in nodes]
    assert len(exported["CDC_KAFKA_BOOTSTRAP"].split(",")) == 3
    target = new_target(
        cluster_stack,
        tmp_path,
        CDC_STALL_EXIT_S="60",
        CDC_CLICKHOUSE_TIMEOUT_S="10",
        CDC_CLICKHOUSE_CLUSTER=exported["CDC_CLICKHOUSE_CLUSTER"],
    )
    shard_urls = exported["CDC_CLICKHOUSE_SHARD_URLS"].split(",")
    target.env["CDC_CLICKHOUSE_SHARD_URLS"] = ",".join(f"{url}/{target.database}" for url in shard_urls)
    # The consumer refuses shard URLs out of the cluster's order, or too few of them.
    nodes_clients = [clickhouse_connect.get_client(dsn=url) for url in shard_urls]
    check_cluster(nodes_clients, "cdc")
    for wrong in (nodes_clients[::-1], nodes_clients[:1]):
        with pytest.raises(ClusterMismatch):
            check_cluster(wrong, "cdc")
    broker, shard = Kafka(layout, node_id=2), ClickHouse(layout, shard=2)
    supervisor = Supervisor(target, tmp_path)
    frozen = False
    try:
        with Traffic(cluster_stack.postgres_dsn, seed=1616, rate=RATE) as traffic:
            supervisor.sleep(scaled(20, 60))

            # kill -9 one broker; `stack up` brings it back (and changes nothing else).
            pid = broker.pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            assert process.wait_until(lambda: not process.is_alive(pid), 30)
            supervisor.sleep(10)
            manager.up(layout)
            assert process.wait_until(broker.healthy, 120, interval=0.5), "the killed broker did not come back"
            supervisor.wait_in_step(cluster_stack)

            # Freeze shard 2 for 30 s: its partitions back off, shard 1 keeps taking rows.
            first_shard_before = _local_rows(nodes[0].url, target.database, "fact_impressions")
            os.kill(shard.pid, signal.SIGSTOP)
            frozen = True
            supervisor.sleep(FREEZE_S - 5)
            seen = supervisor.probes()
            first_shard_during = _local_rows(nodes[0].url, target.database, "fact_impressions")
            os.kill(shard.pid, signal.SIGCONT)
            frozen = False
            assert first_shard_during > first_shard_before, "shard 1 took no rows while shard 2 was frozen"
            assert any(status == 503 and body.get("clickhouse_shards_down") == ["2"] for status, body, _ in seen), (
                f"no consumer's /readyz named shard 2: {[(s, b) for s, b, _ in seen]}"
            )
            assert any(metric_sum(m, "cdc_clickhouse_shard_up", shard="2") == 0 for _, _, m in seen)
            assert all(metric_sum(m, "cdc_clickhouse_shard_up", shard="1") == 1 for _, _, m in seen)
            supervisor.sleep(scaled(15, 60))
        supervisor.check()
        outcome = settle_and_check(
            cluster_stack,
            target,
            Result(
                "2 shards, 3 brokers, 3 consumers: broker kill -9, shard frozen 30 s",
                traffic.events,
                note=f"consumer restarts: {supervisor.restarts}",
            ),
            process=None,
            timeout=600,
        )
        assert outcome.result.ok
        for node in nodes:
            for table in ("fact_impressions", "fact_clicks"):
                assert _local_rows(node.url, target.database, table) > 0, f"{node.name} holds no {table} rows"
    finally:
        if frozen:
            os.kill(shard.pid, signal.SIGCONT)
        supervisor.stop()
