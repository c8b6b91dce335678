"""Wires the stages of `cdc-consumer run` from the settings."""

from __future__ import annotations

import gc
import logging
import os
import threading
import time

from consumer.app.clients import clickhouse_shards, schema_registry
from consumer.decode.envelope import EnvelopeDecoder
from consumer.engine.batch import BatchPolicy
from consumer.engine.bounds import Bounds
from consumer.engine.dlq import DeadLetterQueue
from consumer.engine.pipeline import Pipeline, PipelineConfig
from consumer.kafka.client_config import kafka_client_config
from consumer.kafka.lag import LagReader
from consumer.kafka.source import KafkaSource, SourceConfig
from consumer.ops import metrics
from consumer.ops.http import OperationsServer, pipeline_probes
from consumer.ops.lag_exporter import LagMonitor
from consumer.settings import ConfigError, Settings
from consumer.transform.mapping import Mapper, load_mapping

log = logging.getLogger(__name__)


def build_pipeline(settings: Settings, topics: list[str] | None = None, bounds: Bounds | None = None) -> Pipeline:
    """The service's pipeline; `topics` and `bounds` make the bounded one of `cdc-consumer replay`."""
    kafka = kafka_client_config(settings)
    try:
        mapping = load_mapping(settings.mapping_file, settings.topic_prefix)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    shards = clickhouse_shards(settings)
    registry = schema_registry(settings)
    source_config = SourceConfig(
        kafka=kafka,
        group_id=settings.group_id,
        topics=topics or mapping.topics,
        session_timeout_ms=settings.session_timeout_ms,
        # A bounded replay runs as a group of its own, never as the live member's instance.
        group_instance_id=settings.group_instance_id if bounds is None else None,
    )
    return Pipeline(
        source_factory=lambda *callbacks: KafkaSource(source_config, *callbacks),
        decoder=EnvelopeDecoder(registry),
        mapper=Mapper(mapping, settings.truncate_action),
        sink=shards,
        dlq=DeadLetterQueue(kafka, settings.dlq_topic),
        config=PipelineConfig(
            batch=BatchPolicy(
                settings.batch_max_rows,
                settings.batch_max_bytes,
                settings.batch_max_age_s,
                settings.flush_when_caught_up,
                settings.min_insert_interval_s,
            ),
            poll_messages=settings.poll_max_messages,
            insert_concurrency=settings.insert_concurrency,
            server_decode=settings.server_decode,
            latest_rows_kept=settings.latest_rows_kept,
            latest_rows_max_bytes=settings.latest_rows_max_bytes,
            max_evolved_columns=settings.max_evolved_columns,
            poison_breaker_share=settings.poison_breaker_share,
            poison_breaker_min_messages=settings.poison_breaker_min_messages,
            poison_breaker_window_s=settings.poison_breaker_window_s,
        ),
        bounds=bounds,
    )


STALLED_EXIT_CODE = 70  # EX_SOFTWARE


def start_watchdog(pipeline, stall_s: float, exit=os._exit, interval_s: float | None = None) -> threading.Thread:
    """Exit the process when the loop has not come round for `stall_s` seconds. Seen in the fault
    suite: after a Kafka broker restart, librdkafka sometimes never finds the group coordinator
    again, and a synchronous commit waits for it forever (the member is evicted at
    max.poll.interval.ms, but the process would hang on). Exiting is safe at any moment, like
    kill -9: the restarted consumer resumes from the committed offsets and the watermark."""

    def watch() -> None:
        while True:
            time.sleep(interval_s if interval_s is not None else min(10.0, stall_s / 4))
            idle = time.monotonic() - pipeline.last_step
            if idle > stall_s:
                log.critical("the consumer loop has not come round for %.0f s: exiting to be restarted", idle)
                logging.shutdown()
                exit(STALLED_EXIT_CODE)
                return

    thread = threading.Thread(target=watch, name="watchdog", daemon=True)
    thread.start()
    return thread


def serve_operations(settings: Settings, pipeline: Pipeline) -> tuple[OperationsServer, LagMonitor]:
    """The operations port and the lag gauges of the assigned partitions."""
    metrics.initialize_series(pipeline.mapping)
    live, ready = pipeline_probes(pipeline)
    server = OperationsServer(settings.metrics_port, live=live, ready=ready, addr=settings.metrics_bind_address).start()

    def assigned() -> list:
        for _ in range(3):  # the pipeline's thread may change the dict while we copy it
            try:
                return list(pipeline.partitions)
            except RuntimeError:
                time.sleep(0.01)
        return []

    reader = LagReader(kafka_client_config(settings), settings.group_id, decoder=pipeline.decoder.for_another_thread())
    monitor = LagMonitor(reader, assigned, metrics.lag_messages, metrics.lag_seconds).start()
    return server, monitor


def run(settings: Settings) -> None:
    pipeline = build_pipeline(settings)
    if settings.stall_exit_s:
        start_watchdog(pipeline, settings.stall_exit_s)
    if settings.metrics_port:
        serve_operations(settings, pipeline)  # /metrics, /healthz, /readyz; lag of its partitions
    log.info("consuming %s as group %s", ", ".join(pipeline.mapping.topics), settings.group_id)
    # Start-up objects are frozen out of collection and young collections made rare: with the
    # defaults, a poll of 10,000 messages triggered many collections, each walking every object
    # since start-up (bench/README.md has the cost). The loop makes few cycles; reference
    # counting frees its garbage.
    gc.freeze()
    gc.set_threshold(20_000, 10, 10)
    pipeline.run()
