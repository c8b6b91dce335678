"""The latency phase's arithmetic: every change read gets the parts after its commit (Connect's
transaction, ours), only the changes sampled for their commit time get the total and Debezium's
part, and a change no poll saw is counted, not measured."""

from __future__ import annotations

import pytest

from bench.latency import Commits, latencies

PARTITION = ("adtech.public.impressions", 0)


def test_sampled_commit_times_and_unseen_changes():
    commits = Commits(
        {
            PARTITION: [
                # offset, Postgres commit (ms, sampled only), CreateTime (ms), read (s)
                (0, 1_000, 1_100, 1.2),
                (1, None, 1_150, 1.25),
                (2, None, 1_200, 1.3),
                (3, None, 1_900, 2.1),
            ]
        }
    )
    # Watermarks per poll: offset 0 applied by 1.5 s, offsets 1-2 by 2.0 s, offset 3 never.
    polls = [(1.0, {}), (1.5, {PARTITION: 0}), (2.0, {PARTITION: 2}), (2.5, {PARTITION: 2})]
    parts, unseen = latencies(commits, polls)
    assert unseen == 1
    assert parts["total"] == pytest.approx([0.5])
    assert parts["debezium"] == pytest.approx([0.1])
    assert parts["transaction"] == pytest.approx([0.1, 0.1, 0.1])
    assert parts["consumer"] == pytest.approx([0.3, 0.7, 0.75])
