"""`cdc-consumer stack up | down | status | env`: the whole native stack as one unit."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from cdc_dev.stack import process
from cdc_dev.stack.components import Component, Kafka, KafkaConnect, Postgres, all_components
from cdc_dev.stack.install import ensure_installed
from cdc_dev.stack.layout import REPO_ROOT, StackLayout
from cdc_dev.stack.security import known_secrets
from consumer.core.secrets import redact_secrets

log = logging.getLogger(__name__)

CONNECTORS = {
    "avro": REPO_ROOT / "connectors" / "debezium-postgres.json",
    "json": REPO_ROOT / "connectors" / "debezium-postgres-json.json",
}


# Pid file names of Kafka and ClickHouse nodes, for any node count (layout's node names).
SCALABLE_NODE = re.compile(r"(kafka|clickhouse)(-[0-9]+)?")


class StackError(RuntimeError):
    pass


@dataclass(frozen=True)
class ComponentStatus:
    name: str
    address: str
    pid: int | None
    healthy: bool
    rss_bytes: int


def up(layout: StackLayout, connector: str | None = "avro") -> dict[str, float]:
    """Install what is missing, start what is not running, wait for health, register the connector.

    Idempotent: parts already running and healthy are left alone. Returns seconds per phase.
    """
    timings: dict[str, float] = {}
    started = time.monotonic()
    ensure_installed(layout)
    timings["install"] = time.monotonic() - started

    running = _running_mode(layout)
    if running is not None and running != _mode(layout):
        raise StackError(
            f"the stack in {layout.root} runs {running}, and CDC_STACK_SECURE asks for {_mode(layout)}; "
            "`stack down` first (each mode keeps its own data)"
        )
    _mode_file(layout).parent.mkdir(parents=True, exist_ok=True)
    _mode_file(layout).write_text(_mode(layout))
    components = all_components(layout)
    elsewhere = _nodes_of_another_shape(layout, components)
    if elsewhere:
        raise StackError(
            f"{', '.join(elsewhere)} of {layout.root} run with other node counts than "
            "CDC_STACK_KAFKA_BROKERS / CDC_STACK_CLICKHOUSE_SHARDS ask for; `stack down` first "
            "(each node count keeps its own data)"
        )
    for component in components:
        if component.pid is not None:
            continue
        busy = [port for port in component.ports if process.port_open(port)]
        if busy:
            raise StackError(
                f"{component.name}: port(s) {busy} are taken by another process; "
                "move the stack with CDC_STACK_PORT_OFFSET or CDC_STACK_*_PORT (see `stack status`)"
            )
        if isinstance(component, KafkaConnect):
            for broker in components:
                if isinstance(broker, Kafka):
                    _wait_healthy(broker)
        log.info("starting %s on %s", component.name, component.address)
        component.start()
    for component in components:
        _wait_healthy(component)
        if isinstance(component, Postgres):
            component.provision()
    timings["start"] = time.monotonic() - started - timings["install"]
    if connector:
        register_connector(layout, CONNECTORS[connector])
    timings["total"] = time.monotonic() - started
    return timings


def _mode(layout: StackLayout) -> str:
    return "secured" if layout.secure else "plain"


def _mode_file(layout: StackLayout) -> Path:
    return layout.run / "mode"


def _running_mode(layout: StackLayout) -> str | None:
    """The mode the stack of this state directory was started in, if any part of it runs."""
    if not _mode_file(layout).exists():
        return None
    if not any(process.read_pid(pidfile) for pidfile in layout.run.glob("*.pid")):
        return None
    return _mode_file(layout).read_text().strip()


def _wait_healthy(component: Component) -> None:
    def ready() -> bool:
        if component.pid is None:
            raise StackError(f"{component.name} exited during start; {_log_tail(component)}")
        return component.healthy()

    if not process.wait_until(ready, component.start_timeout, interval=0.5):
        raise StackError(f"{component.name} not healthy after {component.start_timeout:.0f}s; {_log_tail(component)}")


def _log_tail(component: Component, lines: int = 40, width: int = 400) -> str:
    """Where the part's log is, and its last lines: the log may not outlive the stack (a test's
    temporary one), and the reason a part died is in them."""
    path = component.layout.log(component.name)
    try:
        with path.open("rb") as log_file:
            log_file.seek(0, 2)
            log_file.seek(max(0, log_file.tell() - lines * 4 * width))
            tail = log_file.read().decode(errors="replace").splitlines()[-lines:]
    except OSError as exc:
        return f"its log {path} cannot be read: {exc}"
    shown = "\n".join(line[:width] + (" …" if len(line) > width else "") for line in tail)
    return f"the end of {path}:\n{redact_secrets(shown, *known_secrets(component.layout))}"


def _nodes_of_another_shape(layout: StackLayout, components: list[Component]) -> list[str]:
    """Kafka or ClickHouse nodes running from this state directory that the current node counts
    do not name (started with other CDC_STACK_KAFKA_BROKERS / CDC_STACK_CLICKHOUSE_SHARDS)."""
    expected = {component.name for component in components}
    return sorted(
        pidfile.stem
        for pidfile in layout.run.glob("*.pid")
        if pidfile.stem not in expected
        and SCALABLE_NODE.fullmatch(pidfile.stem)
        and process.read_pid(pidfile) is not None
    )


def down(layout: StackLayout) -> list[str]:
    """Stop every part by its PID, in reverse start order; returns the parts that were running.
    Kafka and ClickHouse nodes started with other node counts are stopped too, right after
    Connect (which needs the brokers) and before the current nodes' ports are checked, which
    they may hold; so `down` leaves nothing behind whatever the counts are now.
    Every part is stopped even if an earlier one misbehaves; problems are raised at the end.
    The parts are those of the mode the stack was started in, whatever CDC_STACK_SECURE says now."""
    running = _running_mode(layout)
    if running is not None:
        layout = dataclasses.replace(layout, secure=running == "secured")
    stopped, problems = [], []
    components = all_components(layout)
    others = _nodes_of_another_shape(layout, components)
    for component in reversed(components):
        if component.stop():
            stopped.append(component.name)
        if not process.wait_until(lambda c=component: not any(process.port_open(p) for p in c.ports), 15):
            busy = [port for port in component.ports if process.port_open(port)]
            problems.append(f"{component.name} stopped but port(s) {busy} are still open")
        if isinstance(component, KafkaConnect):
            stopped += [name for name in others if process.stop(layout.pidfile(name))]
    if problems:
        raise StackError("; ".join(problems))
    _mode_file(layout).unlink(missing_ok=True)
    return stopped


def status(layout: StackLayout) -> list[ComponentStatus]:
    result = []
    for component in all_components(layout):
        pid = component.pid
        result.append(
            ComponentStatus(
                name=component.name,
                address=component.address,
                pid=pid,
                healthy=pid is not None and component.healthy(),
                rss_bytes=process.rss_bytes(pid) if pid else 0,
            )
        )
    return result


def connector_config(path: Path) -> dict:
    return json.loads(path.read_text())


def register_connector(layout: StackLayout, path: Path, timeout: float = 120.0) -> None:
    """Create or update the connector through Connect's REST API and wait for it and its task to run."""
    spec = connector_config(path)
    name = spec["name"]
    response = requests.put(f"{layout.connect_url}/connectors/{name}/config", json=spec["config"], timeout=30)
    if response.status_code >= 400:
        raise StackError(f"Connect rejected connector {name}: {response.status_code} {response.text}")
    wait_connector_running(layout, name, timeout)


