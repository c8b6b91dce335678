"""The crash-only watchdog: a consumer loop stuck for longer than CDC_STALL_EXIT_S exits the
process (code 70) for its supervisor to restart it; a loop that comes round is left alone."""

from __future__ import annotations

import time

from consumer.app.runner import STALLED_EXIT_CODE, start_watchdog


class Loop:
    def __init__(self):
        self.last_step = time.monotonic()


def test_a_stuck_loop_exits_the_process() -> None:
    loop, exits = Loop(), []
    start_watchdog(loop, stall_s=0.2, exit=exits.append, interval_s=0.05)
    time.sleep(0.5)
    assert exits == [STALLED_EXIT_CODE]


def test_a_turning_loop_is_left_alone() -> None:
    loop, exits = Loop(), []
    start_watchdog(loop, stall_s=0.3, exit=exits.append, interval_s=0.05)
    for _ in range(10):
        loop.last_step = time.monotonic()
        time.sleep(0.05)
    assert exits == []
