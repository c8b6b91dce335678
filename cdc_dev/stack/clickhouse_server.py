"""Serve a real ClickHouse (HTTP + native TCP) out of the PyPI package ``chdb-core``.

Why this exists: the native stack needs a ClickHouse server that clickhouse-connect can talk to,
without Docker and without downloading a ClickHouse binary. ``chdb-core`` ships the whole
ClickHouse engine (clickhouse-local 26.9.2.1) inside a Python wheel, and that clickhouse-local
contains the HTTP and native TCP handlers of clickhouse-server; they are merely not started by
default. This module starts them and then keeps the process alive.
Users with a real ClickHouse ignore this file and point CDC_CLICKHOUSE_URL at their server.

Usage (the stack manager runs it in the background and records its PID)::

    python -m cdc_dev.stack.clickhouse_server --data-dir DIR --http-port 18123 --tcp-port 19000 \
        [--cluster cdc --shard 127.0.0.1:19000 --shard 127.0.0.1:19010 ...]

With ``--client-user NAME --client-password-file FILE`` (the secured stack) network clients must
log in as that user with that password; see :func:`write_users`. Without, the server keeps
ClickHouse's passwordless ``default`` user and binds loopback.

With ``--cluster``, config.xml declares that cluster in ``<remote_servers>``, one shard per
``--shard`` (this server's own address among them), so ``Distributed`` tables, ``cluster()`` and
``remote()`` reach every node. Each node is a separate process with its own data dir: chdb-core
has no Keeper, so ReplicatedMergeTree and ``ON CLUSTER`` are not available, only plain sharding.

Readiness: poll ``GET http://127.0.0.1:HTTP_PORT/ping`` until it answers ``Ok.``;
:func:`wait_healthy` does exactly that.

Stopping: SIGTERM/SIGINT end the process at once (see :func:`_serve`). That is safe because
ClickHouse commits every insert as an immutable part that is fully written before it is renamed
into place, so the death of the process (even SIGKILL) never loses an acknowledged insert; only an
OS crash could, as with any ClickHouse that does not fsync parts.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import re
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from xml.sax.saxutils import escape

# clickhouse-local reads ``config.xml`` from the current working directory, and chdb's
# ``_chdb.query()`` has no way to name another file (its ``path`` is taken literally: a
# ``?config-file=...`` suffix just becomes part of the directory name). So the launcher writes
# this file into the data dir and chdirs there. Every path ClickHouse may write to is pinned
# inside the data dir, so the whole server state lives (and is deleted) in one place.
_CONFIG_TEMPLATE = """\
<clickhouse>
    <!-- Loopback by default: this server has a passwordless "default" user. -->
    <listen_host>{listen_host}</listen_host>
    <http_port>{http_port}</http_port>
    <tcp_port>{tcp_port}</tcp_port>

    <path>{data_dir}/</path>
    <tmp_path>{data_dir}/tmp/</tmp_path>
    <user_files_path>{data_dir}/user_files/</user_files_path>

    <!-- Under chdb (checked with chdb-core 26.9.0) clickhouse-local's logger stays silent while
         it serves, so these files stay (nearly) empty; startup errors (port in use, data dir
         locked) go to stderr. The section only keeps whatever is logged inside the data dir. -->
    <logger>
        <level>information</level>
        <log>{data_dir}/logs/clickhouse-server.log</log>
        <errorlog>{data_dir}/logs/clickhouse-server.err.log</errorlog>
        <size>100M</size>
        <count>3</count>
    </logger>
{users}{cluster}</clickhouse>
"""

# chdb's in-process session, which runs _SERVE_SQL, always logs in as `default` with an empty
# password: a password on `default` stops the server from starting, and its <networks> cannot
# tell that session from a TCP client on loopback (ClickHouse counts both as local). So `default`
# may only start listeners, and everyone else logs in as the client user. Over HTTP the TLS proxy
# sends a non-local X-Forwarded-For, which auth_use_forwarded_address makes ClickHouse check
# against <networks>: `default` is refused there outright.
_USERS_CONFIG = """\
    <users_config>users.xml</users_config>
    <auth_use_forwarded_address>true</auth_use_forwarded_address>
