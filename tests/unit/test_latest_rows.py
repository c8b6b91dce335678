"""The rows last applied from a dimension partition fill a change's unchanged (TOASTed) columns
without asking ClickHouse — but only for changes read after them, and only while kept."""

from __future__ import annotations

from consumer.sink.clickhouse import ClickHouseSink, LatestRows
from consumer.transform.mapping import KEEP_PREVIOUS, load_mapping

CAMPAIGNS = load_mapping().for_topic("adtech.public.campaign")
NAMES = [*CAMPAIGNS.column_names, "_topic", "_partition", "_offset"]
CREATIVE = NAMES.index("creative")


def change(key: int, offset: int, creative: object = KEEP_PREVIOUS, deleted: int = 0) -> tuple:
    values = {c.name: f"{c.name} of {key}" for c in CAMPAIGNS.columns}
    values.update(id=key, creative=creative)
    return (*values.values(), offset, deleted, CAMPAIGNS.topic, 0, offset)


class Sink(ClickHouseSink):
    """ClickHouse holds version `stored` of every key; look-ups are counted."""

    def __init__(self, stored: str = "from ClickHouse"):
        self.stored = stored
        self.asked: list[set] = []

    def _latest_rows(self, table, column_names, keys):
        self.asked.append(keys)
        return {key: change(key[0], 0, self.stored) for key in keys}


def applied(latest: LatestRows, *rows: tuple) -> None:
    for row in rows:
        latest.remember((row[0],), row[-1], None if row[NAMES.index("_is_deleted")] else row)


def fill(sink: Sink, latest: LatestRows, rows: list[tuple]) -> list:
    return [row[CREATIVE] for row in sink.fill_previous(CAMPAIGNS, NAMES, rows, {(CAMPAIGNS.topic, 0): latest})]


def test_a_later_change_takes_the_kept_row_and_asks_nothing() -> None:
    sink, latest = Sink(), LatestRows(10, 2**20)
    applied(latest, change(7, offset=10, creative="<div>v1"))
    assert fill(sink, latest, [change(7, offset=11), change(8, offset=12)]) == ["<div>v1", "from ClickHouse"]
    assert sink.asked == [{(8,)}]


def test_a_change_read_again_from_an_earlier_offset_asks_clickhouse() -> None:
    sink, latest = Sink(), LatestRows(10, 2**20)
    applied(latest, change(7, offset=10, creative="<div>v1"))
    assert fill(sink, latest, [change(7, offset=10)]) == ["from ClickHouse"]
    assert sink.asked == [{(7,)}]


def test_an_earlier_row_of_the_batch_comes_before_the_kept_one() -> None:
    sink, latest = Sink(), LatestRows(10, 2**20)
    applied(latest, change(7, offset=10, creative="<div>v1"))
    rows = [change(7, offset=11, creative="<div>v2"), change(7, offset=12)]
    assert fill(sink, latest, rows) == ["<div>v2", "<div>v2"]
    assert sink.asked == []


def test_a_delete_forgets_the_key_and_the_least_recently_used_go_first() -> None:
    latest = LatestRows(2, 2**20)
    applied(latest, change(1, 1, "a"), change(2, 2, "b"))
    assert latest.before((1,), 5) is not None  # 1 used: 2 is now the oldest
    applied(latest, change(3, 3, "c"))
    assert latest.before((2,), 5) is None and len(latest) == 2
    applied(latest, change(1, 4, "a", deleted=1))
    assert latest.before((1,), 5) is None and latest.before((3,), 5) is not None


def test_capacity_zero_keeps_nothing() -> None:
    sink, latest = Sink(), LatestRows(0, 2**20)
    applied(latest, change(7, offset=10, creative="<div>v1"))
    assert fill(sink, latest, [change(7, offset=11)]) == ["from ClickHouse"]


def test_the_rows_kept_stay_within_their_byte_budget() -> None:
    creative = "x" * 10_000
    latest = LatestRows(1_000, 35_000)
    applied(latest, *(change(key, key, creative) for key in range(1, 6)))
    assert len(latest) == 3 and 30_000 < latest.bytes <= 35_000
    assert [latest.before((key,), 99) is not None for key in range(1, 6)] == [False, False, True, True, True]
    applied(latest, change(3, 7, "small"), change(4, 8, deleted=1))  # a smaller version, a delete
    assert len(latest) == 2 and 10_000 < latest.bytes < 12_000


def test_a_row_larger_than_the_budget_is_not_kept_and_drops_the_older_version() -> None:
    latest = LatestRows(10, 5_000)
    applied(latest, change(1, 1, "small"))
    applied(latest, change(1, 2, "x" * 10_000))
    assert len(latest) == 0 and latest.bytes == 0
    assert latest.before((1,), 5) is None
