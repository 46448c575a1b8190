"""The hourly rollup on partitioned vs plain source tables, in one run.

    .venv/bin/python bench/partitioned.py [--database-url URL] [--days 30] [--per-day 1m]
                                          [--events-per-execution 1] [--hours 8] [--runs 3]

One database is migrated and seeded with ``--days`` days (``tally.seed.seed``, 200 workspaces,
``--per-day`` executions a day and ``--events-per-execution`` activity events each), settled
(``VACUUM ANALYZE``, ``CHECKPOINT``), then cloned (``CREATE DATABASE … TEMPLATE``) and the
clone converted with ``tally.partition.convert`` (the code of ``tally db partition``: one
partition per UTC day, the plain tables dropped after the swap), whose time per phase is
printed, and settled the same way. Both databases then hold the same rows.

The same ``--hours`` hours (spread over the first, middle and last day) are rolled up on both,
``--runs`` times, interleaved (plain, partitioned, plain, …: a drift of the machine touches
both alike), each as a first run (the hour's output rows deleted before it, untimed), timed
as tally runs it (``Runner.run``: the three hourly steps with their ledger writes). Printed:
the median time per database and step, and the ratio partitioned / plain of the medians and
the median of the paired per-hour ratios. The databases are dropped at the end (``--keep``
keeps them).
"""
from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
import uuid
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import run as R  # noqa: E402  (bench/run.py: scratch databases, seeding, settling)
from tally import buckets as B  # noqa: E402
from tally import partition as P  # noqa: E402
from tally.rollups import Runner  # noqa: E402

