"""The installable artifact on its own: the wheel, in a fresh venv, from an empty directory.

`python -m build` makes the sdist and the wheel; the wheel goes into a new venv (its dependencies
from the package index, nothing from this checkout or the dev venv), and from a directory with
no repository file in reach its `cdc-consumer` applies the migrations and consumes generated
traffic, is killed with SIGKILL under traffic and started again, until every KPI in ClickHouse
equals Postgres, then stops cleanly on SIGTERM.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import pytest

import consumer
from cdc_dev.generate import generate
from cdc_dev.verify import compare
from tests.consumer_helpers import ConsumerProcess, new_target, wait_caught_up, wait_delivered

pytestmark = [pytest.mark.stack, pytest.mark.slow, pytest.mark.secure]

REPO = Path(__file__).resolve().parent.parent
MIGRATIONS = sorted(p.name for p in (REPO / "clickhouse").glob("*.sql"))
TRAFFIC = {"rate": 3000, "duration": 6, "seed": 708}


def _clean_env(**settings: str) -> dict[str, str]:
    """The process environment without anything that would point Python at this checkout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "CDC_"))}
    return {**env, **settings}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin/ directory of a fresh venv holding the wheel built from this checkout."""
    root = tmp_path_factory.mktemp("packaging")
    dist = root / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(dist), str(REPO)],
        check=True,
        capture_output=True,
        timeout=600,
        env=_clean_env(),
    )
    wheel = next(dist.glob("cdc_consumer-*.whl"))
    sdist = next(dist.glob("cdc_consumer-*.tar.gz"))
    assert wheel.name.startswith(f"cdc_consumer-{consumer.__version__}-")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert {f"consumer/migrations/{name}" for name in MIGRATIONS} <= names
    assert "consumer/transform/default_mapping.toml" in names
    assert not [n for n in names if n.startswith(("cdc_dev/", "bench/", "tests/"))]
    with tarfile.open(sdist) as archive:
        sdist_names = archive.getnames()
    assert [n for n in sdist_names if n.endswith("consumer/migrations/001_dimensions.sql")]

    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120, env=_clean_env())
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", str(wheel)],
        check=True,
        capture_output=True,
        timeout=900,
        env=_clean_env(),
        cwd=root,
    )
    return venv / "bin"


def _stack_env() -> dict[str, str]:
    """The connection settings as `cdc-consumer stack env` prints them (the dev CLI of this checkout)."""
    out = subprocess.run(
        [sys.executable, "-m", "consumer.cli", "stack", "env"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    ).stdout
    settings = {}
    for line in out.splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        (settings[name],) = shlex.split(value)  # quoted for the shell
    return settings


def test_the_wheel_alone_consumes_exactly_through_kill_9_and_stops_on_sigterm(
    stack, installed: Path, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    target = new_target(stack, tmp_path)
    stack_env = _stack_env()
    assert stack_env["CDC_KAFKA_BOOTSTRAP"] == stack.kafka_bootstrap
    # The stack's connection settings, then this test's own group, topics and database.
    settings = {**stack_env, **{k: v for k, v in target.env.items() if k.startswith("CDC_") and k not in stack_env}}
    settings["CDC_CLICKHOUSE_URL"] = target.env["CDC_CLICKHOUSE_URL"]
    env = _clean_env(**settings)
    cli = str(installed / "cdc-consumer")

    def installed_cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([cli, *args], capture_output=True, text=True, timeout=120, env=env, cwd=empty)

    where = subprocess.run(
        [str(installed / "python"), "-c", "import consumer; print(consumer.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=empty,
        check=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(installed.parent), where
    assert installed_cli("--version").stdout.strip() == f"cdc-consumer {consumer.__version__}"
    dev_only = installed_cli("stack", "status")
    assert dev_only.returncode == 2 and "development tooling" in dev_only.stdout, dev_only

    try:
        migrated = installed_cli("migrate")  # creates the database too
        assert migrated.returncode == 0, migrated.stdout + migrated.stderr
        assert " ".join(migrated.stdout.split()) == f"applied: {', '.join(MIGRATIONS)}"

        # Traffic before the start (catch-up; on a fresh stack it also creates the topics the
        # consumer subscribes to) and while it runs.
        generate(stack.postgres_dsn, rate=3000, duration=4, seed=707)
        wait_delivered(stack, target.env["CDC_TOPIC_PREFIX"])
        log = tmp_path / "installed-consumer.log"

        def start() -> ConsumerProcess:
            with log.open("ab") as out:
                proc = subprocess.Popen([cli, "run"], env=env, cwd=empty, stdout=out, stderr=subprocess.STDOUT)
            return ConsumerProcess(proc, log)

        process = start()
        try:
            # kill -9 while traffic flows: whatever it inserted and had not committed is applied once
            # by the next process (its watermark in ClickHouse), and nothing is lost.
            traffic = threading.Thread(target=generate, args=(stack.postgres_dsn,), kwargs=TRAFFIC)
            traffic.start()
            time.sleep(3)
            process.proc.kill()
            assert process.proc.wait(timeout=30) == -signal.SIGKILL
            traffic.join()
            process = start()
            wait_caught_up(stack, target, process)
            report = compare(stack.postgres_dsn, target.clickhouse())
            assert report.ok, str(report)
            process.proc.terminate()  # SIGTERM
            assert process.proc.wait(timeout=90) == 0, process.output()[-3000:]
        finally:
            process.stop()
        assert "stopping: finishing the batches in flight" in process.output()
        assert list(empty.iterdir()) == []  # it wrote nothing into its working directory
    finally:
        stack.clickhouse().command(f"DROP DATABASE IF EXISTS {target.database}")
