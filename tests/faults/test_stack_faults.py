"""Faults of the parts around the consumer, under traffic: ClickHouse down, the Kafka broker
restarted, the Kafka Connect worker killed, the connector task restarted, the schema registry
unreachable."""

from __future__ import annotations

import os
import signal
import time

import psycopg
import pytest
import requests

from cdc_dev.stack import manager, process
from cdc_dev.stack.components import ClickHouse, Kafka, KafkaConnect, SchemaRegistry
from consumer.app.runner import STALLED_EXIT_CODE
from tests.consumer_helpers import end_offsets, new_target, start_consumer
from tests.faults.helpers import (
    Probe,
    Result,
    Traffic,
    committed_offsets,
    free_port,
    mapped_topics,
    metric_sum,
    readiness,
    scaled,
    scrape,
    settle_and_check,
    start_offsets,
    wait_port,
    warm_up,
)

pytestmark = [pytest.mark.stack, pytest.mark.slow, pytest.mark.faults]
CONNECTOR = "adtech-postgres"  # the stack's connector (connectors/debezium-postgres.json)


def _restart(component, timeout: float = 180) -> None:
    component.start()
    assert process.wait_until(component.healthy, timeout, interval=0.5), f"{component.name} did not come back"


def _kill(component) -> None:
    """kill -9: no offset flush; Connect's open transaction is aborted."""
    pid = component.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert process.wait_until(lambda: not process.is_alive(pid), 30)


def _restart_connect(worker, native_stack) -> None:
    _restart(worker)
    manager.wait_connector_running(native_stack, CONNECTOR, timeout=180)


def test_clickhouse_down_the_consumer_pauses_commits_nothing_and_catches_up(stack, native_stack, tmp_path) -> None:
    down_s = scaled(15, 60)
    port = free_port()
    target = new_target(stack, tmp_path, CDC_METRICS_PORT=str(port))
    consumer = start_consumer(target, tmp_path)
    clickhouse = ClickHouse(native_stack)
    try:
        wait_port(port)
        warm_up(stack, target, consumer)
        with Traffic(stack.postgres_dsn, seed=5401) as traffic:
            time.sleep(4)
            assert clickhouse.stop()
            stopped = time.monotonic()
            # The consumer notices at its next insert: /readyz turns 503 with the paused partitions.
            while readiness(port)[0] == 200:
                assert time.monotonic() - stopped < 30, "the consumer never reported itself not ready"
                time.sleep(0.2)
            topics = mapped_topics(target)
            frozen = committed_offsets(stack.kafka_bootstrap, target.group_id, topics)
            samples = []
            while time.monotonic() - stopped < down_s:
                assert consumer.proc.poll() is None, consumer.output()[-3000:]
                samples.append(readiness(port))
                time.sleep(1)
            assert committed_offsets(stack.kafka_bootstrap, target.group_id, topics) == frozen, (
                "offsets were committed while ClickHouse was down"
            )
            not_ready = sum(1 for code, _ in samples if code == 503)
            assert not_ready == len(samples), f"/readyz while ClickHouse was down: {samples}"
            assert any(body["paused_partitions"] for _, body in samples)
            _restart(clickhouse)
            back = time.monotonic()
            recovery = Probe(stack.postgres_dsn).recovery(target.clickhouse(), back, process=consumer)
        assert readiness(port)[0] == 200
        retries = metric_sum(scrape(port), "cdc_insert_retries_total")
        assert retries > 0
        assert "partitions paused" in consumer.output()
        settle_and_check(
            stack,
            target,
            Result(
                f"ClickHouse down {down_s} s",
                traffic.events,
                recovery_s=recovery,
                note=f"/readyz 503 all {len(samples)} s; offsets frozen; {int(retries)} insert retries",
            ),
            process=consumer,
        )
    finally:
        if clickhouse.pid is None:
            _restart(clickhouse)
        consumer.stop()


def test_kafka_broker_restart_during_traffic(stack, native_stack, tmp_path) -> None:
    """The broker stops (SIGTERM) and starts again under traffic. The consumer rides it out:
    commits the coordinator cannot take are retried with the next one. Should its librdkafka
    never find the group coordinator again (seen once: a synchronous commit then waits for ever),
    the watchdog exits it (CDC_STALL_EXIT_S, 60 s here) and the test restarts it, as systemd's
    Restart=always would; the table's note says so."""
    target = new_target(stack, tmp_path, CDC_STALL_EXIT_S="60")
    consumers = [start_consumer(target, tmp_path)]
    kafka = Kafka(native_stack)
    try:
        warm_up(stack, target, consumers[-1])
        with Traffic(stack.postgres_dsn, seed=5501) as traffic:
            time.sleep(4)
            assert kafka.stop()
            time.sleep(scaled(3, 10))
            _restart(kafka)
            back = time.monotonic()
            manager.wait_connector_running(native_stack, CONNECTOR, timeout=180)
            while True:
                try:
                    recovery = Probe(stack.postgres_dsn).recovery(
                        target.clickhouse(), back, timeout=240, process=consumers[-1]
                    )
                    break
                except AssertionError:
                    if consumers[-1].proc.poll() != STALLED_EXIT_CODE or len(consumers) > 2:
                        raise
                    consumers.append(start_consumer(target, tmp_path))  # the supervisor's restart
            time.sleep(2)
        restarts = len(consumers) - 1
        note = _connector_note(native_stack) + (f"; watchdog exit + restart ×{restarts}" if restarts else "")
        settle_and_check(
            stack,
            target,
            Result("Kafka broker restart", traffic.events, recovery_s=recovery, note=note),
            process=consumers[-1],
        )
    finally:
        if kafka.pid is None:
            _restart(kafka)
        for consumer in consumers:
            consumer.stop()


