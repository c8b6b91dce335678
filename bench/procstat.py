"""CPU and memory of a process from /proc: what it used, not how long the wall clock took.

On a shared 2-core machine wall time depends on the neighbours; utime + stime of the process
(all its threads: librdkafka's, ClickHouse's pools) does not.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of `pid` (and of children it has waited for)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime, stime, cutime, cstime are fields 14-17.
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime + cutime + cstime) / CLK_TCK


def _status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def rss_bytes(pid: int) -> int:
    return _status(pid, "VmRSS")


def peak_rss_bytes(pid: int) -> int:
    return _status(pid, "VmHWM")


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


@dataclass
class Sample:
    t: float
    cpu: float
    rss: int


@dataclass
class Sampler:
    """Samples CPU seconds and RSS of a process every `interval` seconds in a thread."""

    pid: int
    interval: float = 1.0
    samples: list[Sample] = field(default_factory=list)
    peak_rss: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Sampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> Sample | None:
        try:
            s = Sample(time.monotonic(), cpu_seconds(self.pid), rss_bytes(self.pid))
            self.peak_rss = max(self.peak_rss, peak_rss_bytes(self.pid), s.rss)
        except (FileNotFoundError, ProcessLookupError, ValueError):
            return None
        self.samples.append(s)
        return s

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.sample()


def idle_cpu_rate(pid: int, seconds: float = 3.0) -> float:
    """CPU seconds per second a process uses while nothing is asked of it (subtracted as baseline)."""
    before = cpu_seconds(pid)
    time.sleep(seconds)
    return max(0.0, (cpu_seconds(pid) - before) / seconds)


def memory_trend(samples: list[Sample], skip_s: float = 10.0) -> dict[str, float]:
    """RSS at start/end/max after a warm-up, and the least-squares slope in MiB per minute."""
    if not samples:
        return {}
    t0 = samples[0].t
    steady = [s for s in samples if s.t - t0 >= skip_s] or samples
    n = len(steady)
    mib = [s.rss / 2**20 for s in steady]
    ts = [(s.t - t0) / 60 for s in steady]
    slope = 0.0
    if n >= 3:
        mt, mm = sum(ts) / n, sum(mib) / n
        var = sum((t - mt) ** 2 for t in ts)
        slope = sum((t - mt) * (m - mm) for t, m in zip(ts, mib, strict=True)) / var if var else 0.0
    return {
        "rss_first_mib": round(mib[0], 1),
        "rss_last_mib": round(mib[-1], 1),
        "rss_max_mib": round(max(mib), 1),
        "rss_slope_mib_per_min": round(slope, 2),
        "samples": n,
    }
