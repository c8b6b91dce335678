"""Faults of the consumer itself, under traffic: kill -9 at random moments, a rebalance storm, and a
replay of an applied range beside the live consumer."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from tests.consumer_helpers import new_target, start_consumer
from tests.faults.helpers import Probe, Result, Traffic, scaled, settle_and_check, unique, warm_up

pytestmark = [pytest.mark.stack, pytest.mark.slow, pytest.mark.faults]


def test_kill_9_at_random_moments_during_traffic(stack, tmp_path) -> None:
    """SIGKILL, never a clean stop: half of the kills at a random time, half right after a random
    insert and before its commit (CDC_FAULT_KILL_AFTER_INSERTS), the moment most likely to count
    twice. The consumer restarts at once under the same static group membership
    (CDC_GROUP_INSTANCE_ID), as a supervisor would restart it; a dynamic member would wait out
    the session timeout (45 s) before getting its partitions back."""
    kills = scaled(3, 20)
    rng = random.Random(5100)
    target = new_target(stack, tmp_path, CDC_GROUP_INSTANCE_ID=unique("faults-kill"))
    self_kill = {"CDC_FAULT_KILL_AFTER_INSERTS": ""}
    started = [start_consumer(target, tmp_path)]
    moments = []
    try:
        warm_up(stack, target, started[-1])
        with Traffic(stack.postgres_dsn, seed=5101) as traffic:
            time.sleep(2)
            for kill in range(kills):
                consumer = started[-1]
                if kill % 2:
                    code = consumer.proc.wait(120)  # it dies by itself after its n-th insert, before the commit
                    moments.append(f"after insert {self_kill['CDC_FAULT_KILL_AFTER_INSERTS']}")
                else:
                    delay = rng.uniform(0.3, 4.0)
                    time.sleep(delay)
                    os.kill(consumer.proc.pid, signal.SIGKILL)
                    code = consumer.proc.wait(30)
                    moments.append(f"{delay:.1f}s")
                assert code == -signal.SIGKILL, consumer.output()[-3000:]
                if kill + 1 < kills and (kill + 1) % 2:
                    self_kill["CDC_FAULT_KILL_AFTER_INSERTS"] = str(rng.randint(1, 6))
                    started.append(start_consumer(target, tmp_path, **self_kill))
                else:
                    started.append(start_consumer(target, tmp_path))
            restarted = time.monotonic()
            recovery = Probe(stack.postgres_dsn).recovery(target.clickhouse(), restarted, process=started[-1])
        settle_and_check(
            stack,
            target,
            Result(
                f"consumer kill -9 ×{kills}",
                traffic.events,
                recovery_s=recovery,
                note=f"static membership; killed at {', '.join(moments[:6])}{' …' if len(moments) > 6 else ''}",
            ),
            process=started[-1],
        )
    finally:
        for consumer in started:
            consumer.stop()


def test_rebalance_storm_three_members_joining_and_leaving(stack, tmp_path) -> None:
    """Three members in one group; every few seconds one leaves (SIGTERM: it flushes, commits
    and leaves the group) and a new one joins, under traffic. Cooperative-sticky rebalances."""
    duration = scaled(20, 60)
    rng = random.Random(5200)
    target = new_target(stack, tmp_path)
    members = [start_consumer(target, tmp_path)]
    everyone = list(members)
    changes = 0
    try:
        # One migrator at a time (migrate.py): the first member creates the schema, then the others join.
        wait_until_consuming(members[0])
        members += [start_consumer(target, tmp_path) for _ in range(2)]
        everyone += members[1:]
        warm_up(stack, target, None)
        with Traffic(stack.postgres_dsn, seed=5201) as traffic:
            time.sleep(3)
            ends = time.monotonic() + duration
            while time.monotonic() < ends:
                time.sleep(rng.uniform(1.5, 4.0))
                leaving = members.pop(rng.randrange(len(members)))
                # 0, or SIGTERM's default action for a member stopped before its loop began.
                if leaving.stop(60) not in (0, -signal.SIGTERM):
                    pytest.fail(f"a leaving member failed:\n{leaving.output()[-3000:]}")
                joining = start_consumer(target, tmp_path)
                members.append(joining)
                everyone.append(joining)
                changes += 2
            last_change = time.monotonic()
            recovery = Probe(stack.postgres_dsn).recovery(target.clickhouse(), last_change)
        for member in members:
            assert member.proc.poll() is None, member.output()[-3000:]
        rebalances = sum(m.output().count("assigned [") + m.output().count("revoked [") for m in everyone)
        settle_and_check(
            stack,
            target,
            Result(
                f"rebalance storm, 3 members, {duration} s",
                traffic.events,
                recovery_s=recovery,
                note=f"{changes} joins/leaves, {rebalances} assignment changes",
            ),
        )
    finally:
        for member in everyone:
            member.stop()


def wait_until_consuming(consumer, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while "assigned [" not in consumer.output():
        assert consumer.proc.poll() is None, consumer.output()[-3000:]
        assert time.monotonic() < deadline, f"no partitions after {timeout}s:\n{consumer.output()[-3000:]}"
        time.sleep(0.2)


def test_replay_of_an_applied_range_during_live_traffic(stack, tmp_path) -> None:
    """`cdc-consumer replay --from-beginning` (a backfill group beside the live consumer) while
    traffic flows: every message of its range is already in ClickHouse, so it writes nothing."""
    target = new_target(stack, tmp_path)
    consumer = start_consumer(target, tmp_path)
    try:
        warm_up(stack, target, consumer)
        with Traffic(stack.postgres_dsn, seed=5301) as traffic:
            time.sleep(scaled(4, 10))
            done = subprocess.run(
                [sys.executable, "-m", "consumer.cli", "replay", "--from-beginning", "--json"],
                env={**target.env, "CDC_METRICS_PORT": "0"},
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
            report = json.loads(done.stdout)
            replayed = time.monotonic()
            time.sleep(scaled(2, 5))
            recovery = Probe(stack.postgres_dsn).recovery(target.clickhouse(), replayed, process=consumer)
        assert report["completed"] and report["mode"] == "backfill", report
        assert report["messages_read"] > 0 and report["already_applied"] > 0, report
        rows = report["rows_inserted"]
        facts = rows["fact_impressions"] + rows["fact_clicks"]
        # Dimension versions a newer one superseded are merged away by ReplacingMergeTree, so the
        # replay finds their offsets missing and writes them again: older versions, which FINAL
        # ignores (the comparison below proves the dimensions unchanged).
        superseded = rows["dim_advertiser"] + rows["dim_campaign"]
        settle_and_check(
            stack,
            target,
            Result(
                "replay of an applied range, live traffic",
                traffic.events,
                recovery_s=recovery,
                note=f"replay read {report['messages_read']:,}, skipped {report['already_applied']:,}, "
                f"wrote {facts} fact rows ({superseded} superseded dim versions)",
            ),
            process=consumer,
        )
        assert facts == 0, f"the replay re-applied facts ClickHouse held: {rows}"
    finally:
        consumer.stop()
