"""`cdc-consumer replay`: re-read a range of the change topics into ClickHouse, then stop.

The range starts at an offset (`--from-offset`, one for all partitions or `P:O,P:O`), a time
(`--from-timestamp`, resolved by Kafka's offsets_for_times) or the log start (`--from-beginning`)
and ends at the high watermarks seen when the replay starts (or at `--until-timestamp`). It runs
the service's own pipeline (decode → map → batch → sink → commit), bounded: nothing past the bound
is applied or committed, and it stops when every partition reached its bound.

Two modes:

* **backfill** (default): a group of its own, `<group>-backfill-<time>`, beside the live consumer,
  which goes on undisturbed. Its range ends, per partition, at the live group's committed offset
  at most: above it is the live consumer's work, so the two never apply the same message. The
  group is deleted when the replay is done.
* **move-group** (`--move-group`): moves the *live* group's committed offsets back to the start
  and replays as that group; when it stops, the group's offsets are at the bound, and the service
  carries on from there. Refused while the group has active members (their own commits would undo
  the move, and a running consumer would race the replay), and refused when it would move a
  partition *forward* past messages the group has not applied.

Idempotent either way, because every row carries the Kafka offset of its change: before it applies
a partition, the replay asks ClickHouse which offsets of its range are there (the same rows are the
applied watermark of the live consumer) and skips them. A replay over a range ClickHouse holds
changes nothing; after ClickHouse lost data (a dropped or truncated table, a restore from an older
backup) it re-applies exactly the missing changes. Inserts carry dedup tokens of the replay's own,
so ClickHouse's insert deduplication cannot mistake a re-applied batch for a retry of the original.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, KafkaException, TopicPartition
from confluent_kafka.admin import OffsetSpec

from consumer.engine.bounds import ReplayBounds
from consumer.kafka.client_config import kafka_client_config
from consumer.kafka.lag import LagReader
from consumer.kafka.source import Partition
from consumer.settings import ConfigError, Settings

log = logging.getLogger(__name__)

BACKFILL = "backfill"
MOVE_GROUP = "move-group"


class ReplayRefused(RuntimeError):
    """The replay would be unsafe as asked; the message says why and what to do instead."""


# -- parsing ------------------------------------------------------------------------------------
def parse_offsets(spec: str) -> int | dict[int, int]:
    """`100` (every partition) or `0:100,1:250` (per partition)."""
    text = spec.strip()
    try:
        if ":" not in text:
            value = int(text)
            if value < 0:
                raise ValueError
            return value
        result = {}
        for item in text.split(","):
            partition, offset = item.split(":")
            result[int(partition)] = int(offset)
        if any(p < 0 or o < 0 for p, o in result.items()):
            raise ValueError
        return result
    except ValueError:
        raise ConfigError(f"--from-offset {spec!r}: expected OFFSET or PARTITION:OFFSET[,PARTITION:OFFSET…]") from None


_RELATIVE = re.compile(r"^(?:-(?P<a>\d+(?:\.\d+)?)(?P<ua>[smhd])|(?P<b>\d+(?:\.\d+)?)(?P<ub>[smhd]) ?ago)$")


def parse_time_ms(text: str, now: float | None = None) -> int:
    """ISO 8601 (UTC unless it says otherwise), Unix seconds or milliseconds, or relative:
    `15m ago`, `2h ago`, `1d ago` (or `-15m`, written `--from-timestamp=-15m` on a command line)."""
    value = text.strip()
    now = time.time() if now is None else now
    relative = _RELATIVE.match(value)
    if relative:
        amount, unit = relative.group("a") or relative.group("b"), relative.group("ua") or relative.group("ub")
        seconds = float(amount) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
        return int((now - seconds) * 1000)
    if value.isdigit():
        number = int(value)
        return number if number >= 100_000_000_000 else number * 1000
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ConfigError(
            f"{text!r}: expected an ISO 8601 time, Unix seconds/milliseconds, or '15m ago' / '2h ago'"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


# -- plan -----------------------------------------------------------------------------------------
@dataclass
class ReplayPlan:
    mode: str
    group: str  # the group that runs the replay
    live_group: str
    topics: list[str]
    ranges: dict[Partition, range]  # what the replay reads, per partition ([start, bound))
    set_offsets: dict[Partition, int]  # committed offsets to write into `group` before it starts
    notes: dict[Partition, str] = field(default_factory=dict)
    started_ms: int = 0

    @property
    def total(self) -> int:
        return sum(len(r) for r in self.ranges.values())

    def as_dict(self) -> dict:
        return {
            "mode": self.mode,
            "group": self.group,
            "live_group": self.live_group,
            "topics": self.topics,
            "offsets": self.total,
            "partitions": [
                {"topic": t, "partition": p, "start": r.start, "stop": r.stop, "note": self.notes.get((t, p), "")}
                for (t, p), r in sorted(self.ranges.items())
            ],
        }


def plan_replay(
    settings: Settings,
    *,
    topics: list[str] | None = None,
    from_offset: str | None = None,
    from_timestamp: str | None = None,
    from_beginning: bool = False,
    until_timestamp: str | None = None,
    move_group: bool = False,
    now: float | None = None,
) -> ReplayPlan:
    from consumer.transform.mapping import load_mapping

    if sum(x is not None and x is not False for x in (from_offset, from_timestamp, from_beginning or None)) != 1:
        raise ConfigError("say where to start: exactly one of --from-offset, --from-timestamp, --from-beginning")
    kafka = kafka_client_config(settings)
    mapping = load_mapping(settings.mapping_file, settings.topic_prefix)
    selected = topics or mapping.topics
    unknown = [t for t in selected if t not in mapping.topics]
    if unknown:
        raise ConfigError(f"not a mapped topic: {', '.join(unknown)} (mapped: {', '.join(mapping.topics)})")
    now = time.time() if now is None else now
    live_group = settings.group_id
    reader = LagReader(kafka, live_group)
    try:
        partitions = reader.partitions(selected)
        if not partitions:
            raise ConfigError(f"none of {', '.join(selected)} exists in Kafka yet")
        low = reader.offsets(partitions, OffsetSpec.earliest())
        high = reader.offsets(partitions, OffsetSpec.latest())
        bound = dict(high)
        if until_timestamp is not None:
            at = _offsets_for_times(settings, partitions, parse_time_ms(until_timestamp, now))
            bound = {p: high[p] if at[p] < 0 else min(at[p], high[p]) for p in partitions}
        starts = _starts(settings, partitions, low, high, from_offset, from_timestamp, from_beginning, now)
        members = reader.members()
        committed = reader.committed(partitions)
    finally:
        reader.close()

    if move_group:
        ranges, set_offsets, notes = _move_group_ranges(live_group, members, partitions, starts, low, committed, bound)
        group = live_group
    else:
        ranges, set_offsets, notes = _backfill_ranges(live_group, partitions, starts, low, high, committed, bound)
        stamp = datetime.fromtimestamp(now, UTC).strftime("%Y%m%dT%H%M%SZ")
        group = f"{live_group}-backfill-{stamp}"
    for p in partitions:
        if p in starts and starts[p] < low[p]:
            notes.setdefault(p, f"offsets below {low[p]} are gone (retention)")
    return ReplayPlan(
        mode=MOVE_GROUP if move_group else BACKFILL,
        group=group,
        live_group=live_group,
        topics=sorted(selected),
        ranges=ranges,
        set_offsets=set_offsets,
        notes=notes,
        started_ms=int(now * 1000),
    )


_Ranges = tuple[dict[Partition, range], dict[Partition, int], dict[Partition, str]]


def _move_group_ranges(live_group, members, partitions, starts, low, committed, bound) -> _Ranges:
    """The live group itself goes back: refused under running members, or forward past unapplied work."""
    if members:
        who = ", ".join(sorted({f"{m.client_id}@{m.host}" for m in members}))
        raise ReplayRefused(
            f"refused: group {live_group!r} has {len(members)} active member(s) ({who}). Moving the offsets of a "
            "group under running consumers is undone by their next commit, and they would race the replay. "
            "Stop the consumers first (e.g. `systemctl stop cdc-consumer`), or replay beside them without "
            "--move-group (a separate backfill group)."
        )
    ranges: dict[Partition, range] = {}
    set_offsets: dict[Partition, int] = {}
    for p in partitions:
        current = low[p] if committed.get(p) is None else max(committed[p], low[p])
        if p not in starts:
            ranges[p] = range(current, current)  # not replayed, not moved
            continue
        start = starts[p]
        if start > current:
            raise ReplayRefused(
                f"refused: --move-group would move {p[0]}[{p[1]}] forward from {current} to {start}, past "
                f"{start - current} message(s) the group has not applied. Start at {current} or earlier."
            )
        ranges[p] = range(start, max(start, bound[p]))
        set_offsets[p] = start
    return ranges, set_offsets, {}


def _backfill_ranges(live_group, partitions, starts, low, high, committed, bound) -> _Ranges:
    """A group of its own reads up to where the live group reads on, never into the live group's work."""
    ranges: dict[Partition, range] = {}
    set_offsets: dict[Partition, int] = {}
    notes: dict[Partition, str] = {}
    for p in partitions:
        # The live group reads from its committed offset on (from the log start if it has none):
        # that is its work, and the backfill stops below it.
        live_from = low[p] if committed.get(p) is None else max(committed[p], low[p])
        stop = min(bound[p], live_from)
        if p not in starts:
            ranges[p] = range(high[p], high[p])
            set_offsets[p] = high[p]
            continue
        if stop < bound[p]:
            notes[p] = f"stops at {stop}, where the live group {live_group!r} reads on (bound was {bound[p]})"
        start = min(starts[p], stop)
        ranges[p] = range(start, stop)
        set_offsets[p] = start
    return ranges, set_offsets, notes


