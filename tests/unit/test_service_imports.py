"""The service apart from the development tooling, and what the installable package carries.

`cdc-consumer run` must start without cdc_dev (stack, generator, demo, verify), bench, psycopg or
rich: the wheel does not ship the first two, and the others are not the service's business. Each
check runs in a fresh interpreter, so modules imported by other tests cannot hide an import.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import consumer
from consumer.sink.migrate import DEFAULT_DIRECTORY, discover
from consumer.transform.mapping import DEFAULT_MAPPING, load_mapping

REPO = Path(__file__).resolve().parents[2]

WHAT_RUN_IMPORTS = """
import sys

import consumer.app.runner
import consumer.cli

args = consumer.cli.build_parser().parse_args(["run"])
assert args.func.__name__ == "_run", args.func
print("\\n".join(sorted(sys.modules)))
"""

# Runs the CLI as if cdc_dev were not installed (as from the wheel).
WITHOUT_DEV_TOOLING = """
import sys

class NoDevTooling:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "cdc_dev":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoDevTooling())
from consumer.cli import main

sys.exit(main(sys.argv[1:]))
"""


def _python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60, env=env, cwd=REPO
    )


def test_run_imports_no_dev_tooling_bench_psycopg_or_rich() -> None:
    result = _python(WHAT_RUN_IMPORTS)
    assert result.returncode == 0, result.stderr
    modules = result.stdout.split()
    assert "consumer.app.runner" in modules  # the list is real
    forbidden = [m for m in modules if m.split(".")[0] in ("cdc_dev", "bench", "psycopg", "rich", "tests")]
    assert forbidden == []


def test_a_dev_command_without_cdc_dev_fails_with_a_clear_message() -> None:
    for command in (["stack", "status"], ["generate", "--duration", "1"], ["verify"], ["demo"]):
        result = _python(WITHOUT_DEV_TOOLING, *command)
        assert result.returncode == 2, (command, result.stderr)
        message = " ".join(result.stdout.split())
        assert f"`cdc-consumer {command[0]}` is development tooling (cdc_dev" in message
        assert "pip install -e '.[dev]'" in message
        assert "Traceback" not in result.stderr


def test_service_commands_still_parse_without_cdc_dev() -> None:
    result = _python(WITHOUT_DEV_TOOLING, "replay", "--help")
    assert result.returncode == 0, result.stderr
    assert "--from-beginning" in result.stdout


def test_version_is_the_package_version_and_defined_once() -> None:
    result = _python(WITHOUT_DEV_TOOLING, "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"cdc-consumer {consumer.__version__}"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in project["project"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "consumer.__version__"}


def test_migrations_and_default_mapping_are_package_resources() -> None:
    # The installed package's view of the migrations is the repository's clickhouse/ folder.
    shipped = sorted(m.name for m in discover())
    assert shipped == sorted(p.name for p in (REPO / "clickhouse").glob("*.sql"))
    assert [m.sql for m in discover()] == [(REPO / "clickhouse" / name).read_text() for name in shipped]
    assert (DEFAULT_DIRECTORY / shipped[0]).is_file()
    assert DEFAULT_MAPPING.read_text() == (REPO / "consumer" / "transform" / "default_mapping.toml").read_text()
    assert load_mapping().topics
