"""Stopping a test's own stack so that nothing outlives the test."""

from __future__ import annotations

from cdc_dev.stack import manager, process
from cdc_dev.stack.components import all_components
from cdc_dev.stack.layout import StackLayout


def down_leaving_nothing(layout: StackLayout) -> None:
    """`stack down`, then assert that no part outlived it and no port is still open. The parts'
    PIDs come from their pid files alone (no health check, no memory sum), and `down` runs even
    if reading them fails: a teardown error must not leave a whole stack running."""
    pids: set[int] = set()
    try:
        pids = {c.pid for c in all_components(layout) if c.pid}
    finally:
        manager.down(layout)
    assert not [pid for pid in pids if process.is_alive(pid)], "a part outlived `stack down`"
    assert [port for port in layout.all_ports if process.port_open(port)] == []
