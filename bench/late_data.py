"""Late data: what change capture costs writers, and what a catch-up costs after one late row.

    .venv/bin/python bench/late_data.py [--database-url URL] [--rows 1000000] [--batch 10000]
                                        [--single-rows 50000] [--rounds 3] [--keep]

Server: ``--database-url`` (any database URL of it), else ``TALLY_DATABASE_URL``, else tally's
embedded PostgreSQL. The benchmark creates its own scratch database there, migrates it, and
drops it at the end (``--keep`` keeps it).

1. Insert throughput of ``--rows`` executions spread over 30 days (in time order, as a log is
   ingested) with change capture on, and off (its triggers disabled with ALTER TABLE ...
   DISABLE TRIGGER): ``INSERT ... SELECT`` and ``COPY`` of ``--batch`` rows a statement, and
   single-row INSERTs (``--single-rows`` of them), the worst case for statement-level triggers.
   Modes alternate over ``--rounds`` rounds; the best round of each mode counts.
2. The cost of a catch-up after one late row lands in those 30 aggregated days: the ledger must
   show exactly one hour, one day, one week and one month re-aggregated, nothing more.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import sys
import time
import urllib.parse
import uuid
from pathlib import Path

import psycopg
from psycopg import conninfo

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from tally import buckets as B  # noqa: E402
from tally import migrate  # noqa: E402
from tally.catchup import catch_up  # noqa: E402

UTC = dt.timezone.utc
START = dt.datetime(2026, 10, 1, tzinfo=UTC)  # 30 days of data: [Oct 1, Oct 31)
DAYS = 30
NOW = dt.datetime(2026, 11, 1, tzinfo=UTC)  # October is complete, so are its days and weeks up to Oct 25
LATE = dt.datetime(2026, 10, 14, 13, 37, 21, tzinfo=UTC)  # a Wednesday in the middle of it all
CAPTURE_TRIGGERS = ("tally_dirty_ins",)  # the trigger an INSERT fires

# Rows i = lo..hi of n, in time order over the 30 days; durations log-uniform 1 ms .. 1 h.
INSERT_SELECT = """
INSERT INTO public.execution_logs (execution_id, workspace_id, user_id, agent_id, status, started_at,
                                   completed_at, duration, credits_used)
SELECT %(prefix)s || i, 'ws-' || (i * 7919 %% 20), 'u-' || (i * 104729 %% 300), 'a-' || (i * 1299709 %% 40),
       (ARRAY['completed', 'Completed', 'success', 'failed', 'timeout', 'running'])[1 + (i * 31 %% 6)],
       s.t, s.t + make_interval(secs => s.d), s.d, round((s.d / 100)::numeric, 4)
FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) AS i,
     LATERAL (SELECT %(start)s::timestamptz + make_interval(secs => i * %(span)s::float8 / %(n)s) AS t,
                     0.001 * exp(random() * ln(3600 / 0.001)) AS d) s
"""
EVENTS = """
INSERT INTO analytics.user_activity (workspace_id, user_id, session_id, event_type, created_at)
SELECT 'ws-' || (i %% 20), 'u-' || (i %% 300), 's-' || (i / 5),
       (ARRAY['page_view', 'click', 'api_call'])[1 + i %% 3],
       %(start)s::timestamptz + make_interval(secs => i * %(span)s::float8 / %(n)s)
