"""Lag for Prometheus: :class:`LagMonitor` keeps the lag gauges of a set of partitions current, for
the consumer's own partitions (`cdc-consumer run`) and for every partition of the group in the
lag exporter (`cdc-consumer lag --serve PORT`). The lag itself is read by
:class:`consumer.kafka.lag.LagReader`."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable

from prometheus_client import Gauge

from consumer.kafka.client_config import KafkaClientConfig
from consumer.kafka.lag import LagReader, PartitionLag
from consumer.kafka.source import Partition
from consumer.ops import metrics
from consumer.ops.http import DEFAULT_BIND_ADDRESS, OperationsServer

log = logging.getLogger(__name__)


class LagMonitor:
    """Keeps the lag gauges of a set of partitions current, in a background thread.

    `partitions()` says which partitions to report, asked anew at every round: the consumer
    reports the partitions assigned to it (series of partitions it lost are removed, the new
    owner reports them, from the group's committed offsets, on its next round), the exporter
    every partition of the group's topics."""

    def __init__(
        self,
        reader: LagReader,
        partitions: Callable[[], list[Partition]],
        lag_messages: Gauge,
        lag_seconds: Gauge,
        interval: float = 5.0,
        extra: Callable[[list[PartitionLag]], None] | None = None,
    ):
        self.reader = reader
        self.partitions = partitions
        self.lag_messages = lag_messages
        self.lag_seconds = lag_seconds
        self.interval = interval
        self.extra = extra
        self._reported: set[Partition] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lag-monitor", daemon=True)

    def start(self) -> LagMonitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.interval + self.reader.timeout + 5)
        self.reader.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.update()
            except Exception as exc:
                log.warning("lag monitor: %s", exc)
            self._stop.wait(self.interval)

    def update(self) -> list[PartitionLag]:
        partitions = sorted(set(self.partitions()))
        lags = self.reader.read(partitions) if partitions else []
        for item in lags:
            labels = (item.topic, str(item.partition))
            self.lag_messages.labels(*labels).set(item.lag)
            self.lag_seconds.labels(*labels).set(item.lag_seconds)
        for topic, partition in self._reported - set(partitions):
            for gauge in (self.lag_messages, self.lag_seconds):
                with contextlib.suppress(KeyError):
                    gauge.remove(topic, str(partition))
        self._reported = set(partitions)
        if self.extra is not None:
            self.extra(lags)
        return lags


def serve_exporter(
    kafka: KafkaClientConfig | str,
    group_id: str,
    topics: list[str],
    port: int,
    decoder=None,
    interval: float = 5.0,
    bind_address: str = DEFAULT_BIND_ADDRESS,
) -> None:
    """`cdc-consumer lag --serve PORT`: the lag of every partition of the group, for Prometheus,
    from Kafka alone. Runs beside the consumer (a sidecar, or a service of its own) so lag and its
    alerts stay visible while the consumer is down — which is when they matter most."""
    families = metrics.exporter_metrics()
    reader = LagReader(kafka, group_id, decoder=decoder)

    def extra(lags: list[PartitionLag]) -> None:
        for item in lags:
            labels = (item.topic, str(item.partition))
            if item.committed is not None:
                families.committed_offset.labels(*labels).set(item.committed)
            families.high_watermark.labels(*labels).set(item.high_watermark)
        families.group_members.set(len(reader.members()))
        families.last_update.set_to_current_time()

    monitor = LagMonitor(
        reader, lambda: reader.partitions(topics), families.lag_messages, families.lag_seconds, interval, extra
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server = OperationsServer(port, registry=families.registry, addr=bind_address).start()
    monitor.start()
    log.info("lag exporter for group %s on port %d", group_id, server.port)
    stop.wait()
    monitor.stop()
    server.stop()
