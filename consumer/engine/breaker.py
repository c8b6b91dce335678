"""The poison breaker: a topic whose messages are mostly poison stops being dead-lettered.

One poison message is a bad message; a topic of them is a bad deploy (the wrong converter, a
producer writing another format, a mapping that no longer fits). Dead-lettering on would empty
the topic into the DLQ and commit past it. Instead, once more than `share` of a topic's messages
read in the last `window_s` seconds are poison (and at least `min_poison` of them), the breaker
opens: the partitions that meet poison wait, the gauge `cdc_poison_breaker_open` alerts, and
after `window_s` they try again (a topic that is still bad opens the breaker again).
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Callable

from consumer.ops import metrics


class PoisonBreaker:
    def __init__(
        self, share: float, min_poison: int, window_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.share = share
        self.min_poison = min_poison
        self.window_s = window_s
        self.clock = clock
        # topic → [second, messages read, poison] per second of the window
        self._seconds: dict[str, deque[list[int]]] = defaultdict(deque)
        self._open_until: dict[str, float] = {}

    def read(self, topic: str, messages: int) -> None:
        self._bucket(topic)[1] += messages

    def poison(self, topic: str) -> bool:
        """A poison message of `topic`. True: the breaker is open, do not dead-letter it."""
        now = self.clock()
        if self.hold_s(topic) > 0:
            return True
        self._bucket(topic)[2] += 1
        if not self.min_poison:
            return False
        buckets = self._seconds[topic]
        poison = sum(b[2] for b in buckets)
        read = max(sum(b[1] for b in buckets), poison)
        if poison >= self.min_poison and poison > self.share * read:
            self._open_until[topic] = now + self.window_s
            metrics.poison_breaker_open.labels(topic).set(1)
            return True
        return False

    def hold_s(self, topic: str) -> float:
        """How long the topic's partitions that met poison still wait (0: closed)."""
        left = self._open_until.get(topic, 0.0) - self.clock()
        if left <= 0 and topic in self._open_until:
            del self._open_until[topic]
            self._seconds[topic].clear()
            metrics.poison_breaker_open.labels(topic).set(0)
        return max(0.0, left)

    def _bucket(self, topic: str) -> list[int]:
        second = int(self.clock())
        buckets = self._seconds[topic]
        while buckets and buckets[0][0] <= second - self.window_s:
            buckets.popleft()
        if not buckets or buckets[-1][0] != second:
            buckets.append([second, 0, 0])
        return buckets[-1]
