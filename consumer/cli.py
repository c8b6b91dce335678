"""`cdc-consumer` command line: one subcommand per job, each importing only what it needs."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console()


def _stack(args: argparse.Namespace) -> int:
    from consumer.stack import manager
    from consumer.stack.layout import StackLayout

    layout = StackLayout.from_env()
    if args.action == "up":
        timings = manager.up(layout, connector=None if args.no_connector else args.connector)
        console.print(
            f"stack up in {timings['total']:.1f}s (install {timings['install']:.1f}s); state in {layout.root}"
        )
        _print_status(manager.status(layout))
    elif args.action == "down":
        stopped = manager.down(layout)
        console.print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
    elif args.action == "status":
        states = manager.status(layout)
        if args.json:
            print(
                json.dumps(
                    {
                        "components": [asdict(s) for s in states],
                        "connection": layout.connection_env(),
                        "state_dir": str(layout.root),
                    },
                    indent=2,
                )
            )
        else:
            _print_status(states)
        return 0 if all(s.healthy for s in states) else 1
    elif args.action == "env":
        for key, value in layout.connection_env().items():
            print(f"export {key}={value}")
    return 0


def _print_status(states) -> None:
    table = Table("component", "address", "pid", "healthy", "rss")
    for s in states:
        table.add_row(
            s.name,
            s.address,
            str(s.pid or "-"),
            "yes" if s.healthy else "NO",
            f"{s.rss_bytes / 2**20:.0f} MiB" if s.rss_bytes else "-",
        )
    console.print(table)


def _generate(args: argparse.Namespace) -> int:
    from consumer.generate import generate, render_progress
    from consumer.settings import require

    dsn = args.dsn or require("postgres_dsn")
    stats = generate(
        dsn,
        rate=args.rate,
        duration=args.duration,
        seed=args.seed,
        progress=lambda s: console.print(render_progress(s), end="\r"),
    )
    console.print()
    console.print(render_progress(stats))
    return 0


def _topics(args: argparse.Namespace) -> int:
    from confluent_kafka import Consumer, TopicPartition

    from consumer.settings import require

    bootstrap = require("kafka_bootstrap")
    probe = Consumer({"bootstrap.servers": bootstrap, "group.id": "cdc-consumer-topics-probe"})
    try:
        metadata = probe.list_topics(timeout=10)
        table = Table("topic", "partitions", "messages")
        for name in sorted(t for t in metadata.topics if t.startswith(args.prefix)):
            total = 0
            for partition in metadata.topics[name].partitions:
                low, high = probe.get_watermark_offsets(TopicPartition(name, partition), timeout=10)
                total += high - low
            table.add_row(name, str(len(metadata.topics[name].partitions)), str(total))
        console.print(table)
    finally:
        probe.close()
    return 0


def _run(args: argparse.Namespace) -> int:
    from consumer.runner import run
    from consumer.settings import load_settings

    run(load_settings())
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from consumer.migrate import apply_migrations
    from consumer.settings import load_settings
    from consumer.sink import connect

    settings = load_settings()
    applied = apply_migrations(connect(settings.clickhouse_url, settings.clickhouse_embedded_path))
    console.print(f"applied: {', '.join(applied) or 'nothing (up to date)'}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from consumer.settings import load_settings, require
    from consumer.sink import connect
    from consumer.verify import compare

    settings = load_settings()
    report = compare(require("postgres_dsn"), connect(settings.clickhouse_url, settings.clickhouse_embedded_path))
    console.print(str(report))
    return 0 if report.ok else 1


def _demo(args: argparse.Namespace) -> int:
    from consumer.demo import run_demo
    from consumer.settings import load_settings, require

    for name in ("postgres_dsn", "kafka_bootstrap", "clickhouse_url"):
        require(name)
    ok = run_demo(load_settings(), args.rate, args.duration, args.seed, Path(args.log))
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cdc-consumer", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    stack = sub.add_parser("stack", help="the native stack: Postgres, Kafka, Connect, registry, ClickHouse")
    stack.add_argument("action", choices=["up", "down", "status", "env"])
    stack.add_argument("--json", action="store_true", help="status as JSON, with connection settings")
    stack.add_argument(
        "--connector",
        choices=["avro", "json"],
        default="avro",
        help="which connector configuration `up` registers (default avro)",
    )
    stack.add_argument("--no-connector", action="store_true", help="`up` without registering a connector")
    stack.set_defaults(func=_stack)

    gen = sub.add_parser("generate", help="write realistic ad traffic into Postgres")
    gen.add_argument("--rate", type=float, default=1000.0, help="change events per second")
    gen.add_argument("--duration", type=float, default=30.0, help="seconds")
    gen.add_argument("--seed", type=int, default=None, help="makes the traffic deterministic")
    gen.add_argument("--dsn", default=None, help="Postgres DSN (default: CDC_POSTGRES_DSN)")
    gen.set_defaults(func=_generate)

    run = sub.add_parser("run", help="consume the change topics into ClickHouse (the service)")
    run.set_defaults(func=_run)

    demo = sub.add_parser("demo", help="traffic, the consumer and a live view of KPIs and lag, then verify")
    demo.add_argument("--rate", type=float, default=2000.0, help="change events per second")
    demo.add_argument("--duration", type=float, default=60.0, help="seconds of traffic")
    demo.add_argument("--seed", type=int, default=1)
    demo.add_argument("--log", default=".stack/logs/consumer-demo.log", help="the consumer's log file")
    demo.set_defaults(func=_demo)

    migrate = sub.add_parser("migrate", help="apply the ClickHouse schema migrations")
    migrate.set_defaults(func=_migrate)

    verify = sub.add_parser("verify", help="compare every KPI and dimension in ClickHouse with Postgres")
    verify.set_defaults(func=_verify)

    topics = sub.add_parser("topics", help="the change topics and how many messages each holds")
    topics.add_argument("--prefix", default="adtech", help="topic name prefix (default adtech)")
    topics.set_defaults(func=_topics)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from consumer.settings import ConfigError
        from consumer.stack.manager import StackError

        if isinstance(exc, ConfigError | StackError):
            console.print(f"[red]error:[/red] {exc}")
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
