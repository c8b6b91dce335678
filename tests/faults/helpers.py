"""What every fault scenario needs: traffic in the background, a probe that measures recovery end
to end, Kafka offsets, the consumer's /metrics and /readyz, and the final check against Postgres.

The check is the project's ground truth (`cdc_dev.verify`): `compare` (every KPI view and dimension
equal to Postgres) and `totals` (live rows per table on both sides: lost / double-counted); and,
from Kafka and ClickHouse alone, `cdc-consumer audit` (`assert_audit_clean`): every offset below
the committed positions applied exactly once or accounted for.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

import psycopg
import requests
from prometheus_client.parser import text_string_to_metric_families

from cdc_dev.generate import generate
from cdc_dev.stack import process
from cdc_dev.verify import compare, totals
from consumer.kafka.lag import LagReader
from tests.consumer_helpers import audit_issues, end_offsets, run_audit, topics_for, wait_caught_up

SCALE = os.environ.get("CDC_FAULTS_SCALE", "ci").strip().lower()
if SCALE not in ("ci", "full"):
    raise ValueError(f"CDC_FAULTS_SCALE={SCALE!r}: expected 'ci' (reduced counts, the default) or 'full'")
FULL = SCALE == "full"
RATE = 1500  # change events per second of background traffic (generate's realistic mix)

# A row of our own in `advertiser`, updated to measure recovery end to end (see `Probe`).
PROBE_ID = 9_000_000_001


def scaled(ci, full):
    """The CI count or the full (documented) count of a scenario."""
    return full if FULL else ci


@dataclass
class Result:
    scenario: str
    events: int
    lost: int | None = None
    double_counted: int | None = None
    dead_lettered: int | None = None
    recovery_s: float | None = None
    ok: bool = False
    note: str = ""


RESULTS: list[Result] = []
# The bad-input scenario's detail: (kind of input, outcome, the reason / behaviour seen).
BAD_INPUT: list[tuple[str, str, str]] = []


# -- traffic ---------------------------------------------------------------------------------
class _Stop(Exception):
    pass


class Traffic:
    """`generate` in a background thread until stopped (or for `duration` seconds). One long run,
    so that the rare kinds of change (campaigns and advertisers deleted with their facts, about
    one per 17 s and 70 s at this rate) come at their realistic rates; stopped between two ticks
    from its progress callback."""

    def __init__(self, dsn: str, seed: int, rate: float = RATE, duration: float | None = None):
        self.dsn, self.seed, self.rate, self.duration = dsn, seed, rate, duration
        self.events = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)

    def _progress(self, stats) -> None:
        self.events = stats.events
        if self._stop.is_set():
            raise _Stop

    def _run(self) -> None:
        try:
            self.events = generate(
                self.dsn, rate=self.rate, duration=self.duration or 3600, seed=self.seed, progress=self._progress
            ).events
        except _Stop:
            pass
        except BaseException as exc:
            self.error = exc

    def start(self) -> Traffic:
        self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(120)
        if self.error is not None:
            raise AssertionError(f"traffic generator failed: {self.error!r}") from self.error
        return self.events

    def wait(self) -> int:
        self._thread.join()
        return self.stop()

    def __enter__(self) -> Traffic:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# -- recovery, measured end to end -------------------------------------------------------------
class Probe:
    """A change committed in Postgres now, and the moment ClickHouse shows it: recovery time is
    from the end of a fault until a change made at that moment is queryable (behind whatever
    backlog the fault left). The probe row is an advertiser of our own, so Postgres and ClickHouse
    stay comparable; Debezium emits in commit order, so once the probe is in, so is everything
    committed before it (in its partition; `settle` waits for the others)."""

    def __init__(self, dsn: str):
        self.dsn = dsn

    def touch(self) -> int:
        """Upsert the probe row; returns its new updated_at in µs since the epoch."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            (micros,) = conn.execute(
                "INSERT INTO advertiser (id, name, created_at, updated_at) "
                "VALUES (%s, 'fault-probe', now(), clock_timestamp()) "
                "ON CONFLICT (id) DO UPDATE SET updated_at = clock_timestamp() "
                "RETURNING (extract(epoch FROM updated_at) * 1000000)::bigint",
                (PROBE_ID,),
            ).fetchone()
        return int(micros)

    def _exists(self) -> bool:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            return conn.execute("SELECT 1 FROM advertiser WHERE id = %s", (PROBE_ID,)).fetchone() is not None

    def wait_visible(self, ch, micros: int, timeout: float = 300, process=None) -> None:
        deadline = time.monotonic() + timeout
        checked = time.monotonic()
        while time.monotonic() < deadline:
            if time.monotonic() - checked > 5:
                checked = time.monotonic()
                if not self._exists():  # the traffic generator deleted our advertiser: once more
                    micros = self.touch()
            if process is not None and process.proc.poll() is not None:
                raise AssertionError(f"consumer exited with {process.proc.returncode}:\n{process.output()[-5000:]}")
            try:
                rows = ch.query(
                    "SELECT toUnixTimestamp64Micro(updated_at) FROM dim_advertiser FINAL "
                    "WHERE id = {id:Int64} AND _is_deleted = 0",
                    parameters={"id": PROBE_ID},
                ).result_rows
            except Exception:  # ClickHouse just restarted, a table not created yet
                rows = []
            if rows and rows[0][0] >= micros:
                return
            time.sleep(0.2)
        raise AssertionError(f"the probe change (updated_at {micros}) did not reach ClickHouse in {timeout}s")

    def recovery(self, ch, since: float, timeout: float = 300, process=None) -> float:
        """Seconds from `since` (time.monotonic() at the end of the fault) until a change committed
        now is in ClickHouse."""
        self.wait_visible(ch, self.touch(), timeout, process)
        return time.monotonic() - since


