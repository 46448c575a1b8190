"""Retention of one day of raw rows: batched DELETEs on plain tables vs a dropped partition.

    .venv/bin/python bench/retention.py [--database-url URL] [--per-day 4m]
                                        [--events-per-execution 0.25] [--keep]

One database is migrated and seeded with one day (``tally.seed.seed``: 200 workspaces,
``--per-day`` executions and ``--events-per-execution`` activity events each), the day is rolled
up (hourly and daily: retention deletes only sealed hours), settled (``VACUUM ANALYZE``,
``CHECKPOINT``), then cloned (``CREATE DATABASE … TEMPLATE``) and the clone converted with
``tally.partition.convert`` (one partition per UTC day). On each database in turn,
``tally.retention.run`` purges the day (``TALLY_RAW_RETENTION_DAYS=30``, as of 40 days after
it) while a writer, as the platform would, inserts one execution per transaction into the
current day without pause. Printed per database: retention's wall time, the WAL it wrote
(``pg_current_wal_lsn`` before and after; the writer's own few kB included), the source
tables' size before and after (a DELETE leaves the space to VACUUM; a dropped partition gives
it back), the writer's inserts and their worst and 99th-percentile latency, and then the time
a ``VACUUM`` of the plain tables takes to make the deleted rows' space reusable.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import run as R  # noqa: E402  (bench/run.py: scratch databases, seeding, settling)

UTC = dt.timezone.utc
DAY = R.DAY  # a Thursday in April 2026
NOW = DAY + dt.timedelta(days=40)  # retention runs "as of" then: the day is 40 days old
# a partitioned table: its partitions' (pg_partition_tree lists nothing for a plain table)
SIZE = ("SELECT coalesce((SELECT sum(pg_total_relation_size(relid)) FROM pg_partition_tree(%(t)s) "
        "WHERE relid::regclass::text NOT LIKE '%%unpartitioned%%'), pg_total_relation_size(%(t)s))")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def source_bytes(conn) -> int:
    return sum(conn.execute(SIZE, {"t": t}).fetchone()[0] for t in ("public.execution_logs", "analytics.user_activity"))


class Writer(threading.Thread):
    """The platform: one execution per transaction into the current day, as fast as it goes."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.stop, self.latencies = url, threading.Event(), []

    def run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as c:
            i = 0
            while not self.stop.is_set():
                i += 1
                t0 = time.perf_counter()
                c.execute("INSERT INTO public.execution_logs (execution_id, workspace_id, status, started_at, duration, "
                          "credits_used) VALUES (%s, 'w', 'completed', now(), 1.0, 1)", [f"bench-{uuid.uuid4()}"])
                self.latencies.append(time.perf_counter() - t0)


def purge(url: str, label: str) -> dict:
    from tally import retention

    with psycopg.connect(url, autocommit=True) as c:
        c.execute("CHECKPOINT")
        before, lsn = source_bytes(c), c.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
        w = Writer(url)
        w.start()
        time.sleep(1.0)  # the writer's pace before retention, for reference
        calm = len(w.latencies)
        t0 = time.monotonic()
        p = retention.run(c, now=NOW)
        wall = time.monotonic() - t0
        w.stop.set()
        w.join()
        wal = c.execute("SELECT pg_current_wal_lsn() - %s::pg_lsn", [lsn]).fetchone()[0]
        after = source_bytes(c)
        rows = sum(sp.rows for sp in p.sources.values())
        parts = sum(len(sp.partitions) for sp in p.sources.values())
        vacuum = None
        if parts == 0:
            t1 = time.monotonic()
            c.execute("VACUUM public.execution_logs, analytics.user_activity")
            vacuum = time.monotonic() - t1
    during = sorted(w.latencies[calm:])
    r = dict(label=label, rows=rows, partitions=parts, wall=wall, wal=int(wal), before=before, after=after,
             inserts=len(during), worst=during[-1] if during else None,
             p99=during[int(0.99 * (len(during) - 1))] if during else None,
             median=statistics.median(during) if during else None, vacuum=vacuum)
    log(f"{label}: {rows:,} rows in {wall:.1f}s ({parts} partition(s) dropped)")
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--database-url", help="a PostgreSQL server (any database URL of it; default: tally's embedded one)")
    ap.add_argument("--per-day", type=R.parse_scale, default=R.parse_scale("4m"))
    ap.add_argument("--events-per-execution", type=float, default=0.25)
    ap.add_argument("--keep", action="store_true", help="keep the scratch databases")
    args = ap.parse_args(argv)
    if not args.database_url:
        from tally.db import embedded_url
        args.database_url = embedded_url()
    os.environ.update(TALLY_SEAL_AFTER_DAYS="30", TALLY_RAW_RETENTION_DAYS="30", TALLY_CATCHUP_DAYS="7")
    from tally import partition as P
    from tally.backfill import Backfill
    from tally.seed import seed as write

    label = R.scale_label(args.per_day)
    plain = R.create_db(args.database_url, f"ret_plain_{label}")
    made = [plain]
    try:
        t0 = time.monotonic()
        with psycopg.connect(plain) as conn:
            r = write(conn, start=DAY, hours=24, workspaces=R.WORKSPACES, executions_per_hour=args.per_day // 24,
                      events_per_hour=int(args.events_per_execution * args.per_day) // 24, seed=11)
        log(f"seeded {r.executions:,} executions and {r.events:,} events in {time.monotonic() - t0:.0f}s")
        t0 = time.monotonic()
        Backfill(plain, DAY, DAY + dt.timedelta(days=1), ["hourly", "daily"]).run()
        log(f"rolled up in {time.monotonic() - t0:.0f}s")
        R.settle(plain)
        name = f"tally_bench_ret_part_{label}_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(args.database_url, autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}" TEMPLATE "{plain.rsplit("/", 1)[1]}"')
        part = R.with_db(args.database_url, name)
        made.append(part)
        t0 = time.monotonic()
        with psycopg.connect(part, autocommit=True) as conn:
            P.convert(conn, ahead=1, today=dt.date.today(), drop_old=True)  # today's partition for the writer
        log(f"partitioned the clone in {time.monotonic() - t0:.0f}s")
        R.settle(part)
        results = [purge(plain, "plain tables: DELETE in batches"), purge(part, "daily partitions: DROP")]
    finally:
        if not args.keep:
            for url in made:
                R.drop_db(args.database_url, url)

    mb = 1024 * 1024
    print(f"retention of one day: {args.per_day:,} executions + {int(args.events_per_execution * args.per_day):,} "
          f"events, while a writer inserts one execution per transaction")
    print(f"{'':34}{'wall':>8}{'WAL':>10}{'size before':>13}{'after':>9}{'inserts':>9}{'worst':>9}{'p99':>8}")
    for x in results:
        print(f"{x['label']:34}{x['wall']:7.1f}s{x['wal'] / mb:8.0f}MB{x['before'] / mb:11.0f}MB{x['after'] / mb:7.0f}MB"
              f"{x['inserts']:9,}{1000 * x['worst']:7.0f}ms{1000 * x['p99']:6.1f}ms")
    for x in results:
        if x["vacuum"] is not None:
            print(f"then VACUUM of the plain tables (their deleted rows' space reusable, not returned): {x['vacuum']:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
