"""The chdb-core launcher serves a real ClickHouse that survives kill -9 (cdc_dev.stack.clickhouse_server)."""

from __future__ import annotations

import datetime as dt
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import clickhouse_connect
import pytest

from cdc_dev.stack.clickhouse_server import wait_healthy

ROOT = Path(__file__).resolve().parent.parent
ROWS = 100_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launcher:
    """Starts launcher processes and remembers them, so teardown can kill every one."""

    def __init__(self, tmp_path: Path) -> None:
        self.data_dir = tmp_path / "clickhouse"
        self.log = tmp_path / "clickhouse.log"
        self.http_port, self.tcp_port = _free_port(), _free_port()
        self.procs: list[subprocess.Popen] = []

    def spawn(self, http_port: int | None = None, tcp_port: int | None = None) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "cdc_dev.stack.clickhouse_server", "--data-dir", str(self.data_dir)]
        cmd += ["--http-port", str(http_port or self.http_port), "--tcp-port", str(tcp_port or self.tcp_port)]
        with self.log.open("ab") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def start(self) -> subprocess.Popen:
        proc = self.spawn()
        try:
            wait_healthy(self.http_port, timeout=60, pid=proc.pid)
        except (RuntimeError, TimeoutError) as e:
            raise AssertionError(f"{e}\n--- launcher log ---\n{self.log.read_text()}") from e
        return proc

    def client(self):
        return clickhouse_connect.get_client(host="127.0.0.1", port=self.http_port)

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    la = Launcher(tmp_path)
    try:
        yield la
    finally:
        la.kill_all()


def _kill9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def test_serves_clickhouse_and_keeps_data_across_kill_9(launcher: Launcher) -> None:
    proc = launcher.start()
    assert (launcher.data_dir / "config.xml").is_file()

    client = launcher.client()
    assert client.server_version.startswith("26.9")
    client.command(
        """
        CREATE TABLE events (
            id UInt64,
            ts DateTime64(3, 'UTC'),
            kind LowCardinality(String),
            payload String CODEC(ZSTD(1))
        ) ENGINE = MergeTree ORDER BY id
        """
    )
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    rows = [(i, t0 + dt.timedelta(milliseconds=i), f"k{i % 7}", f"payload-{i}") for i in range(ROWS)]
    client.insert("events", rows, column_names=["id", "ts", "kind", "payload"])
    expected = (ROWS, ROWS * (ROWS - 1) // 2, 7)
    assert client.query("SELECT count(), sum(id), uniqExact(kind) FROM events").result_rows == [expected]

    # The native protocol port listens too (no native client is installed to go further).
    socket.create_connection(("127.0.0.1", launcher.tcp_port), timeout=5).close()

    # A second launcher on the same data dir is refused while the first one runs.
    second = launcher.spawn(http_port=_free_port(), tcp_port=_free_port())
    assert second.wait(timeout=60) == 1
    assert f"<http_port>{launcher.http_port}</http_port>" in (launcher.data_dir / "config.xml").read_text()

    # kill -9 right after the insert was acknowledged; a restart on the same dir still has every row.
    _kill9(proc)
    proc = launcher.start()
    client = launcher.client()
    assert client.query("SELECT count(), sum(id), uniqExact(kind) FROM events").result_rows == [expected]
    assert client.command("SELECT toString(max(ts)) FROM events") == "2026-01-01 00:01:39.999"

    # SIGTERM stops it promptly.
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == -signal.SIGTERM
