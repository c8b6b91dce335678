"""`cdc-consumer` command line: one subcommand per job, each importing only what it needs.

`run` (the service) imports neither the development tooling (cdc_dev: stack, generate, demo,
verify) nor rich; those commands import it when they run, and only work from a checkout of the
repository with the dev extras, which the wheel does not carry.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import shlex
import sys
from dataclasses import asdict
from functools import cache
from pathlib import Path
from types import ModuleType

from consumer import __version__

# What the development tooling needs beyond the service's dependencies.
_DEV_TOOLING_MODULES = ("cdc_dev", "psycopg")


class DevToolingMissing(RuntimeError):
    pass


@cache
def console():
    from rich.console import Console

    return Console()


def _print_error(exc: Exception) -> None:
    from rich.markup import escape

    console().print(f"[red]error:[/red] {escape(str(exc))}")


def _table(*columns: str, **options):
    from rich.table import Table

    return Table(*columns, **options)


def _dev_tooling(module: str, command: str) -> ModuleType:
    """Import a development-tooling module, or say plainly why `command` cannot run here."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in _DEV_TOOLING_MODULES:
            raise
        raise DevToolingMissing(
            f"`cdc-consumer {command}` is development tooling ({exc.name} is not installed): run it from a "
            "checkout of the repository after `make bootstrap` (or `pip install -e '.[dev]'`); "
            "the installed service provides run, migrate, topics, replay and lag"
        ) from None


def _stack(args: argparse.Namespace) -> int:
    manager = _dev_tooling("cdc_dev.stack.manager", "stack")
    layouts = _dev_tooling("cdc_dev.stack.layout", "stack")
    try:
        return _stack_action(args, manager, layouts.StackLayout.from_env())
    except manager.StackError as exc:
        _print_error(exc)
        return 2


def _stack_action(args: argparse.Namespace, manager: ModuleType, layout) -> int:
    if args.action == "up":
        timings = manager.up(layout, connector=None if args.no_connector else args.connector)
        console().print(
            f"stack up in {timings['total']:.1f}s (install {timings['install']:.1f}s); state in {layout.root}"
        )
        _print_status(manager.status(layout))
    elif args.action == "down":
        stopped = manager.down(layout)
        console().print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
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
            print(f"export {key}={shlex.quote(value)}")
    return 0


def _print_status(states) -> None:
    table = _table("component", "address", "pid", "healthy", "rss")
    for s in states:
        table.add_row(
            s.name,
            s.address,
            str(s.pid or "-"),
            "yes" if s.healthy else "NO",
            f"{s.rss_bytes / 2**20:.0f} MiB" if s.rss_bytes else "-",
        )
    console().print(table)


def _generate(args: argparse.Namespace) -> int:
    from consumer.settings import require

    traffic = _dev_tooling("cdc_dev.generate", "generate")
    render_progress = traffic.render_progress
    dsn = args.dsn or require("postgres_dsn")
    stats = traffic.generate(
        dsn,
        rate=args.rate,
        duration=args.duration,
        seed=args.seed,
        progress=lambda s: console().print(render_progress(s), end="\r"),
    )
    console().print()
    console().print(render_progress(stats))
    return 0


def _topics(args: argparse.Namespace) -> int:
    from confluent_kafka import Consumer, TopicPartition

    from consumer.kafka.client_config import kafka_client_config
    from consumer.settings import load_settings

    probe = Consumer(kafka_client_config(load_settings()).client({"group.id": "cdc-consumer-topics-probe"}))
    try:
        metadata = probe.list_topics(timeout=10)
        table = _table("topic", "partitions", "messages")
        for name in sorted(t for t in metadata.topics if t.startswith(args.prefix)):
            total = 0
            for partition in metadata.topics[name].partitions:
                low, high = probe.get_watermark_offsets(TopicPartition(name, partition), timeout=10)
                total += high - low
            table.add_row(name, str(len(metadata.topics[name].partitions)), str(total))
        console().print(table)
    finally:
        probe.close()
    return 0