def _starts(settings, partitions, low, high, from_offset, from_timestamp, from_beginning, now) -> dict[Partition, int]:
    if from_beginning:
        return dict(low)
    if from_timestamp is not None:
        at = _offsets_for_times(settings, partitions, parse_time_ms(from_timestamp, now))
        return {p: high[p] if at[p] < 0 else max(at[p], low[p]) for p in partitions}
    spec = parse_offsets(from_offset)
    if isinstance(spec, int):
        return {p: min(max(spec, low[p]), high[p]) for p in partitions}
    known = {p for _, p in partitions}
    missing = sorted(set(spec) - known)
    if missing:
        raise ConfigError(f"--from-offset: no partition {missing} (partitions: {sorted(known)})")
    return {(t, p): min(max(spec[p], low[(t, p)]), high[(t, p)]) for t, p in partitions if p in spec}


def _offsets_for_times(settings: Settings, partitions: list[Partition], ms: int) -> dict[Partition, int]:
    """The first offset whose record time is at or after `ms`, per partition (-1: none)."""
    probe = Consumer(kafka_client_config(settings).client({"group.id": f"{settings.group_id}-replay-probe"}))
    try:
        found = probe.offsets_for_times([TopicPartition(t, p, ms) for t, p in partitions], timeout=30)
        return {(tp.topic, tp.partition): tp.offset for tp in found}
    finally:
        probe.close()


