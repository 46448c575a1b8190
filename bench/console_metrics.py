"""How long a Prometheus scrape of ``/metrics`` takes on a large history (target: <= 200 ms).

    .venv/bin/python bench/console_metrics.py [--database-url URL] [--days 30] [--attempts 4]
                                              [--marks 20000] [--scrapes 50] [--keep]

Server: ``--database-url`` (any database URL of it), else ``TALLY_DATABASE_URL``, else tally's
embedded PostgreSQL. The benchmark creates its own scratch database there, migrates it, and
drops it at the end (``--keep`` keeps it).

The history is what ``--days`` days at 1 M executions a day leave in tally's own tables, written
directly with SQL (a scrape reads only the state, the ledger and the change log, never the
source rows): every hour x 3 hourly steps, every day, week and month of the span, each bucket
and step with ``--attempts`` ledger rows (the scheduled run, late-data re-runs by catch-up, a
failure and its retry now and then) and its stored state, rows written at the scale of 1 M
executions a day (200 workspaces, ~10 k users), some buckets failing now, ``--marks`` change
marks not yet read (by default over every hour of the span: catch-up has not run for a month,
every bucket is dirty, the worst case for a scrape; ``--marks-hours`` puts them in the newest
hours instead), and one sealed week of history. It ends at the
current hour, so the catch-up window is a live one.

Then it times ``--scrapes`` scrapes two ways: the collection alone in this process
(``tally.web.metrics.scrape``), and whole HTTP requests to a real ``tally serve`` (uvicorn,
Starlette, prometheus_client's encoder). It prints the medians, the 95th percentile and the
worst, and the number of samples a scrape returns.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import psycopg
from psycopg import conninfo

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from tally import buckets as B  # noqa: E402
from tally import migrate  # noqa: E402
from tally.web import metrics  # noqa: E402

TARGET_MS = 200.0

# One ledger row per (bucket, step, attempt n of `attempts`): attempt 1 by the schedule, the
# others by catch-up (late data) or a retry after a failure; the last attempt of a bucket that
# is failing now failed. Rows written at 1 M executions a day: ~200 workspaces an hour, ~6 k
# (workspace, user) pairs, ~8 k (workspace, user, agent) keys; 200 a day, week or month.
LEDGER = """
INSERT INTO analytics.aggregation_runs (run_id, rollup, step, bucket_start, bucket_end, status, rows_written, error,
                                        attempt, trigger, started_at, finished_at, worker, sqlstate, transient)
SELECT gen_random_uuid(), b.rollup, b.step, b.bucket_start, b.bucket_end,
       CASE WHEN b.failing AND n = %(attempts)s THEN 'failed'
            WHEN n = 2 AND b.bucket_no %% 17 = 0 THEN 'failed' ELSE 'succeeded' END,
       CASE WHEN (b.failing AND n = %(attempts)s) OR (n = 2 AND b.bucket_no %% 17 = 0) THEN NULL
            ELSE b.rows + (b.bucket_no * 37 + n) %% 97 END,
       CASE WHEN (b.failing AND n = %(attempts)s) OR (n = 2 AND b.bucket_no %% 17 = 0)
            THEN 'OperationalError: terminating connection due to administrator command' END,
       n, CASE WHEN n = 1 THEN 'schedule' WHEN n = 3 AND b.bucket_no %% 17 = 0 THEN 'retry' ELSE 'catch-up' END,
       b.bucket_end + make_interval(mins => 5 + 60 * (n - 1)),
       b.bucket_end + make_interval(mins => 5 + 60 * (n - 1), secs => b.seconds),
       'bench:1', NULL, NULL
FROM (SELECT r.*, row_number() OVER (ORDER BY r.bucket_start, r.step) AS bucket_no
      FROM unnest(%(rollups)s::text[], %(steps)s::text[], %(starts)s::timestamptz[], %(ends)s::timestamptz[],
                  %(rows)s::bigint[], %(seconds)s::float8[], %(failing)s::boolean[])
           AS r(rollup, step, bucket_start, bucket_end, rows, seconds, failing)) b,
     generate_series(1, %(attempts)s) AS n