def _run(args: argparse.Namespace) -> int:
    from consumer.app.runner import run
    from consumer.settings import load_settings

    run(load_settings())
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from consumer.app.clients import clickhouse_nodes
    from consumer.settings import load_settings
    from consumer.sink.migrate import apply_to_shards

    applied = apply_to_shards(*clickhouse_nodes(load_settings()))
    console().print(f"applied: {', '.join(applied) or 'nothing (up to date)'}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from consumer.app.clients import clickhouse_client
    from consumer.settings import load_settings, require

    verify = _dev_tooling("cdc_dev.verify", "verify")
    report = verify.compare(require("postgres_dsn"), clickhouse_client(load_settings()))
    console().print(str(report))
    return 0 if report.ok else 1


def _demo(args: argparse.Namespace) -> int:
    from consumer.settings import load_settings, require

    demo = _dev_tooling("cdc_dev.demo", "demo")
    for name in ("postgres_dsn", "kafka_bootstrap", "clickhouse_url"):
        require(name)
    ok = demo.run_demo(load_settings(), args.rate, args.duration, args.seed, Path(args.log))
    return 0 if ok else 1


def _replay(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from consumer.app.replay import ReplayRefused, plan_replay, run_replay
    from consumer.settings import load_settings

    settings = load_settings()
    try:
        plan = plan_replay(
            settings,
            topics=args.topic,
            from_offset=args.from_offset,
            from_timestamp=args.from_timestamp,
            from_beginning=args.from_beginning,
            until_timestamp=args.until_timestamp,
            move_group=args.move_group,
        )
    except ReplayRefused as exc:
        console().print(f"[red]{exc}[/red]")
        return 3
    if not args.json:
        table = _table("topic", "partition", "from", "to (excl.)", "offsets", "note", title=f"replay as {plan.group}")
        for (topic, partition), bound in sorted(plan.ranges.items()):
            note = plan.notes.get((topic, partition), "")
            table.add_row(topic, str(partition), str(bound.start), str(bound.stop), str(len(bound)), note)
        console().print(table)
    if args.dry_run:
        if args.json:
            print(json.dumps(plan.as_dict(), indent=2))
        return 0
    try:
        if args.json or args.no_progress or not plan.total:
            report = run_replay(settings, plan)
        else:
            columns = (
                TextColumn("[bold]replay"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("offsets"),
                TextColumn("{task.fields[rate]}"),
                TextColumn("ETA"),
                TimeRemainingColumn(),
            )
            with Progress(*columns, console=console()) as bar:
                task = bar.add_task("replay", total=plan.total, rate="")

                def advance(done: int, total: int) -> None:
                    speed = bar.tasks[0].speed
                    bar.update(task, completed=done, rate=f"{speed:,.0f}/s" if speed else "")

                report = run_replay(settings, plan, progress=advance)
    except ReplayRefused as exc:
        console().print(f"[red]{exc}[/red]")
        return 3
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        rows = ", ".join(f"{t} {n:,}" for t, n in report.rows_inserted.items() if n) or "none"
        console().print(
            f"{'done' if report.completed else 'STOPPED EARLY'} in {report.seconds:.1f}s: read {report.messages_read:,}"
            f" messages, {report.already_applied:,} already in ClickHouse (skipped), "
            f"{report.dead_lettered:,} dead-lettered; rows inserted: {rows}"
        )
        if report.unfinished:
            console().print(f"not finished: {', '.join(f'{t}[{p}]' for t, p in report.unfinished)}")
    return 0 if report.completed else 1


def _lag(args: argparse.Namespace) -> int:
    from consumer.app.clients import schema_registry
    from consumer.decode.envelope import EnvelopeDecoder
    from consumer.kafka.client_config import kafka_client_config
    from consumer.kafka.lag import LagReader
    from consumer.ops.lag_exporter import serve_exporter
    from consumer.settings import load_settings
    from consumer.transform.mapping import load_mapping

    settings = load_settings()
    kafka = kafka_client_config(settings)
    group = args.group or settings.group_id
    topics = load_mapping(settings.mapping_file, settings.topic_prefix).topics
    decoder = EnvelopeDecoder(schema_registry(settings))
    if args.serve is not None:
        serve_exporter(kafka, group, topics, args.serve, decoder, args.interval, settings.metrics_bind_address)
        return 0
    reader = LagReader(kafka, group, decoder=decoder)
    try:
        lags = reader.read(reader.partitions(topics))
        members = len(reader.members())
    finally:
        reader.close()
    if args.json:
        print(
            json.dumps(
                {
                    "group": group,
                    "members": members,
                    "total_lag": sum(x.lag for x in lags),
                    "max_lag_seconds": max((x.lag_seconds for x in lags), default=0.0),
                    "partitions": [x.as_dict() for x in lags],
                },
                indent=2,
            )
        )
        return 0
    table = _table("topic", "partition", "committed", "high watermark", "lag", "lag age", title=f"group {group}")
    for x in lags:
        committed = "-" if x.committed is None else str(x.committed)
        table.add_row(x.topic, str(x.partition), committed, str(x.high_watermark), str(x.lag), f"{x.lag_seconds:.1f}s")
    console().print(table)
    console().print(f"{members} active member(s); total lag {sum(x.lag for x in lags):,} messages")
    return 0


def _audit(args: argparse.Namespace) -> int:
    from consumer.ops.audit import auditor_for, serve_audit
    from consumer.settings import load_settings

    settings = load_settings()
    auditor = auditor_for(settings, args.group)
    if args.serve is not None:
        serve_audit(auditor, args.serve, args.interval, settings.metrics_bind_address)
        return 0
    report = auditor.run(full=args.full)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return 0 if report.ok else 1
    table = _table("topic", "partition", "committed", "applied", "accounted", "unaccounted", "duplicated")
    for p in report.partitions:
        table.add_row(
            p.topic,
            str(p.partition),
            "-" if p.committed is None else str(p.committed),
            f"{p.applied:,}",
            f"{p.accounted:,}",
            str(p.unaccounted),
            str(p.duplicated),
        )
    console().print(table)
    for p in report.partitions:
        for issue in p.issues:
            console().print(f"{issue.kind}: {p.topic}[{p.partition}]@{issue.offset}: {issue.detail}")
    verdict = "every offset applied once or accounted for" if report.ok else "[red]NOT every offset accounted for[/red]"
    console().print(
        f"{verdict} ({report.messages_read:,} messages read, {report.buckets_checked:,} buckets checked, "
        f"{report.buckets_reproved:,} proved again, {report.seconds:.1f}s)"
    )
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cdc-consumer", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
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

    replay = sub.add_parser(
        "replay",
        help="re-read a range of the change topics into ClickHouse and stop (idempotent backfill)",
        description="Re-read from an offset, a time or the beginning up to the high watermarks seen at start "
        "(or --until-timestamp), then stop. Default: a separate backfill group beside the live consumer; "
        "--move-group: move the live group's offsets (refused while it has active members).",
    )
    replay.add_argument("--topic", action="append", help="a mapped topic (repeatable; default: all)")
    start = replay.add_mutually_exclusive_group(required=True)
    start.add_argument("--from-offset", help="OFFSET for every partition, or PARTITION:OFFSET[,PARTITION:OFFSET...]")
    start.add_argument(
        "--from-timestamp", help="ISO 8601 time (UTC unless given), Unix s/ms, or '15m ago' / '2h ago' / '1d ago'"
    )
    start.add_argument("--from-beginning", action="store_true", help="from the first offset Kafka still holds")
    replay.add_argument("--until-timestamp", help="stop before records at or after this time (default: at the end)")
    replay.add_argument("--move-group", action="store_true", help="move the live group's offsets (consumers stopped)")
    replay.add_argument("--dry-run", action="store_true", help="show the plan only")
    replay.add_argument("--no-progress", action="store_true", help="no progress bar")
    replay.add_argument("--json", action="store_true", help="the report as JSON")
    replay.set_defaults(func=_replay)

    lag = sub.add_parser("lag", help="per-partition committed offset, high watermark, lag and lag age (from Kafka)")
    lag.add_argument("--group", default=None, help="consumer group (default: CDC_GROUP_ID)")
    lag.add_argument("--json", action="store_true", help="as JSON")
    lag.add_argument("--serve", type=int, metavar="PORT", default=None, help="run as a Prometheus lag exporter on PORT")
    lag.add_argument("--interval", type=float, default=5.0, help="exporter refresh interval in seconds (default 5)")
    lag.set_defaults(func=_lag)

    audit = sub.add_parser(
        "audit",
        help="prove every offset below the committed position applied once or accounted for (Kafka + ClickHouse)",
        description="Exit 0 when every offset of every change-topic partition below the group's committed "
        "position is applied exactly once (its rows, with its op's signs, in ClickHouse) or accounted for "
        "(transaction marker, tombstone, no-change op, superseded dimension version, dead-lettered); 1 with the gaps and duplicates otherwise.",
    )
    audit.add_argument("--group", default=None, help="consumer group (default: CDC_GROUP_ID)")
    audit.add_argument("--json", action="store_true", help="the report as JSON")
    audit.add_argument("--full", action="store_true", help="from the start of every partition, not the checkpoint")
    audit.add_argument("--serve", type=int, metavar="PORT", default=None, help="audit repeatedly, gauges on PORT")
    audit.add_argument("--interval", type=float, default=300.0, help="seconds between audits with --serve (300)")
    audit.set_defaults(func=_audit)
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

        if isinstance(exc, ConfigError | DevToolingMissing):
            _print_error(exc)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
