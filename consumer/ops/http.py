"""The consumer's operations port: `/metrics` (Prometheus), `/healthz` (liveness) and `/readyz`
(readiness), for Prometheus and for orchestrators (systemd watchdogs, Kubernetes probes, compose
healthchecks).

* **/healthz** — 200 while the consumer loop turns: it polls at least every few hundred
  milliseconds, so a loop that has not come round for `live_timeout_s` (default 300 s, Kafka's
  `max.poll.interval.ms`: the group would have thrown the member out by then) is stuck: 503.
* **/readyz** — 200 when the consumer applies what it reads; 503 while partitions are paused on
  ClickHouse (or registry) errors, i.e. while it retries with backoff and commits nothing.

The port listens on loopback unless told otherwise (`CDC_METRICS_BIND_ADDRESS`), and it is built
to survive whoever can reach it: a connection has `request_timeout_s` in all to deliver its
request (a client trickling a byte at a time cannot hold a handler), and at most `max_handlers`
connections are served at once; more wait for a free handler for as long, then are closed.
"""

from __future__ import annotations

import io
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import choose_encoder

log = logging.getLogger(__name__)

Probe = Callable[[], tuple[bool, dict]]

DEFAULT_BIND_ADDRESS = "127.0.0.1"


class _DeadlineSocketIO(socket.SocketIO):
    """Reads of a request socket that all end by one deadline: a per-read timeout alone would let
    a client sending a byte every few seconds keep a handler for as long as it likes."""

    def __init__(self, sock: socket.socket, deadline: float):
        super().__init__(sock, "rb")
        self._deadline_sock = sock
        self._deadline = deadline

    def readinto(self, buffer) -> int:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("request not received in time")
        self._deadline_sock.settimeout(remaining)
        return super().readinto(buffer)


class _BoundedHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type, max_handlers: int, wait_s: float):
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(max_handlers)
        self._wait_s = wait_s

    def process_request(self, request, client_address) -> None:
        # Accepting waits here for a free handler; meanwhile new connections queue in the
        # listen backlog, never as threads.
        if not self._slots.acquire(timeout=self._wait_s):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class OperationsServer:
    def __init__(
        self,
        port: int,
        *,
        registry: CollectorRegistry = REGISTRY,
        live: Probe | None = None,
        ready: Probe | None = None,
        addr: str = DEFAULT_BIND_ADDRESS,
        request_timeout_s: float = 5.0,
        max_handlers: int = 8,
    ):
        if request_timeout_s <= 0 or max_handlers < 1:
            raise ValueError("request_timeout_s must be > 0 and max_handlers >= 1")
        always: Probe = lambda: (True, {})  # noqa: E731
        probes = {"/healthz": live or always, "/readyz": ready or always}

        class Handler(BaseHTTPRequestHandler):
            timeout = request_timeout_s  # also bounds sending the answer to a client that does not read

            def setup(self) -> None:
                super().setup()
                self.rfile.close()  # the socket closes only once every file made from it is closed
                deadline = time.monotonic() + request_timeout_s
                self.rfile = io.BufferedReader(_DeadlineSocketIO(self.connection, deadline))

            def do_GET(self) -> None:
                self.connection.settimeout(request_timeout_s)
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

        self.httpd = _BoundedHTTPServer((addr, port), Handler, max_handlers, wait_s=request_timeout_s)
        self.address = addr
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="ops-http", daemon=True)

    def start(self) -> OperationsServer:
        self._thread.start()
        log.info("serving /metrics, /healthz, /readyz on %s port %d", self.address, self.port)
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
        return pipeline.ready, {
            "assigned_partitions": len(pipeline.partitions),
            "paused_partitions": paused,
            "clickhouse_shards_down": pipeline.shards_down,
        }

    return live, ready