ORDER BY b.bucket_end, n, b.step
"""
# The stored state of every bucket and step: its latest attempt (and its latest success).
STATE = """
INSERT INTO analytics.bucket_state (rollup, step, bucket_start, bucket_end, state, attempt_id, attempt, failures,
                                    ok_started_at, ok_finished_at, rows_written, error, sqlstate, transient, changed_at)
SELECT l.rollup, l.step, l.bucket_start, l.bucket_end, CASE l.status WHEN 'succeeded' THEN 'ok' ELSE 'failed' END,
       l.id, l.attempt, CASE l.status WHEN 'succeeded' THEN 0 ELSE 1 END, s.started_at, s.finished_at, s.rows_written,
       CASE WHEN l.status = 'failed' THEN l.error END, CASE WHEN l.status = 'failed' THEN '57P01' END,
       CASE WHEN l.status = 'failed' THEN true END, l.finished_at
FROM (SELECT DISTINCT ON (rollup, step, bucket_start) * FROM analytics.aggregation_runs
      ORDER BY rollup, step, bucket_start, id DESC) l
LEFT JOIN LATERAL (SELECT r.started_at, r.finished_at, r.rows_written FROM analytics.aggregation_runs r
                   WHERE r.rollup = l.rollup AND r.step = l.step AND r.bucket_start = l.bucket_start
                     AND r.status = 'succeeded' ORDER BY r.id DESC LIMIT 1) s ON true
"""
# Change marks of late rows, spread over the span (one in ten claimed by a run in progress).
MARKS = """
INSERT INTO analytics.dirty_log (hour, source, marked_at, claimed_at)
SELECT date_trunc('hour', %(start)s::timestamptz + (%(span)s::float8 * i / %(n)s) * interval '1 second'),
       CASE WHEN i %% 3 = 0 THEN 'user_activity' ELSE 'execution_logs' END,
       %(now)s::timestamptz - (i %% 3600) * interval '1 second',
       CASE WHEN i %% 10 = 0 THEN %(now)s::timestamptz END