def test_kafka_connect_worker_killed_and_restarted_during_streaming(stack, native_stack, tmp_path) -> None:
    """kill -9 of the worker while Debezium streams (the connector's snapshot was of an empty
    database, long done: an interrupted snapshot would start over and re-emit `r` events, see the
    README's known limits)."""
    target = new_target(stack, tmp_path)
    consumer = start_consumer(target, tmp_path)
    worker = KafkaConnect(native_stack)
    try:
        warm_up(stack, target, consumer)
        with Traffic(stack.postgres_dsn, seed=5601) as traffic:
            time.sleep(4)
            _kill(worker)
            time.sleep(scaled(2, 10))  # Postgres keeps committing while Connect is down
            _restart_connect(worker, native_stack)
            back = time.monotonic()
            recovery = Probe(stack.postgres_dsn).recovery(target.clickhouse(), back, process=consumer)
        settle_and_check(
            stack,
            target,
            Result("Kafka Connect worker kill -9", traffic.events, recovery_s=recovery, note="during streaming"),
            process=consumer,
        )
    finally:
        if worker.pid is None:
            _restart(worker)
        consumer.stop()


# Rows of one COPY, and the share of them in Kafka when the worker is killed.
COPY_ROWS = 200_000
KILL_AT = COPY_ROWS // 10


def test_kafka_connect_worker_killed_inside_one_copy(stack, native_stack, tmp_path) -> None:
    """debezium/dbz#1554: a COPY writes its rows as multi-insert WAL records, so many changes share
    one LSN. A worker killed while Debezium streams such a transaction resumes, on restart, from
    its stored offset: a Debezium that tracks only the LSN skips the rest of that LSN's rows
    (3.6.1 lost 48 and 91 changes in two of the scenario above). Here the kill lands inside one
    large COPY every time."""
    target = new_target(stack, tmp_path)
    consumer = start_consumer(target, tmp_path)
    worker = KafkaConnect(native_stack)
    topic = next(t for t in mapped_topics(target) if t.endswith(".impressions"))
    try:
        warm_up(stack, target, consumer)
        before = sum(end_offsets(stack.kafka_bootstrap, [topic]).values())
        with psycopg.connect(stack.postgres_dsn) as conn:
            (advertiser,) = conn.execute("INSERT INTO advertiser (name) VALUES ('copy-kill') RETURNING id").fetchone()
            (campaign,) = conn.execute(
                "INSERT INTO campaign (advertiser_id, name) VALUES (%s, 'copy-kill') RETURNING id", (advertiser,)
            ).fetchone()
            with conn.cursor().copy("COPY impressions (campaign_id, created_at, cost) FROM STDIN") as copy:
                for i in range(COPY_ROWS):
                    copy.write_row((campaign, "2026-11-30 12:00:00+00", f"0.{i % 1000:06d}"))

        def emitted() -> int:
            return sum(end_offsets(stack.kafka_bootstrap, [topic]).values()) - before

        assert process.wait_until(lambda: emitted() >= KILL_AT, 120, interval=0.05), "Debezium emitted no COPY rows"
        _kill(worker)
        at_kill = emitted()
        assert at_kill < COPY_ROWS, f"all {COPY_ROWS} rows were in Kafka before the kill: the scenario tests nothing"
        _restart_connect(worker, native_stack)
        settle_and_check(
            stack,
            target,
            Result(
                "Kafka Connect worker kill -9 inside one COPY",
                COPY_ROWS,
                note=f"{at_kill} offsets in Kafka at the kill",
            ),
            process=consumer,
        )
    finally:
        if worker.pid is None:
            _restart(worker)
        consumer.stop()


