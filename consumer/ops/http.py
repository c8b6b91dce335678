"""The consumer's operations port: `/metrics` (Prometheus), `/healthz` (liveness) and `/readyz`
(readiness), for Prometheus and for orchestrators (systemd watchdogs, Kubernetes probes, compose
healthchecks).

* **/healthz** — 200 while the consumer loop turns: it polls at least every few hundred
  milliseconds, so a loop that has not come round for `live_timeout_s` (default 300 s, Kafka's
  `max.poll.interval.ms`: the group would have thrown the member out by then) is stuck: 503.
* **/readyz** — 200 when the consumer applies what it reads; 503 while partitions are paused on
  ClickHouse (or registry) errors, i.e. while it retries with backoff and commits nothing.

The same process keeps the lag gauges of its partitions current (:class:`consumer.kafka.lag.LagMonitor`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import choose_encoder

log = logging.getLogger(__name__)

Probe = Callable[[], tuple[bool, dict]]


class OperationsServer:
    def __init__(
        self,
        port: int,
        *,
        registry: CollectorRegistry = REGISTRY,
        live: Probe | None = None,
        ready: Probe | None = None,
        addr: str = "0.0.0.0",
    ):
        always: Probe = lambda: (True, {})  # noqa: E731
        probes = {"/healthz": live or always, "/readyz": ready or always}

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    encoder, content_type = choose_encoder(self.headers.get("Accept"))
                    self._send(200, encoder(registry), content_type)
                elif path in probes:
                    ok, detail = probes[path]()
                    body = json.dumps({"status": "ok" if ok else "fail", **detail}).encode() + b"\n"
                    self._send(200 if ok else 503, body, "application/json")
                elif path == "/":
                    self._send(200, b"cdc-consumer: /metrics /healthz /readyz\n", "text/plain")
                else:
                    self._send(404, b"not found\n", "text/plain")

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args) -> None:  # scraped every few seconds: not worth a log line
                pass

        self.httpd = ThreadingHTTPServer((addr, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="ops-http", daemon=True)

    def start(self) -> OperationsServer:
        self._thread.start()
        log.info("serving /metrics, /healthz, /readyz on port %d", self.port)
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def pipeline_probes(pipeline, live_timeout_s: float = 300.0) -> tuple[Probe, Probe]:
    def live() -> tuple[bool, dict]:
        idle = time.monotonic() - pipeline.last_step
        return idle < live_timeout_s, {"loop_idle_seconds": round(idle, 3)}

    def ready() -> tuple[bool, dict]:
        paused = sorted(f"{t}[{p}]" for t, p in set(pipeline.paused))
        return pipeline.ready, {"assigned_partitions": len(pipeline.partitions), "paused_partitions": paused}

    return live, ready


def initialize_series(mapping) -> None:
    """Label values known in advance get their series at 0 from the start (Prometheus practice):
    `rate()` and alerts then see 0, not "no data", before the first retry or rebalance."""
    from consumer.ops import metrics

    for table in mapping.tables:
        for family in (metrics.rows_inserted, metrics.batch_rows, metrics.insert_seconds, metrics.insert_retries):
            family.labels(table.table)
        metrics.end_to_end_seconds.labels(table.table)
        metrics.messages_skipped.labels(table.topic)
    for kind in ("assign", "revoke", "lost"):
        metrics.rebalances.labels(kind)


def serve_operations(settings, pipeline) -> tuple[OperationsServer, object]:
    """For `cdc-consumer run`: the operations port and the lag gauges of the assigned partitions."""
    from consumer.kafka.lag import LagMonitor, LagReader
    from consumer.ops import metrics

    initialize_series(pipeline.mapping)
    live, ready = pipeline_probes(pipeline)
    server = OperationsServer(settings.metrics_port, live=live, ready=ready).start()

    def assigned() -> list:
        for _ in range(3):  # the pipeline's thread may change the dict while we copy it
            try:
                return list(pipeline.partitions)
            except RuntimeError:
                time.sleep(0.01)
        return []

    reader = LagReader(settings.kafka_bootstrap, settings.group_id, decoder=pipeline.decoder)
    monitor = LagMonitor(reader, assigned, metrics.lag_messages, metrics.lag_seconds).start()
    return server, monitor
