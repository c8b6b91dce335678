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


def thread_cpu(pid: int) -> dict[str, dict[str, float]]:
    """User and system CPU seconds of `pid`'s threads, summed by thread name with digits dropped
    (librdkafka's `rdk:broker1` and `rdk:broker2` are one entry; the interpreter's is `python`)."""
    by_name: dict[str, dict[str, float]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip().rstrip("0123456789") or "?"
            text = (task / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended meanwhile
        utime, stime = (int(x) / CLK_TCK for x in text[text.rindex(")") + 2 :].split()[11:13])
        entry = by_name.setdefault(name, {"user_s": 0.0, "system_s": 0.0})
        entry["user_s"] += utime
        entry["system_s"] += stime
    return {name: {k: round(v, 2) for k, v in cpu.items()} for name, cpu in sorted(by_name.items())}


def merges_settled(client, timeout: float = 180.0, quiet_s: float = 1.0) -> float:
    """Wait until ClickHouse has had no merge running for `quiet_s`; the seconds waited.

    Merges are part of an ingest's cost and run after its inserts returned, so every phase waits
    for quiet before it starts (not to be charged with the previous phase's merges) and for its
    own merges before it stops counting. (On the benchmark's data none were running at either
    point; the spread between runs came from a cold server, see `cpu_rounds` in run.py.)"""
    began = time.monotonic()
    quiet_since = None
    while time.monotonic() - began < timeout:
        running = int(client.query("SELECT count() FROM system.merges").result_rows[0][0])
        now = time.monotonic()
        if running:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = now
        elif now - quiet_since >= quiet_s:
            break
        time.sleep(0.1)
    return round(time.monotonic() - began, 2)


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


def memory_trend(samples: list[Sample], skip_s: float = 10.0) -> dict:
    """RSS at start/end/max after a warm-up, the least-squares slope in MiB per minute over all
    of it and over its second half (a warm-up step is not a leak; a leak shows in both), and the
    RSS once a minute, for the record."""
    if not samples:
        return {}
    t0 = samples[0].t
    steady = [s for s in samples if s.t - t0 >= skip_s] or samples
    mib = [s.rss / 2**20 for s in steady]
    minutes = [(s.t - t0) / 60 for s in steady]
    half = len(steady) // 2
    return {
        "rss_first_mib": round(mib[0], 1),
        "rss_last_mib": round(mib[-1], 1),
        "rss_max_mib": round(max(mib), 1),
        "rss_slope_mib_per_min": _slope(minutes, mib),
        "rss_slope_second_half_mib_per_min": _slope(minutes[half:], mib[half:]),
        "samples": len(steady),
        "rss_per_minute_mib": [round(m, 1) for t, m in _per_minute(minutes, mib)],
    }


def _slope(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    if n < 3:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return round(sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var, 2) if var else 0.0


def _per_minute(minutes: list[float], mib: list[float]) -> list[tuple[float, float]]:
    """The first sample of every minute."""
    out: list[tuple[float, float]] = []
    for t, m in zip(minutes, mib, strict=True):
        if not out or int(t) > int(out[-1][0]):
            out.append((t, m))
    return out
