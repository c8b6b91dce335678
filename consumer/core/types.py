"""The decoded change every stage after DECODE works on, and its unchanged-TOAST sentinel."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["DEFAULT_TOAST_PLACEHOLDER", "UNCHANGED_TOAST", "ChangeEvent"]

DEFAULT_TOAST_PLACEHOLDER = "__debezium_unavailable_value"


class _UnchangedToast:
    """Type of the `UNCHANGED_TOAST` sentinel: one instance, kept by copy and pickle."""

    __slots__ = ()
    _instance: _UnchangedToast | None = None

    def __new__(cls) -> _UnchangedToast:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNCHANGED_TOAST"

    def __reduce__(self) -> str:
        return "UNCHANGED_TOAST"


UNCHANGED_TOAST: Any = _UnchangedToast()
"""Stands for a column value Debezium did not send (unchanged TOAST). Never a real value."""


@dataclass(frozen=True, slots=True)
class ChangeEvent:
    op: str  # 'c' create, 'u' update, 'd' delete, 'r' snapshot read, 't' truncate
    table: str  # source.table
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    lsn: int | None  # source.lsn
    commit_ts_ms: int | None  # source.ts_ms (Postgres commit time)
    snapshot: bool  # source.snapshot not in (None, "false")
