"""The stack's process helpers against real processes: a member of a process tree that exits
while its memory is being summed (its /proc entry answers ESRCH) is left out, not raised."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from cdc_dev.stack import process


def test_rss_of_a_tree_leaves_out_a_member_that_exits_while_it_is_read(monkeypatch) -> None:
    tree = subprocess.Popen(["sh", "-c", "sleep 60 & wait"])
    try:
        deadline = time.monotonic() + 10
        while not process._descendants(tree.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        (child,) = process._descendants(tree.pid)
        whole = process.rss_bytes(tree.pid)
        assert whole > 0
        read_text = Path.read_text

        def exiting_child(path: Path, *args, **kwargs) -> str:
            if path == Path(f"/proc/{child}/status"):
                raise ProcessLookupError(3, "No such process")
            return read_text(path, *args, **kwargs)

        monkeypatch.setattr(Path, "read_text", exiting_child)
        assert 0 < process.rss_bytes(tree.pid) < whole
    finally:
        subprocess.run(["pkill", "-P", str(tree.pid)], check=False)
        tree.kill()
        tree.wait(10)
