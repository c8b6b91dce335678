"""Draw consumer lag over a run from real Prometheus data (Grafana cannot run here).

    .venv/bin/pip install matplotlib==3.11.2   # only this script needs it
    .venv/bin/python scripts/plot_lag.py --prometheus http://127.0.0.1:19090 --since 15m --out docs/lag-over-a-run.png

Queries Prometheus' range API for the dashboard's lag expressions (per topic: the sum over its
partitions of `max by (topic, partition)` of the consumer's and the lag exporter's series) and
shades the stretches where the consumer was not up.
"""

from __future__ import annotations

import argparse
import re
import time
from datetime import UTC, datetime

import requests

LAG = "sum by (topic) (max by (topic, partition) (cdc_consumer_lag_messages))"
LAG_SECONDS = "max by (topic) (cdc_consumer_lag_seconds)"
ROWS = "sum(rate(cdc_rows_inserted_total[15s]))"
UP = 'max(up{job="cdc-consumer"})'


def seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+)([smh])", text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: expected e.g. 90s, 15m, 1h")
    return int(match.group(1)) * {"s": 1, "m": 60, "h": 3600}[match.group(2)]


def query_range(url: str, expr: str, start: float, end: float, step: float) -> dict[str, list[tuple[float, float]]]:
    answer = requests.get(
        f"{url}/api/v1/query_range", params={"query": expr, "start": start, "end": end, "step": step}, timeout=60
    ).json()
    if answer["status"] != "success":
        raise SystemExit(f"{expr}: {answer}")
    series = {}
    for item in answer["data"]["result"]:
        name = item["metric"].get("topic", "").removeprefix("adtech.public.") or "all"
        series[name] = [(float(t), float(v)) for t, v in item["values"]]
    return series


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prometheus", default="http://127.0.0.1:19090")
    parser.add_argument("--since", type=seconds, default=seconds("15m"), help="how far back (default 15m)")
    parser.add_argument("--start", type=float, help="Unix start time (instead of --since)")
    parser.add_argument("--end", type=float, help="Unix end time (default now)")
    parser.add_argument("--step", type=float, default=2.0)
    parser.add_argument("--title", default="cdc-consumer lag over a run (Prometheus data)")
    parser.add_argument("--out", default="docs/lag-over-a-run.png")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    end = args.end or time.time()
    start = args.start or end - args.since
    data = {
        name: query_range(args.prometheus, expr, start, end, args.step)
        for name, expr in {"lag": LAG, "seconds": LAG_SECONDS, "rows": ROWS, "up": UP}.items()
    }

    moments = [start + i * args.step for i in range(int((end - start) / args.step) + 1)]
    times = [datetime.fromtimestamp(t, UTC) for t in moments]

    def on_grid(points):  # NaN where Prometheus has no sample: a gap, not a line across it
        by_ms = {round(t * 1000): v for t, v in points}
        return [by_ms.get(round(t * 1000), float("nan")) for t in moments]

    figure, (ax_lag, ax_seconds, ax_rows) = plt.subplots(3, 1, figsize=(11, 8), sharex=True)
    for name, points in sorted(data["lag"].items()):
        ax_lag.plot(times, on_grid(points), label=name, linewidth=1.4)
    for name, points in sorted(data["seconds"].items()):
        ax_seconds.plot(times, on_grid(points), label=name, linewidth=1.4)
    for points in data["rows"].values():
        ax_rows.plot(times, on_grid(points), color="tab:green", linewidth=1.2)
    # Shade where the consumer was down (its `up` is 0 or missing).
    up = on_grid(next(iter(data["up"].values()), []))
    down = [t for t, v in zip(moments, up, strict=True) if not v >= 1]
    for ax in (ax_lag, ax_seconds, ax_rows):
        for t in down:
            ax.axvspan(datetime.fromtimestamp(t, UTC), datetime.fromtimestamp(t + args.step, UTC), color="0.9", lw=0)
        ax.grid(alpha=0.3)
    ax_lag.set_ylabel("lag (messages)")
    ax_lag.legend(loc="upper left", fontsize=8, title="topic (sum of partitions)", title_fontsize=8)
    ax_seconds.set_ylabel("lag (seconds)")
    ax_seconds.legend(loc="upper left", fontsize=8, title="topic (worst partition)", title_fontsize=8)
    ax_rows.set_ylabel("rows inserted / s")
    ax_rows.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S", tz=UTC))
    ax_rows.set_xlabel("time (UTC); grey: consumer down")
    figure.suptitle(args.title)
    figure.tight_layout()
    figure.savefig(args.out, dpi=110)
    print(
        f"wrote {args.out} ({datetime.fromtimestamp(start, UTC):%H:%M:%S}–{datetime.fromtimestamp(end, UTC):%H:%M:%S} UTC)"
    )


if __name__ == "__main__":
    main()