def connector_state(layout: StackLayout, name: str) -> dict:
    response = requests.get(f"{layout.connect_url}/connectors/{name}/status", timeout=10)
    response.raise_for_status()
    return response.json()


def wait_connector_running(layout: StackLayout, name: str, timeout: float = 120.0) -> None:
    last: dict = {}

    def running() -> bool:
        nonlocal last
        try:
            last = connector_state(layout, name)
        except requests.RequestException:
            return False
        tasks = last.get("tasks", [])
        failed = [t for t in tasks if t.get("state") == "FAILED"]
        if last.get("connector", {}).get("state") == "FAILED" or failed:
            raise StackError(f"connector {name} failed: {json.dumps(last)[:2000]}")
        return (
            last.get("connector", {}).get("state") == "RUNNING"
            and bool(tasks)
            and all(t.get("state") == "RUNNING" for t in tasks)
        )

    if not process.wait_until(running, timeout, interval=1.0):
        raise StackError(f"connector {name} not RUNNING after {timeout:.0f}s: {json.dumps(last)[:2000]}")


def restart_connect_worker(layout: StackLayout) -> None:
    """Stop and start the Connect worker (used by tests and operators after config changes)."""
    worker = KafkaConnect(layout)
    worker.stop()
    worker.start()
    _wait_healthy(worker)
