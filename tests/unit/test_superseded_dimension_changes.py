"""A dimension change whose unchanged-TOAST columns have no previous value is dead-lettered
(`previous_value_unknown`) — unless ClickHouse holds a newer version of its key, in which case the
change is superseded and left out. Found by the fault suite: a replay during live traffic re-read
campaign updates whose rows ReplacingMergeTree had merged away, of campaigns deleted since, and
dead-lettered them (4 spurious DLQ messages, and the DLQ alert)."""

from __future__ import annotations

import pytest

from consumer.sink.clickhouse import ClickHouseSink, UnresolvedPrevious
from consumer.transform.mapping import KEEP_PREVIOUS, load_mapping

CAMPAIGNS = load_mapping().for_topic("adtech.public.campaign")
NAMES = [*CAMPAIGNS.column_names, "_topic", "_partition", "_offset"]


def update(key: int, version: int, offset: int) -> tuple:
    values = {c.name: KEEP_PREVIOUS for c in CAMPAIGNS.columns}
    values.update(id=key, name=f"renamed {key}")
    return (*values.values(), version, 0, CAMPAIGNS.topic, 0, offset)


class Sink(ClickHouseSink):
    def __init__(self, newest: dict):
        self.newest = newest
        self.inserted: list = []

    def _latest_rows(self, table, column_names, keys):
        return {}  # no live version of the keys: deleted since, or never seen

    def _newest_versions(self, table, keys):
        return {k: v for k, v in self.newest.items() if k in keys}


def test_a_change_older_than_a_version_clickhouse_holds_is_left_out() -> None:
    sink = Sink(newest={(7,): 500})  # key 7: a delete marker of version 500
    assert sink.fill_previous(CAMPAIGNS, NAMES, [update(7, version=400, offset=40)]) == []


def test_a_change_without_any_newer_version_is_still_unresolved() -> None:
    sink = Sink(newest={(7,): 500})
    rows = [update(7, version=400, offset=40), update(8, version=410, offset=41)]
    with pytest.raises(UnresolvedPrevious) as caught:
        sink.fill_previous(CAMPAIGNS, NAMES, rows)
    assert caught.value.changes == [(0, 41)]  # (partition, offset)
