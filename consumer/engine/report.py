"""What one run of the engine did, counted by the engine itself (replay reports it; the
Prometheus families count the same events for the whole process)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class RunReport:
    messages_read: int = 0
    inserts: int = 0
    already_applied: int = 0
    dead_lettered: int = 0
    rows_inserted: Counter[str] = field(default_factory=Counter)  # by table