FROM generate_series(1, %(n)s) AS i
"""


def log(msg: str) -> None:
    print(msg, flush=True)


def with_db(url: str, name: str) -> str:
    """The same server, another database (a URL stays a URL: Alembic needs one)."""
    if "://" in url:
        parts = urllib.parse.urlsplit(url)
        return urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))
    return conninfo.make_conninfo(url, dbname=name)


class Scratch:
    def __init__(self, server: str, keep: bool):
        self.server, self.keep = server, keep
        self.name = f"tally_bench_late_{uuid.uuid4().hex[:8]}"
        self.url = with_db(server, self.name)

    def __enter__(self) -> "Scratch":
        with psycopg.connect(self.server, autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{self.name}"')
        migrate.upgrade(self.url)
        return self

    def __exit__(self, *exc) -> None:
        if self.keep:
            log(f"kept scratch database {self.name}")
            return
        with psycopg.connect(self.server, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


# ---- 1. insert throughput ---------------------------------------------------------------------

def set_capture(conn, on: bool) -> None:
    for trig in CAPTURE_TRIGGERS:
        conn.execute(f"ALTER TABLE public.execution_logs {'ENABLE' if on else 'DISABLE'} TRIGGER {trig}")


def reset(conn) -> None:
    conn.execute("TRUNCATE public.execution_logs, analytics.user_activity, analytics.dirty_log")
    try:
        conn.execute("CHECKPOINT")  # so no checkpoint of the last round's writes lands in this one
    except psycopg.errors.InsufficientPrivilege:
        pass


def copy_chunks(n: int, batch: int) -> list[bytes]:
    """COPY text of n rows in batches, rendered once (not timed) and reused by both modes."""
    rng = random.Random(5)
    span = DAYS * 86400
    statuses = ["completed", "Completed", "success", "failed", "timeout", "running"]
    chunks, lines = [], []
    for i in range(1, n + 1):
        t = START + dt.timedelta(seconds=i * span / n)
        d = 0.001 * 3.6e6 ** rng.random()
        lines.append(f"c{i}\tws-{i * 7919 % 20}\tu-{i * 104729 % 300}\ta-{i * 1299709 % 40}\t"
                     f"{statuses[i * 31 % 6]}\t{t.isoformat()}\t{d!r}\t{d / 100:.4f}\n")
        if len(lines) == batch:
            chunks.append("".join(lines).encode())
            lines = []
    if lines:
        chunks.append("".join(lines).encode())
    return chunks


def insert_select(conn, n: int, batch: int) -> float:
    t0 = time.perf_counter()
    for lo in range(1, n + 1, batch):
        conn.execute(INSERT_SELECT, dict(prefix="e", lo=lo, hi=min(lo + batch - 1, n), start=START,
                                         span=DAYS * 86400, n=n))  # autocommit: one transaction a batch
    return time.perf_counter() - t0


def copy_in(conn, chunks: list[bytes]) -> float:
    t0 = time.perf_counter()
    for chunk in chunks:
        with conn.cursor().copy("COPY public.execution_logs (execution_id, workspace_id, user_id, agent_id, "
                                "status, started_at, duration, credits_used) FROM STDIN") as copy:
            copy.write(chunk)
    return time.perf_counter() - t0


def single_rows(conn, n: int) -> float:
    rows = [(f"s{i}", f"ws-{i % 20}", f"u-{i % 300}", "a-1", "completed",
             START + dt.timedelta(seconds=i * DAYS * 86400 / n), 1.5, 0.01) for i in range(1, n + 1)]
    sql = ("INSERT INTO public.execution_logs (execution_id, workspace_id, user_id, agent_id, status, started_at, "
           "duration, credits_used) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)")
    t0 = time.perf_counter()
    for k in range(0, n, 1000):  # one transaction per 1000 statements, pipelined
        with conn.transaction(), conn.cursor() as cur:
            cur.executemany(sql, rows[k:k + 1000])
    return time.perf_counter() - t0


def measure_inserts(url: str, args) -> dict:
    results: dict[str, dict[str, list[float]]] = {}
    marks: dict[str, int] = {}
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET TIME ZONE 'UTC'")
        methods = [
            (f"single-row INSERT, 1 row/statement ({args.single_rows:,} rows)", args.single_rows,
             lambda: single_rows(conn, args.single_rows)),
        ]
        if args.copy:
            log(f"rendering {args.rows:,} rows of COPY text (not timed)")
            chunks = copy_chunks(args.rows, args.batch)
            methods.append((f"COPY, {args.batch:,} rows/statement ({args.rows:,} rows)", args.rows,
                            lambda: copy_in(conn, chunks)))
        # last: it leaves its rows (captured) in place for the catch-up part
        methods.append((f"INSERT ... SELECT, {args.batch:,} rows/statement ({args.rows:,} rows)", args.rows,
                        lambda: insert_select(conn, args.rows, args.batch)))
        for label, n, run in methods:
            results[label] = {"on": [], "off": []}
            for r in range(args.rounds):
                for mode in ("off", "on"):
                    reset(conn)
                    set_capture(conn, mode == "on")
                    secs = run()
                    results[label][mode].append(secs)
                    marks[f"{label} {mode}"] = conn.execute("SELECT count(*) FROM analytics.dirty_log").fetchone()[0]
                    log(f"  {label}: capture {mode:3} round {r + 1}: {secs:7.2f} s = {n / secs:10,.0f} rows/s")
            set_capture(conn, True)
        conn.execute(EVENTS, dict(start=START, span=DAYS * 86400, n=args.events))
    log("")
    log("insert throughput (best round of each mode):")
    for label, modes in results.items():
        single = label.startswith("single")
        n = args.single_rows if single else args.rows
        statements = n if single else -(-n // args.batch)
        off, on = min(modes["off"]), min(modes["on"])
        log(f"  {label}")
        log(f"      capture off {n / off:10,.0f} rows/s   capture on {n / on:10,.0f} rows/s   "
            f"on/off time ratio {on / off:.3f} (overhead {100 * (on / off - 1):+.1f} %)")
        log(f"      capture costs {1e6 * (on - off) / statements:,.1f} us a statement, "
            f"{1e6 * (on - off) / n:.2f} us a row; {marks[f'{label} on']:,} dirty-log rows written")
    return results


# ---- 2. catch-up after one late row --------------------------------------------------------

def measure_catch_up(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        n = conn.execute("SELECT count(*) FROM public.execution_logs").fetchone()[0]
        hours = conn.execute("SELECT count(DISTINCT hour) FROM analytics.dirty_log").fetchone()[0]
    log("")
    log(f"catch-up: {n:,} executions over {DAYS} days ({START:%Y-%m-%d} .. {START + dt.timedelta(days=DAYS):%Y-%m-%d}), "
        f"{hours} dirty hours, now = {NOW:%Y-%m-%dT%H:%MZ}")
    t0 = time.perf_counter()
    first = catch_up(url, now=NOW, days=DAYS + 1)
    full = time.perf_counter() - t0
    assert first.ok, [str(r.bucket) for r in first.failed]
    log(f"  aggregating all of it once (catch-up with TALLY_CATCHUP_DAYS={DAYS + 1}): {full:.1f} s for "
        + ", ".join(f"{first.count(r)} {r}" for r in B.ROLLUPS)
        + f" (+{sum(len(b.prepared) for b in first.buckets)} hours prepared by periods)")
    t0 = time.perf_counter()
    idle = catch_up(url, now=NOW)
    idle_s = time.perf_counter() - t0
    assert not idle.buckets, [str(b.bucket) for b in idle.buckets]
    log(f"  a catch-up with nothing to do (the hourly schedule's usual case): {idle_s * 1000:.0f} ms")

    with psycopg.connect(url, autocommit=True) as conn:
        marker = conn.execute("SELECT coalesce(max(id), 0) FROM analytics.aggregation_runs").fetchone()[0]
        conn.execute("INSERT INTO public.execution_logs (execution_id, workspace_id, user_id, agent_id, status, "
                     "started_at, duration, credits_used) VALUES ('late-1', 'ws-7', 'u-late', 'a-1', 'completed', "
                     "%s, 42.0, 1.25)", (LATE,))
        t0 = time.perf_counter()
        late = catch_up(url, now=NOW)
        secs = time.perf_counter() - t0
        assert late.ok
        rows = conn.execute("""
            SELECT rollup, bucket_start, bucket_end, count(*) AS steps, sum(rows_written) AS rows,
                   sum(extract(epoch FROM finished_at - started_at))::float8 AS seconds,
                   bool_and(status = 'succeeded') AS ok
            FROM analytics.aggregation_runs WHERE id > %s
            GROUP BY 1, 2, 3
            ORDER BY array_position(ARRAY['hourly', 'daily', 'weekly', 'monthly'], rollup), 2""", (marker,)).fetchall()
        exact = conn.execute("""
            SELECT (SELECT total_executions FROM analytics.execution_metrics_daily WHERE workspace_id = 'ws-7' AND date = %(d)s),
                   (SELECT count(*) FROM public.execution_logs WHERE workspace_id = 'ws-7'
                      AND started_at >= %(d)s::date AND started_at < %(d)s::date + 1),
                   (SELECT total_executions FROM analytics.execution_metrics_monthly WHERE workspace_id = 'ws-7' AND month = '2026-10-01'),
                   (SELECT count(*) FROM public.execution_logs WHERE workspace_id = 'ws-7'
                      AND started_at >= '2026-10-01' AND started_at < '2026-11-01')""", dict(d=LATE.date())).fetchone()
    log(f"  one late row at {LATE:%Y-%m-%dT%H:%M:%SZ}; catch-up took {secs:.3f} s. The ledger says it re-aggregated:")
    for rollup, start, end, steps, nrows, step_s, ok in rows:
        label = B.Bucket(rollup, start.astimezone(UTC), end.astimezone(UTC)).label
        log(f"      {rollup:8} {label:18} {steps} step(s), {nrows or 0:6,} rows, {step_s:.3f} s, "
            f"{'succeeded' if ok else 'NOT ALL SUCCEEDED'}")
    got = {(r[0], r[1].astimezone(UTC)) for r in rows}
    want = {("hourly", B.floor("hourly", LATE)), ("daily", B.floor("daily", LATE)),
            ("weekly", B.floor("weekly", LATE)), ("monthly", B.floor("monthly", LATE))}
    step_total = sum(r[5] for r in rows)
    if got == want and len(rows) == 4:
        log("  => exactly one hour, one day, one week and one month, nothing more "
            f"({sum(r[3] for r in rows)} step attempts, {step_total:.3f} s in steps, "
            f"{secs - step_total:.3f} s planning and ledger)")
    else:
        log(f"  => UNEXPECTED: re-aggregated {sorted(got)}, expected {sorted(want)}")
    log(f"  values: ws-7 on {LATE.date()}: {exact[0]:,} in the daily table, {exact[1]:,} in the source; "
        f"October: {exact[2]:,} vs {exact[3]:,}")
    log(f"  cost: {secs:.3f} s against {full:.1f} s to aggregate the 30 days from scratch "
        f"({full / secs:,.0f}x less)")
    if got != want or exact[0] != exact[1] or exact[2] != exact[3]:
        raise SystemExit(1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--database-url", help="a PostgreSQL server to create the scratch database on (any database "
                    "URL of it; default: TALLY_DATABASE_URL, else tally's embedded PostgreSQL)")
    ap.add_argument("--rows", type=int, default=1_000_000, help="executions inserted in 30 days (default %(default)s)")
    ap.add_argument("--batch", type=int, default=10_000, help="rows per statement (default %(default)s)")
    ap.add_argument("--single-rows", type=int, default=50_000, help="rows inserted one per statement (default %(default)s)")
    ap.add_argument("--events", type=int, default=100_000, help="activity events in the 30 days (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of each mode (default %(default)s)")
    ap.add_argument("--no-copy", dest="copy", action="store_false", help="skip the COPY measurement")
    ap.add_argument("--keep", action="store_true", help="keep the scratch database")
    args = ap.parse_args(argv)
    if args.rows < 1000 or args.batch < 1 or args.single_rows < 1 or args.rounds < 1:
        ap.error("--rows >= 1000, --batch, --single-rows and --rounds >= 1")

    server = args.database_url or os.environ.get("TALLY_DATABASE_URL")
    where = "given server"
    if not server:
        from tally.db import embedded_url
        server, where = embedded_url(), "embedded PostgreSQL"
    with psycopg.connect(server) as c:
        version = c.execute("SHOW server_version").fetchone()[0]
    log(f"PostgreSQL {version} ({where}), {os.cpu_count()} cores")
    with Scratch(server, args.keep) as scratch:
        log(f"scratch database {scratch.name}")
        measure_inserts(scratch.url, args)
        measure_catch_up(scratch.url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