# -- Kafka offsets ---------------------------------------------------------------------------
def committed_offsets(bootstrap: str, group: str, topics: list[str]) -> dict[tuple[str, int], int | None]:
    reader = LagReader(bootstrap, group)
    try:
        return reader.committed(reader.partitions(topics))
    finally:
        reader.close()


def start_offsets(bootstrap: str, topics: list[str]) -> dict[tuple[str, int], int]:
    from confluent_kafka.admin import OffsetSpec

    reader = LagReader(bootstrap, "faults-probe")
    try:
        return reader.offsets(reader.partitions(topics), OffsetSpec.earliest())
    finally:
        reader.close()


def dlq_count(bootstrap: str, topic: str) -> int:
    return sum(end_offsets(bootstrap, [topic]).values())


# -- the consumer's operations port ------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def metric_sum(samples: dict, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and all((k, w) in ls for k, w in labels.items()))


def readiness(port: int) -> tuple[int, dict]:
    response = requests.get(f"http://127.0.0.1:{port}/readyz", timeout=10)
    return response.status_code, response.json()


def wait_port(port: int, timeout: float = 60) -> None:
    assert process.wait_until(lambda: process.port_open(port), timeout), f"nothing listens on {port}"


# -- the end of every scenario -----------------------------------------------------------------
@dataclass
class Outcome:
    result: Result
    report: object
    totals: dict = field(default_factory=dict)
    audit: dict = field(default_factory=dict)  # `cdc-consumer audit --json`


def settle_and_check(
    stack, target, result: Result, *, process=None, timeout: float = 300, probe: bool = True
) -> Outcome:
    """Traffic has stopped: wait until Debezium emitted everything (the probe; `probe=False` for
    topics of a test's own) and the group is caught up, then compare ClickHouse with Postgres and
    record the figures. Records the result before asserting, so a failing scenario still shows in
    the table."""
    if result not in RESULTS:
        RESULTS.append(result)
    ch = target.clickhouse()
    if probe:
        Probe(stack.postgres_dsn).wait_visible(ch, Probe(stack.postgres_dsn).touch(), timeout, process)
    wait_caught_up(stack, target, process, timeout=timeout)
    report = compare(stack.postgres_dsn, ch)
    table_totals = totals(stack.postgres_dsn, ch)
    lost = double = 0
    for t in table_totals.values():
        seen = [t.clickhouse] + ([t.clickhouse_aggregate] if t.clickhouse_aggregate is not None else [])
        lost += max([t.postgres - n for n in seen] + [0])
        double += max([n - t.postgres for n in seen] + [0])
    result.lost, result.double_counted = lost, double
    faults_only = result.dead_lettered is None  # a fault, no bad input: nothing may be dead-lettered
    if faults_only:
        result.dead_lettered = dlq_count(stack.kafka_bootstrap, target.env["CDC_DLQ_TOPIC"])
    audit_code, audit = run_audit(target)
    result.ok = (
        report.ok and lost == 0 and double == 0 and not (faults_only and result.dead_lettered) and audit_code == 0
    )
    details = "\n".join(str(t) for t in table_totals.values())
    assert report.ok, f"{result.scenario}: ClickHouse differs from Postgres\n{report}\n{details}"
    assert lost == 0 and double == 0, f"{result.scenario}: lost {lost}, double-counted {double}\n{details}"
    assert not (faults_only and result.dead_lettered), f"{result.scenario}: {result.dead_lettered} dead-lettered"
    assert audit_code == 0 and audit["ok"], f"{result.scenario}: audit found {audit_issues(audit)[:20]}"
    return Outcome(result, report, table_totals, audit)


def assert_audit_clean(target) -> dict:
    """`cdc-consumer audit` of the target's group exits 0: every offset of the change topics below
    the committed positions is applied exactly once or accounted for. Returns its report."""
    code, report = run_audit(target)
    assert code == 0 and report["ok"], f"audit exited {code}: {audit_issues(report)[:20]}"
    return report


def warm_up(stack, target, process=None) -> None:
    """A new consumer first reads the topics' history (the whole of it: its ClickHouse database
    is fresh); the fault then hits a consumer in step with Postgres, and the recovery time is the
    fault's, not the history's."""
    wait_caught_up(stack, target, process, timeout=900)


def mapped_topics(target) -> list[str]:
    return topics_for(target.env["CDC_TOPIC_PREFIX"])


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"
