"""Sets of Kafka offsets as sorted, inclusive runs: a partition's offsets come in long stretches
(a transaction's records, a table's rows of them), so runs stay few where sets would be large."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

Runs = list[tuple[int, int]]


def runs_of(offsets: Iterable[int]) -> Runs:
    runs: Runs = []
    for offset in offsets:
        if runs and runs[-1][1] + 1 == offset:
            runs[-1] = (runs[-1][0], offset)
        else:
            runs.append((offset, offset))
    return runs


def subtract(runs: Runs, minus: Runs) -> Iterator[int]:
    """The offsets of `runs` not in `minus` (both sorted)."""
    j = 0
    for lo, hi in runs:
        at = lo
        while at <= hi:
            while j < len(minus) and minus[j][1] < at:
                j += 1
            if j < len(minus) and minus[j][0] <= at:
                at = minus[j][1] + 1
                continue
            stop = hi if j == len(minus) else min(hi, minus[j][0] - 1)
            yield from range(at, stop + 1)
            at = stop + 1


def size(runs: Runs) -> int:
    return sum(hi - lo + 1 for lo, hi in runs)
