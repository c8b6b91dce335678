"""How a change of a fact table becomes signed rows, declared once for both lanes.

A fact table holds signed rows: +1 for an image that now exists, -1 to retract an image that no
longer does, so additive KPI states (sums of `_sign`, of `_sign * cost`) stay exact. Per Debezium
op, `FACT_RULES` says which images the change must carry and the signed rows it produces. The
Python lane (`consumer.transform.mapping.Mapper`) follows the rules row by row; the ClickHouse lane
(`consumer.sink.server_plan.compile_plan`) compiles them into its view (the fan-out into signed
rows) and into the checks that make ClickHouse refuse a batch the rules leave to Python.

Ops without a rule here: ``t`` (truncate) is handled by the mapping's `truncate_action`, ``m`` (a
logical decoding message) carries no row and never reaches the mapping.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["FACT_RULES", "SERVER_RULES", "SIDES", "FactRule", "SignedImage"]

Side = Literal["before", "after"]
SIDES: tuple[Side, ...] = ("before", "after")


@dataclass(frozen=True)
class SignedImage:
    side: Side
    sign: int  # +1: the image now exists; -1: the image is retracted

    @property
    def must_be_complete(self) -> bool:
        """A retraction cancels a row that was written with every column; an image with a non-key
        column absent or NULL (REPLICA IDENTITY DEFAULT sends only the key) cannot cancel it."""
        return self.sign < 0


@dataclass(frozen=True)
class FactRule:
    op: str
    rows: tuple[SignedImage, ...]  # in the order they are written
    # Whether the ClickHouse lane may apply this op; otherwise a batch holding it is applied in Python.
    server_side: bool

    @property
    def needs(self) -> frozenset[Side]:
        """The images the change must carry."""
        return frozenset(row.side for row in self.rows)


_NEW_AFTER = SignedImage("after", +1)
_RETRACT_BEFORE = SignedImage("before", -1)

FACT_RULES: dict[str, FactRule] = {
    rule.op: rule
    for rule in (
        FactRule("c", (_NEW_AFTER,), server_side=True),
        # A snapshot read asserts a state ClickHouse may already hold (a re-snapshot, a replay):
        # the pipeline reconciles it with the stored rows, which only the Python lane can do.
        FactRule("r", (_NEW_AFTER,), server_side=False),
        FactRule("u", (_RETRACT_BEFORE, _NEW_AFTER), server_side=True),
        FactRule("d", (_RETRACT_BEFORE,), server_side=True),
    )
}

SERVER_RULES: tuple[FactRule, ...] = tuple(rule for rule in FACT_RULES.values() if rule.server_side)
