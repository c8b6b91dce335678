"""The operations port survives whoever can reach it: loopback by default, a deadline per request,
a bounded number of handler threads."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request

import pytest

from consumer.ops.http import OperationsServer
from consumer.settings import load_settings


@pytest.fixture
def server():
    started = []

    def start(**options) -> OperationsServer:
        started.append(OperationsServer(0, **options).start())
        return started[-1]

    yield start
    for item in started:
        item.stop()


def handler_threads() -> int:
    return sum("process_request" in thread.name for thread in threading.enumerate())


def closed_after(connection: socket.socket, limit_s: float) -> float:
    """Seconds until the server closed `connection` (reads return nothing or the connection resets)."""
    connection.settimeout(limit_s)
    started = time.monotonic()
    try:
        while connection.recv(1024):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - started


def test_the_port_listens_on_loopback_unless_told(server, monkeypatch) -> None:
    monkeypatch.delenv("CDC_METRICS_BIND_ADDRESS", raising=False)
    assert load_settings().metrics_bind_address == "127.0.0.1"
    assert server().httpd.server_address[0] == "127.0.0.1"
    monkeypatch.setenv("CDC_METRICS_BIND_ADDRESS", "0.0.0.0")
    assert load_settings().metrics_bind_address == "0.0.0.0"


def test_a_client_sending_half_a_request_is_dropped_after_the_timeout(server) -> None:
    ops = server(request_timeout_s=0.5)
    with socket.create_connection(("127.0.0.1", ops.port)) as client:
        client.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        assert 0.3 < closed_after(client, limit_s=5) < 2.5


def test_a_client_trickling_its_request_cannot_outlast_the_deadline(server) -> None:
    ops = server(request_timeout_s=0.6)
    with socket.create_connection(("127.0.0.1", ops.port)) as client:
        client.sendall(b"GET /metrics HTTP/1.1\r\n")
        started = time.monotonic()
        dropped = False
        while time.monotonic() - started < 4:
            try:
                client.sendall(b"X")  # well within any per-read timeout
            except OSError:
                dropped = True
                break
            time.sleep(0.1)
        assert dropped or closed_after(client, limit_s=0.5) < 0.5
        assert time.monotonic() - started < 2.5


def test_idle_connections_do_not_grow_threads_beyond_the_bound(server) -> None:
    ops = server(request_timeout_s=0.5, max_handlers=3)
    before = handler_threads()
    idle = [socket.create_connection(("127.0.0.1", ops.port)) for _ in range(20)]
    try:
        time.sleep(0.3)
        assert handler_threads() - before <= 3
    finally:
        for connection in idle:
            connection.close()
    # Once the idle ones are gone (or timed out), the port answers again.
    deadline = time.monotonic() + 10
    while True:
        try:
            assert urllib.request.urlopen(f"http://127.0.0.1:{ops.port}/healthz", timeout=2).status == 200
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_a_normal_request_is_answered(server) -> None:
    ops = server(request_timeout_s=1.0, max_handlers=2)
    for _ in range(5):
        assert b"# TYPE" in urllib.request.urlopen(f"http://127.0.0.1:{ops.port}/metrics", timeout=2).read()