# -- run ------------------------------------------------------------------------------------------
@dataclass
class ReplayReport:
    plan: ReplayPlan
    completed: bool
    seconds: float
    messages_read: int
    already_applied: int
    dead_lettered: int
    rows_inserted: dict[str, int]
    unfinished: list[Partition]

    @property
    def rows(self) -> int:
        return sum(self.rows_inserted.values())

    def as_dict(self) -> dict:
        return {
            **self.plan.as_dict(),
            "completed": self.completed,
            "seconds": round(self.seconds, 3),
            "messages_read": self.messages_read,
            "already_applied": self.already_applied,
            "dead_lettered": self.dead_lettered,
            "rows_inserted": self.rows_inserted,
            "unfinished": [f"{t}[{p}]" for t, p in self.unfinished],
        }


def _set_group_offsets(settings: Settings, group: str, offsets: dict[Partition, int]) -> None:
    if not offsets:
        return
    reader = LagReader(kafka_client_config(settings), group)
    request = ConsumerGroupTopicPartitions(group, [TopicPartition(t, p, o) for (t, p), o in sorted(offsets.items())])
    try:
        reader.admin.alter_consumer_group_offsets([request])[group].result(30)
    except KafkaException as exc:
        raise ReplayRefused(f"Kafka refused to set the offsets of group {group!r}: {exc.args[0].str()}") from None


def _delete_group(settings: Settings, group: str) -> None:
    reader = LagReader(kafka_client_config(settings), group)
    for _ in range(10):  # the coordinator needs a moment to see the member gone
        try:
            reader.admin.delete_consumer_groups([group], request_timeout=10)[group].result(15)
            return
        except KafkaException as exc:
            log.debug("deleting group %s: %s", group, exc)
            time.sleep(1)
    log.warning("could not delete the backfill group %s; delete it with kafka-consumer-groups --delete", group)


def run_replay(settings: Settings, plan: ReplayPlan, *, progress=None) -> ReplayReport:
    """Runs the plan to its bounds. `progress(done, total)` is called as the replay advances."""
    from consumer.app.runner import build_pipeline

    _set_group_offsets(settings, plan.group, plan.set_offsets)
    bounds = ReplayBounds(dict(plan.ranges), token_suffix=f":replay-{plan.started_ms}")
    pipeline = build_pipeline(settings.model_copy(update={"group_id": plan.group}), plan.topics, bounds)
    tables = sorted({t.table for t in pipeline.mapping.tables if t.topic in plan.topics})
    on_step = None if progress is None else lambda: progress(_done(pipeline, plan), plan.total)
    started = time.monotonic()
    log.info(
        "replay (%s) as group %s: %d offsets in %d partitions", plan.mode, plan.group, plan.total, len(plan.ranges)
    )
    try:
        run = pipeline.run(on_step)
    finally:
        if plan.mode == BACKFILL:
            _delete_group(settings, plan.group)
    if progress is not None:
        progress(_done(pipeline, plan), plan.total)
    unfinished = sorted(p for p in plan.ranges if p not in bounds.finished)
    return ReplayReport(
        plan=plan,
        completed=not unfinished,
        seconds=time.monotonic() - started,
        messages_read=run.messages_read,
        already_applied=run.already_applied,
        dead_lettered=run.dead_lettered,
        rows_inserted={t: run.rows_inserted[t] for t in tables},
        unfinished=unfinished,
    )


def _done(pipeline, plan: ReplayPlan) -> int:
    """Offsets of the plan behind the replay (applied, skipped or batched)."""
    total = 0
    for partition, bound in plan.ranges.items():
        if partition in pipeline.bounds.finished:
            total += len(bound)
            continue
        state = pipeline.partitions.get(partition)
        if state is None:
            continue
        position = state.committed
        if state.batch.last_offset is not None:
            position = max(position, state.batch.last_offset + 1)
        total += min(max(position - bound.start, 0), len(bound))
    return total
