"""The audit's offset arithmetic and the (rows, sign sum) it accepts per change (consumer/core/offsets.py,
consumer/sink/offset_evidence.py)."""

from __future__ import annotations

from consumer.core.offsets import runs_of, size, subtract
from consumer.sink.offset_evidence import op_patterns, op_rows


def test_runs_of_sorted_offsets() -> None:
    assert runs_of([]) == []
    assert runs_of([3, 4, 5, 7, 9, 10]) == [(3, 5), (7, 7), (9, 10)]
    assert size(runs_of([3, 4, 5, 7, 9, 10])) == 6


def test_subtract_yields_the_offsets_of_one_set_of_runs_missing_from_another() -> None:
    assert list(subtract([(0, 9)], [])) == list(range(10))
    assert list(subtract([(0, 9)], [(0, 9)])) == []
    assert list(subtract([(0, 9)], [(2, 3), (5, 5), (9, 12)])) == [0, 1, 4, 6, 7, 8]
    assert list(subtract([(0, 2), (10, 12)], [(1, 11)])) == [0, 12]
    assert list(subtract([(5, 6)], [(0, 1), (3, 4)])) == [5, 6]


def test_rows_per_op_follow_the_fact_rules() -> None:
    assert op_rows("c") == {(1, 1)}
    assert op_rows("u") == {(2, 0)}
    assert op_rows("d") == {(1, -1)}
    # a snapshot row replacing a live fact of other values retracts it first
    assert op_rows("r") == {(1, 1), (2, 0)}
    assert op_rows("t") == op_rows("m") == {(0, 0)}
    assert op_patterns("fact") == {(1, 1), (1, -1), (2, 0)}
    assert op_patterns("dimension") == {(1, 1)}