"""

_USERS_TEMPLATE = """\
<clickhouse>
    <profiles><default/></profiles>
    <quotas><default/></quotas>
    <users>
        <default>
            <no_password/>
            <networks><ip>::1</ip></networks>
            <profile>default</profile>
            <quota>default</quota>
            <grants><query>GRANT SYSTEM LISTEN ON *.*</query></grants>
        </default>
        <{user}>
            <password_sha256_hex>{password_sha256}</password_sha256_hex>
            <networks><ip>::/0</ip></networks>
            <profile>default</profile>
            <quota>default</quota>
        </{user}>
    </users>
</clickhouse>
"""

_CLUSTER_TEMPLATE = """\
    <remote_servers>
        <{name}>
{shards}        </{name}>
    </remote_servers>
    <!-- Asynchronous inserts into Distributed tables are sent by this pool, which
         clickhouse-local leaves empty unless the config sizes it. -->
    <background_distributed_schedule_pool_size>4</background_distributed_schedule_pool_size>
"""

_SHARD_TEMPLATE = """\
            <shard><replica><host>{host}</host><port>{port}</port>{login}</replica></shard>
"""

# Run inside clickhouse-local in ONE call: the two SYSTEM statements start the network handlers
# from config.xml; the last statement is a query that never finishes (one row per second out of
# 10^12 rows, i.e. ~30,000 years), which keeps clickhouse-local, and with it the listeners,
# alive. max_block_size=1 makes sleepEachRow sleep per 1-row block, and
# function_sleep_max_microseconds_per_block=0 lifts the 3 s cap on sleeping per block.
# FORMAT Null: nothing is ever sent to our stdout.
# Side effect: this query is visible in system.processes; `KILL QUERY` on it stops the server.
_SERVE_SQL = """
SYSTEM START LISTEN HTTP;
SYSTEM START LISTEN TCP;
SELECT sleepEachRow(1) FROM numbers(1000000000000)
SETTINGS max_block_size = 1, function_sleep_max_microseconds_per_block = 0
FORMAT Null
"""


def write_config(
    data_dir: Path,
    http_port: int,
    tcp_port: int,
    listen_host: str = "127.0.0.1",
    cluster: str | None = None,
    shards: list[tuple[str, int]] | None = None,
    client: tuple[str, str] | None = None,
) -> Path:
    """Create the data dir layout and write ``config.xml`` into it; return the config path.

    ``cluster`` names a cluster of ``shards`` (host, native TCP port), this server itself by
    default. ``client`` (user, password): the only user network clients can log in as, also the
    one the nodes of the cluster use with each other."""
    for sub in ("", "tmp", "user_files", "logs"):
        (data_dir / sub).mkdir(parents=True, exist_ok=True)
    login = ""
    if client is not None:
        write_users(data_dir, *client)
        login = f"<user>{escape(client[0])}</user><password>{escape(client[1])}</password>"
    cluster_xml = ""
    if cluster is not None:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", cluster):
            raise ValueError(f"cluster name {cluster!r} is not an XML element name")
        members = shards or [(listen_host, tcp_port)]
        cluster_xml = _CLUSTER_TEMPLATE.format(
            name=cluster,
            shards="".join(
                _SHARD_TEMPLATE.format(host=escape(host), port=int(port), login=login) for host, port in members
            ),
        )
    config = data_dir / "config.xml"
    config.touch(mode=0o600)  # it may hold the client's password (the cluster's login)
    config.chmod(0o600)
    config.write_text(
        _CONFIG_TEMPLATE.format(
            listen_host=escape(listen_host),
            http_port=int(http_port),
            tcp_port=int(tcp_port),
            data_dir=escape(str(data_dir)),
            users=_USERS_CONFIG if client is not None else "",
            cluster=cluster_xml,
        )
    )
    return config


def write_users(data_dir: Path, user: str, password: str) -> Path:
    """users.xml: `default` for the serving session alone, `user` with `password` for clients."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", user) or user == "default":
        raise ValueError(f"client user {user!r} must be a plain name other than default")
    users = data_dir / "users.xml"
    users.touch(mode=0o600)
    users.chmod(0o600)
    users.write_text(_USERS_TEMPLATE.format(user=user, password_sha256=hashlib.sha256(password.encode()).hexdigest()))
    return users


