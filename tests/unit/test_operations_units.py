"""Units of the operations features, without a stack: the bounded pipeline of `replay`, its
argument parsing, the applied-offset runs, and the operations HTTP port."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from consumer.app.replay import parse_offsets, parse_time_ms
from consumer.engine.bounds import ReplayBounds
from consumer.engine.pipeline import Pipeline
from consumer.ops.http import OperationsServer
from consumer.settings import ConfigError
from consumer.sink.clickhouse import AppliedOffsets
from tests.fakes import TOPIC, FakeSink, FakeSource, fake_pipeline


def bounded_pipeline(source: FakeSource, sink: FakeSink, bound: range, token_suffix: str = "") -> Pipeline:
    return fake_pipeline(source, sink, bounds=ReplayBounds({(TOPIC, 0): bound}, token_suffix=token_suffix))


def test_bounded_run_applies_only_missing_offsets_and_stops_at_the_bound() -> None:
    source = FakeSource(end=30, start=5)
    sink = FakeSink(present=[(0, 9), (15, 17)])  # already in ClickHouse
    pipeline = bounded_pipeline(source, sink, range(5, 20), token_suffix=":replay-1")
    pipeline.run()
    assert pipeline.done
    assert sink.inserted == [10, 11, 12, 13, 14, 18, 19]
    assert all(token.endswith(":replay-1") for token in sink.tokens)
    assert max(source.commits) == 20, "never commits past the bound: the rest is the live group's"


def test_bounded_run_finishes_when_the_range_ends_with_transaction_markers() -> None:
    source = FakeSource(end=12, markers={10, 11})
    pipeline = bounded_pipeline(source, FakeSink(), range(0, 12))
    pipeline.run()
    assert pipeline.done and source.commits[-1] == 12


def test_empty_range_is_done_at_once() -> None:
    source = FakeSource(end=50, start=50)
    sink = FakeSink()
    pipeline = bounded_pipeline(source, sink, range(50, 50))
    pipeline.run()
    assert pipeline.done and sink.inserted == []


def test_applied_offsets_runs() -> None:
    runs = AppliedOffsets([(10, 12), (0, 3)])
    assert [o for o in range(15) if o in runs] == [0, 1, 2, 3, 10, 11, 12]
    assert 5 not in AppliedOffsets()


def test_parse_offsets() -> None:
    assert parse_offsets("100") == 100
    assert parse_offsets("0:100,1:250") == {0: 100, 1: 250}
    for bad in ("x", "-1", "0:1:2", "0:-5"):
        with pytest.raises(ConfigError):
            parse_offsets(bad)


def test_parse_time() -> None:
    now = 1_800_000_000.0
    assert parse_time_ms("15m ago", now) == parse_time_ms("-15m", now) == int((now - 900) * 1000)
    assert parse_time_ms("2026-01-01T00:00:00Z") == parse_time_ms("2026-01-01 00:00") == 1767225600000
    assert parse_time_ms("2026-01-01T01:00:00+01:00") == 1767225600000
    assert parse_time_ms("1767225600") == parse_time_ms("1767225600000") == 1767225600000
    with pytest.raises(ConfigError):
        parse_time_ms("yesterday")


def test_operations_port_serves_metrics_and_probes() -> None:
    state = {"ready": True}
    server = OperationsServer(0, addr="127.0.0.1", ready=lambda: (state["ready"], {"paused_partitions": []})).start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        assert b"cdc_paused_partitions" in urllib.request.urlopen(f"{base}/metrics").read()
        assert json.loads(urllib.request.urlopen(f"{base}/healthz").read())["status"] == "ok"
        assert urllib.request.urlopen(f"{base}/readyz").status == 200
        state["ready"] = False
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(f"{base}/readyz")
        assert error.value.code == 503
    finally:
        server.stop()


def test_lag_monitor_reports_assigned_partitions_and_drops_the_ones_it_lost() -> None:
    from prometheus_client import CollectorRegistry, Gauge

    from consumer.kafka.lag import PartitionLag
    from consumer.ops.lag_exporter import LagMonitor

    registry = CollectorRegistry()
    messages = Gauge("lag_messages", "", ["topic", "partition"], registry=registry)
    seconds = Gauge("lag_seconds", "", ["topic", "partition"], registry=registry)

    class Reader:
        timeout = 1

        def read(self, partitions):
            return [PartitionLag(t, p, 5, 0, 5 + p, p, float(p), None) for t, p in partitions]

        def close(self):
            pass

    assigned = [(TOPIC, 0), (TOPIC, 1), (TOPIC, 2)]
    monitor = LagMonitor(Reader(), lambda: list(assigned), messages, seconds)
    monitor.update()
    assert registry.get_sample_value("lag_messages", {"topic": TOPIC, "partition": "2"}) == 2
    assigned.remove((TOPIC, 2))  # a rebalance gave partition 2 to another member: its series goes
    monitor.update()
    assert registry.get_sample_value("lag_messages", {"topic": TOPIC, "partition": "2"}) is None
    assert registry.get_sample_value("lag_seconds", {"topic": TOPIC, "partition": "1"}) == 1.0