UTC = dt.timezone.utc
HOUR = dt.timedelta(hours=1)
HOURLY = ("execution_metrics_hourly", "user_activity_hourly", "credit_consumption_hourly")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def clone(admin_url: str, url: str, label: str) -> str:
    name = f"tally_bench_{label}_{uuid.uuid4().hex[:8]}"
    template = url.rsplit("/", 1)[1]
    with psycopg.connect(admin_url, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    return R.with_db(admin_url, name)


def size(url: str) -> str:
    with psycopg.connect(url) as c:
        return c.execute("SELECT pg_size_pretty(pg_database_size(current_database()))").fetchone()[0]


def clear_hour(conn, hour: dt.datetime) -> None:
    for table in HOURLY:
        conn.execute(f"DELETE FROM analytics.{table} WHERE hour = %s", [hour])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/postgres",
                    help="any database on the server (needs CREATE DATABASE)")
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--per-day", type=R.parse_scale, default=R.parse_scale("1m"))
    ap.add_argument("--events-per-execution", type=float, default=1.0)
    ap.add_argument("--hours", type=int, default=8, help="hours measured (spread over the first, middle and last day)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    first_day = R.DAY - dt.timedelta(days=args.days - 1)  # the last day is bench/run.py's Thursday
    with psycopg.connect(args.database_url) as c:
        log(f"PostgreSQL {c.execute('SHOW server_version').fetchone()[0]}, "
            f"shared_buffers {c.execute('SHOW shared_buffers').fetchone()[0]}")
    plain = R.create_db(args.database_url, f"plain_{R.scale_label(args.per_day)}")
    made = [plain]
    try:
        t0 = time.monotonic()
        from tally.seed import seed as write
        with psycopg.connect(plain) as conn:
            r = write(conn, start=first_day, hours=24 * args.days, workspaces=R.WORKSPACES,
                      executions_per_hour=args.per_day // 24,
                      events_per_hour=int(args.events_per_execution * args.per_day) // 24, seed=11)
        log(f"seeded {r.executions:,} executions and {r.events:,} events in {time.monotonic() - t0:.0f}s")
        R.settle(plain)
        log(f"plain database: {size(plain)}")
        part = clone(args.database_url, plain, f"part_{R.scale_label(args.per_day)}")
        made.append(part)
        t0 = time.monotonic()
        with psycopg.connect(part, autocommit=True) as conn:
            converted = P.convert(conn, ahead=1, today=R.DAY.date(), drop_old=True)
        conversion = time.monotonic() - t0
        rows = sum(t.rows for t in converted.tables)
        log(f"tally db partition: {rows:,} rows in {conversion:.0f}s ("
            + ", ".join(f"{k} {v:.0f}s" for k, v in converted.seconds.items()) + ")")
        R.settle(part)
        log(f"partitioned database: {size(part)}")

        middle = first_day + dt.timedelta(days=args.days // 2)
        picks = [first_day + dt.timedelta(hours=10), middle + dt.timedelta(hours=10), R.DAY + dt.timedelta(hours=10)]
        hours = sorted({picks[i % 3] + (i // 3) * HOUR for i in range(args.hours)})
        dbs = {"plain": plain, "partitioned": part}
        runners = {k: Runner(u, trigger="backfill", lock_wait=0) for k, u in dbs.items()}
        conns = {k: psycopg.connect(u, autocommit=True) for k, u in dbs.items()}
        times: dict[str, dict[dt.datetime, list[float]]] = {k: {h: [] for h in hours} for k in dbs}
        steps: dict[str, dict[str, list[float]]] = {k: {} for k in dbs}
        try:
            for h in hours:  # untimed: each hour's rows in cache on both, as for an hour just written
                for k in dbs:
                    runners[k].run(B.bucket("hourly", h))
            for i in range(args.runs):
                for h in hours:
                    for k in dbs:
                        clear_hour(conns[k], h)
                        t0 = time.perf_counter()
                        result = runners[k].run(B.bucket("hourly", h))
                        times[k][h].append(time.perf_counter() - t0)
                        if not result.ok:
                            raise RuntimeError(f"{k} {h}: {[(s.step, s.error) for s in result.steps]}")
                        for s in result.steps:
                            steps[k].setdefault(s.step, []).append(s.seconds)
                log(f"run {i + 1}/{args.runs} done")
            outputs = {k: [conns[k].execute("SELECT count(*), sum(hashtextextended(t::text, 0)) FROM ("
                                              "SELECT workspace_id, hour, total_executions, total_credits, p95_runtime "
                                              "FROM analytics.execution_metrics_hourly) t").fetchone()] for k in dbs}
        finally:
            for x in (*runners.values(), *conns.values()):
                x.close()

        med = {k: statistics.median([t for ts in times[k].values() for t in ts]) for k in dbs}
        paired = statistics.median([statistics.median(times["partitioned"][h]) / statistics.median(times["plain"][h])
                                    for h in hours])
        print(f"\nhourly rollup, {args.days} days of {args.per_day:,} executions a day "
              f"(+{args.events_per_execution:g} event each), {len(hours)} hours x {args.runs} runs, first runs")
        print(f"{'':24}{'plain':>12}{'partitioned':>14}{'ratio':>8}")
        for step in steps["plain"]:
            a, b = statistics.median(steps["plain"][step]), statistics.median(steps["partitioned"][step])
            print(f"  {step:22}{a * 1000:>10.1f}ms{b * 1000:>12.1f}ms{b / a:>8.2f}")
        print(f"  {'hourly rollup':22}{med['plain'] * 1000:>10.1f}ms{med['partitioned'] * 1000:>12.1f}ms"
              f"{med['partitioned'] / med['plain']:>8.2f}")
        print(f"  median of the paired per-hour ratios: {paired:.2f}")
        print(f"  same outputs on both: {outputs['plain'] == outputs['partitioned']}")
        print(f"tally db partition on {rows:,} rows: {conversion:.0f}s ({rows / conversion:,.0f} rows/s; "
              + ", ".join(f"{k} {v:.0f}s" for k, v in converted.seconds.items()) + ")")
        return 0 if outputs["plain"] == outputs["partitioned"] else 1
    finally:
        if not args.keep:
            for url in reversed(made):
                R.drop_db(args.database_url, url)


if __name__ == "__main__":
    sys.exit(main())