def _shard_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def _refuse_if_running(data_dir: Path) -> None:
    """Exit early if a ClickHouse already serves ``data_dir``.

    ClickHouse holds an flock() on ``DIR/status`` while it runs and would refuse to start anyway,
    but only after we had overwritten the live server's config.xml with our ports.
    """
    status = data_dir / "status"
    if not status.exists():
        return
    with status.open("rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when f is closed
        except BlockingIOError:
            sys.exit(f"clickhouse_server: {data_dir} is in use by another ClickHouse:\n{status.read_text()}")


def _serve(data_dir: Path) -> None:
    """Run ClickHouse; returns only if it could not start or stopped serving."""
    # Import chdb BEFORE chdir: `import chdb` starts and stops a throw-away in-memory engine to
    # read its version, and in the data dir that probe would already read our config.xml (and
    # open its log files).
    from chdb import _chdb

    os.chdir(data_dir)

    # The query below blocks this (main) thread inside C++ forever, so a Python signal handler
    # would never get to run. Use the default actions instead: SIGTERM and SIGINT terminate the
    # process immediately. That is safe (see module docstring), and there is no way to shut
    # clickhouse-local down "gracefully" from here anyway, because its only query never returns.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)

    # The low-level _chdb.query runs clickhouse-local over `path` (the same directory as <path>
    # in config.xml). Not chdb.connect(): its sessions cannot start listeners
    # ("start_servers_callback is not set").
    _chdb.query(_SERVE_SQL, "TabSeparated", path=str(data_dir))
    # Only reached if a listener failed to start (port in use, data dir locked) or someone ran
    # KILL QUERY on the keep-alive query. clickhouse-local has then already printed the error to
    # stderr (the returned result does not carry it), and the server is gone.


def wait_healthy(http_port: int, timeout: float = 60.0, host: str = "127.0.0.1", pid: int | None = None) -> float:
    """Poll ``GET /ping`` until it answers ``Ok.``; return the seconds waited.

    If ``pid`` (the launcher's) is given, fail fast with ``RuntimeError`` once it has exited.
    Raises ``TimeoutError`` after ``timeout`` seconds.
    """
    start = time.monotonic()
    url = f"http://{host}:{http_port}/ping"
    # No proxies: an http_proxy in the environment must not intercept a loopback health check.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while True:
        try:
            with opener.open(url, timeout=2) as resp:
                if resp.read().strip() == b"Ok.":
                    return time.monotonic() - start
        except (urllib.error.URLError, OSError):
            pass
        if pid is not None and not _alive(pid):
            raise RuntimeError(f"ClickHouse process {pid} exited before {url} answered")
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{url} did not answer 'Ok.' within {timeout:.0f}s")
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    # /proc rather than os.kill(pid, 0): an exited child that its parent has not reaped yet is a
    # zombie, which kill() still "finds".
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--http-port", required=True, type=int)
    parser.add_argument("--tcp-port", required=True, type=int)
    parser.add_argument("--listen-host", default="127.0.0.1")
    parser.add_argument("--cluster", help="declare this cluster in <remote_servers>, one shard per --shard")
    parser.add_argument(
        "--shard",
        action="append",
        type=_shard_address,
        default=[],
        metavar="HOST:PORT",
        help="a shard's native TCP address, in shard order (repeat; default: this server only)",
    )
    parser.add_argument("--client-user", help="the user network clients log in as (with --client-password-file)")
    parser.add_argument("--client-password-file", type=Path, help="a file holding that user's password")
    args = parser.parse_args(argv)
    if args.shard and not args.cluster:
        parser.error("--shard needs --cluster")
    if (args.client_user is None) != (args.client_password_file is None):
        parser.error("--client-user and --client-password-file go together")
    client = (args.client_user, args.client_password_file.read_text().strip()) if args.client_user else None

    # Absolute path: config.xml must not depend on the cwd, which _serve changes.
    data_dir = args.data_dir.expanduser().resolve()
    _refuse_if_running(data_dir)
    config = write_config(data_dir, args.http_port, args.tcp_port, args.listen_host, args.cluster, args.shard, client)
    print(
        f"clickhouse_server pid={os.getpid()} config={config} "
        f"http={args.listen_host}:{args.http_port} tcp={args.listen_host}:{args.tcp_port}",
        flush=True,
    )
    _serve(data_dir)
    print("clickhouse_server: ClickHouse stopped serving (see the error above)", file=sys.stderr, flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())