def test_connector_task_restart_during_streaming(stack, native_stack, tmp_path) -> None:
    target = new_target(stack, tmp_path)
    consumer = start_consumer(target, tmp_path)
    restarts = scaled(1, 3)
    try:
        warm_up(stack, target, consumer)
        with Traffic(stack.postgres_dsn, seed=5701) as traffic:
            for _ in range(restarts):
                time.sleep(3)
                response = requests.post(f"{stack.connect_url}/connectors/{CONNECTOR}/tasks/0/restart", timeout=60)
                assert response.status_code < 300, response.text
                time.sleep(1)
                manager.wait_connector_running(native_stack, CONNECTOR, timeout=180)
            back = time.monotonic()
            recovery = Probe(stack.postgres_dsn).recovery(target.clickhouse(), back, process=consumer)
        settle_and_check(
            stack,
            target,
            Result(
                f"connector task restart ×{restarts} (REST)",
                traffic.events,
                recovery_s=recovery,
                note="POST /connectors/adtech-postgres/tasks/0/restart",
            ),
            process=consumer,
        )
    finally:
        consumer.stop()


def test_schema_registry_unreachable_pauses_and_applies_after_it_returns(stack, native_stack, tmp_path) -> None:
    """Not poison: the messages are fine, the registry is not. A new consumer meets every writer
    schema for the first time while the registry is stopped: it pauses (not ready, nothing
    dead-lettered, nothing committed) and applies everything once the registry is back."""
    down_s = scaled(15, 60)
    traffic = Traffic(stack.postgres_dsn, seed=5801, duration=3).start()
    events = traffic.wait()
    port = free_port()
    target = new_target(stack, tmp_path, CDC_METRICS_PORT=str(port))
    registry = SchemaRegistry(native_stack)
    topics = mapped_topics(target)
    assert registry.stop()
    consumer = start_consumer(target, tmp_path)
    try:
        stopped = time.monotonic()
        wait_port(port)
        while "cannot apply" not in consumer.output():
            assert time.monotonic() - stopped < 60, consumer.output()[-3000:]
            time.sleep(0.2)
        probes = []
        while time.monotonic() - stopped < down_s:
            assert consumer.proc.poll() is None, consumer.output()[-3000:]
            probes.append(readiness(port)[0])
            time.sleep(0.5)
        assert set(probes) == {503}, f"/readyz during the registry outage: {probes}"
        samples = scrape(port)
        assert metric_sum(samples, "cdc_registry_retries_total") > 0
        assert metric_sum(samples, "cdc_dlq_messages_total") == 0
        assert metric_sum(samples, "cdc_rows_inserted_total") == 0
        committed = committed_offsets(stack.kafka_bootstrap, target.group_id, topics)
        first = start_offsets(stack.kafka_bootstrap, topics)
        moved = {p: o for p, o in committed.items() if o is not None and o > first[p]}
        assert not moved, f"committed past the log start while nothing could be decoded: {moved}"
        _restart(registry)
        back = time.monotonic()
        debezium = _restart_failed_task(native_stack)
        recovery = Probe(stack.postgres_dsn).recovery(target.clickhouse(), back, process=consumer)
        retries = int(metric_sum(scrape(port), "cdc_registry_retries_total"))
        settle_and_check(
            stack,
            target,
            Result(
                f"schema registry unreachable {down_s} s",
                events,
                recovery_s=recovery,
                note=f"/readyz 503 all along, {retries} lookups retried, 0 dead-lettered, nothing committed"
                + (f"; {debezium}" if debezium else ""),
            ),
            process=consumer,
        )
        assert metric_sum(scrape(port), "cdc_dlq_messages_total") == 0
    finally:
        if registry.pid is None:
            _restart(registry)
        _restart_failed_task(native_stack)
        consumer.stop()


def _restart_failed_task(layout) -> str:
    """Debezium's task fails when its Avro converter needs the registry during an outage (a schema
    it has not cached yet, e.g. the heartbeat's after a task restart): restart it as an operator
    would (exactly-once source: it resumes from the offsets committed with its last records).
    Connect reports the old FAILED state for a moment after a restart, so poll until RUNNING."""
    restarted_at = None
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        tasks = manager.connector_state(layout, CONNECTOR).get("tasks", [])
        if tasks and all(t["state"] == "RUNNING" for t in tasks):
            if restarted_at is None:
                return ""
            return "Debezium's task failed on the outage (its converter needs the registry), restarted via REST"
        failed = any(t["state"] == "FAILED" for t in tasks)
        if failed and (restarted_at is None or time.monotonic() - restarted_at > 15):
            response = requests.post(
                f"{layout.connect_url}/connectors/{CONNECTOR}/restart",
                params={"includeTasks": "true", "onlyFailed": "true"},
                timeout=60,
            )
            assert response.status_code < 300, response.text
            restarted_at = time.monotonic()
        time.sleep(1)
    raise AssertionError(f"connector {CONNECTOR} not running: {manager.connector_state(layout, CONNECTOR)}")


def _connector_note(layout) -> str:
    state = manager.connector_state(layout, CONNECTOR)
    return f"connector {state['connector']['state']}, task {state['tasks'][0]['state']}"
