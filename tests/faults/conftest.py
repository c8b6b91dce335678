"""The fault suite (marker `faults`): faults injected into the real stack under traffic, and bad
input between good messages; every scenario ends with ClickHouse compared to Postgres.

`CDC_FAULTS_SCALE=ci` (the default, what CI runs) uses reduced counts and durations;
`CDC_FAULTS_SCALE=full` the documented ones (20 kills, ClickHouse down for 60 s, ...). At the end
the suite prints its table — scenario, events, lost, double-counted, dead-lettered, recovery time
— and writes it to tests/faults/results.md (full) or results-ci.md (ci, not kept in git).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.helpers import BAD_INPUT, RESULTS, SCALE

# The full run's table is kept (and quoted in the README); a CI-scale run writes beside it.
RESULTS_FILE = Path(__file__).with_name("results.md" if SCALE == "full" else f"results-{SCALE}.md")
HEADER = ("scenario", "events", "lost", "double-counted", "dead-lettered", "recovery (s)", "result", "notes")


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def results_table() -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for r in RESULTS:
        cells = (
            r.scenario,
            r.events,
            r.lost,
            r.double_counted,
            r.dead_lettered,
            r.recovery_s,
            "ok" if r.ok else "FAILED",
            r.note,
        )
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def bad_input_table() -> str:
    lines = ["| bad input | outcome | cdc.error.message (or behaviour) |", "|---|---|---|"]
    for kind, outcome, reason in BAD_INPUT:
        reason = reason.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {kind} | {outcome} | {reason[:150]}{'…' if len(reason) > 150 else ''} |")
    return "\n".join(lines)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The fault scenarios run last: they add a lot of traffic to the shared topics, which every
    later end-to-end test would otherwise have to read again from the beginning. Last of all the
    hostile-input scenario, which leaves poison in the live change topics."""
    here = Path(__file__).parent
    faults = [i for i in items if here in Path(str(i.path)).parents]
    hostile = [i for i in faults if Path(str(i.path)).name == "test_hostile_stack.py"]
    if faults and (len(faults) != len(items) or hostile):
        others = [i for i in items if i not in faults]
        items[:] = others + [i for i in faults if i not in hostile] + hostile


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not RESULTS:
        return
    table = results_table()
    terminalreporter.write_sep("=", f"fault suite (CDC_FAULTS_SCALE={SCALE})")
    terminalreporter.write_line(table)
    text = (
        f"# Fault suite results (CDC_FAULTS_SCALE={SCALE})\n\n"
        "Written by `pytest -m faults` (tests/faults). Recovery: seconds from the end of the fault until a\n"
        "change committed in Postgres at that moment is queryable in ClickHouse.\n\n" + table + "\n"
    )
    if BAD_INPUT:
        details = bad_input_table()
        terminalreporter.write_line("")
        terminalreporter.write_line(details)
        text += "\n" + details + "\n"
    RESULTS_FILE.write_text(text)