FROM generate_series(1, %(n)s) AS i
"""
ROWS = {"execution_metrics": 200, "user_activity": 6000, "credit_consumption": 8000, "daily_metrics": 200,
        "weekly_metrics": 200, "monthly_metrics": 200}
SECONDS = {"execution_metrics": 4.0, "user_activity": 3.0, "credit_consumption": 5.0, "daily_metrics": 12.0,
           "weekly_metrics": 40.0, "monthly_metrics": 150.0}


def log(msg: str) -> None:
    print(msg, flush=True)


def with_db(url: str, name: str) -> str:
    if "://" in url:
        parts = urllib.parse.urlsplit(url)
        return urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))
    return conninfo.make_conninfo(url, dbname=name)


def history(conn: psycopg.Connection, days: int, attempts: int, marks: int, now, marks_hours: int | None = None
            ) -> dict:
    """Write the history; returns how many rows of each table."""
    from tally.steps import ROLLUP_STEPS

    end = B.HOUR.floor(now)
    start = end - dt.timedelta(days=days)
    cols: dict[str, list] = {k: [] for k in ("rollups", "steps", "starts", "ends", "rows", "seconds", "failing")}
    for rollup in B.ROLLUPS:
        for i, b in enumerate(B.within(rollup, start, end)):
            for step in ROLLUP_STEPS[rollup]:
                cols["rollups"].append(rollup)
                cols["steps"].append(step)
                cols["starts"].append(b.start)
                cols["ends"].append(b.end)
                cols["rows"].append(ROWS[step])
                cols["seconds"].append(SECONDS[step])
                cols["failing"].append(rollup == "hourly" and i % 97 == 13)  # a few failing now
    conn.execute("SET TIME ZONE 'UTC'")
    conn.execute(LEDGER, dict(cols, attempts=attempts))
    conn.execute(STATE)
    first_week = next(B.within("weekly", start, end), None)
    if first_week is not None:  # final history, as the data lifecycle seals it
        conn.execute("UPDATE analytics.bucket_state SET state = 'sealed', sealed_at = %s, ignored_changes = 7 "
                     "WHERE bucket_start >= %s AND bucket_end <= %s AND state = 'ok'",
                     (now, first_week.start, first_week.end))
    marked_from = start if marks_hours is None else max(start, end - dt.timedelta(hours=marks_hours))
    conn.execute(MARKS, dict(start=marked_from, span=(end - marked_from).total_seconds(), n=marks, now=now))
    conn.execute("ANALYZE analytics.aggregation_runs")
    conn.execute("ANALYZE analytics.bucket_state")
    conn.execute("ANALYZE analytics.dirty_log")
    return {t: conn.execute(f"SELECT count(*) FROM analytics.{t}").fetchone()[0]
            for t in ("aggregation_runs", "bucket_state", "dirty_log")}


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def serve(url: str) -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tally = str(Path(sys.executable).with_name("tally"))
    proc = subprocess.Popen([tally, "serve", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "TALLY_DATABASE_URL": url, "TALLY_WEB_AUTH": ""})
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(base + "/healthz", timeout=1).read()
            return proc, base
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"tally serve exited with {proc.returncode}")
            time.sleep(0.1)
    proc.terminate()
    raise SystemExit("tally serve did not answer")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--database-url", default=os.environ.get("TALLY_DATABASE_URL"))
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--attempts", type=int, default=4)
    ap.add_argument("--marks", type=int, default=20000)
    ap.add_argument("--marks-hours", type=int, default=None,
                    help="spread the marks over the newest N hours (default: every hour of the span, the worst case)")
    ap.add_argument("--scrapes", type=int, default=50)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    if args.database_url:
        server = args.database_url
    else:
        from tally.db import embedded_url

        server = embedded_url()
    name = f"tally_bench_console_{uuid.uuid4().hex[:8]}"
    url = with_db(server, name)
    with psycopg.connect(server, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    try:
        migrate.upgrade(url)
        now = dt.datetime.now(B.UTC)
        t0 = time.perf_counter()
        with psycopg.connect(url, autocommit=True) as conn:
            counts = history(conn, args.days, args.attempts, args.marks, now, args.marks_hours)
        log(f"history: {args.days} days at 1 M executions a day: {counts['aggregation_runs']:,} ledger rows, "
            f"{counts['bucket_state']:,} bucket states, {counts['dirty_log']:,} change marks over "
            f"{'every hour' if args.marks_hours is None else f'the newest {args.marks_hours} hours'} "
            f"(written in {time.perf_counter() - t0:.1f}s)")

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("SET TIME ZONE 'UTC'")
            text = metrics.scrape(conn)  # warm: plans, caches
            samples = sum(1 for line in text.decode().splitlines() if line and not line.startswith("#"))
            inproc = []
            for _ in range(args.scrapes):
                t = time.perf_counter()
                metrics.scrape(conn)
                inproc.append((time.perf_counter() - t) * 1000)
        proc, base = serve(url)
        try:
            urllib.request.urlopen(base + "/metrics", timeout=30).read()  # warm
            http = []
            for _ in range(args.scrapes):
                t = time.perf_counter()
                body = urllib.request.urlopen(base + "/metrics", timeout=30).read()
                http.append((time.perf_counter() - t) * 1000)
        finally:
            proc.terminate()
            proc.wait(20)
        log(f"a scrape: {samples} samples, {len(body):,} bytes")
        for what, values in (("collection in process", inproc), ("GET /metrics over HTTP", http)):
            log(f"{what:24s} median {statistics.median(values):7.1f} ms   p95 {percentile(values, 0.95):7.1f} ms   "
                f"worst {max(values):7.1f} ms   ({len(values)} scrapes)")
        worst_median = statistics.median(http)
        log(f"target: a scrape answers in <= {TARGET_MS:.0f} ms: "
            + ("met" if worst_median <= TARGET_MS else "NOT met") + f" (median {worst_median:.1f} ms)")
        return 0
    finally:
        if args.keep:
            log(f"kept scratch database {name}")
        else:
            with psycopg.connect(server, autocommit=True) as c:
                c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    sys.exit(main())
