"""tally's benchmark: every job against what PostgreSQL needs merely to read its rows.

    .venv/bin/python bench/run.py [--database-url URL] [--scales 100k,1m,4m] [--runs 3]
                                  [--history-scale 100k] [--history-days 30] [--json FILE]

For each scale (executions per day) it creates a scratch database on the given
server (default: tally's embedded PostgreSQL), migrates it, seeds one day with
``tally.seed.seed`` (200 workspaces, 3 activity events per execution), then
measures, in a separate process whose peak memory it reports:

* a 1-day backfill, ``--runs`` times: for each of the 24 hours, the floors of the
  three hourly steps, then the hourly rollup; then the day's floor and the daily
  rollup. Hourly figures are medians over all these first runs of an hour;
* the daily, weekly and monthly rollups, each after every hour of its period has been rolled
  up, empty hours included, as the hourly schedule would have (untimed);

and, in one more database at ``--history-scale``, the hourly rollup of the same
hours when the tables hold 1 day and then ``--history-days`` days, plus the weekly
and monthly rollups of that day over that history (4 and 30 days of data).

A floor is a bare ``SELECT workspace_id, count(*), sum(x) … GROUP BY workspace_id``
over the rows the job must read, through the same time range (see FLOORS), timed
in the same run right next to the job (after one untimed warm-up execution, like
the job's own data, which an hourly job finds in cache). Ratios are medians of the
paired per-run ratios. Under each hourly step, its bound: PostgreSQL's own statement for
the step's output rows, inserted into an empty table of the output's shape and key (see
BOUNDS; bench/bounds.py puts steps and bounds side by side on two shapes). Scratch
databases are dropped at the end (``--keep`` keeps them).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
import urllib.parse
import uuid
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from tally import buckets as B  # noqa: E402
from tally import migrate  # noqa: E402
from tally.executor import apply_step_settings  # noqa: E402
from tally.rollups import Runner  # noqa: E402
from tally.steps import LN_GAMMA, STEPS  # noqa: E402

UTC = dt.timezone.utc
HOUR = dt.timedelta(hours=1)
DAY = dt.datetime(2026, 4, 30, tzinfo=UTC)  # a Thursday; the 30 days before it fill April
WORKSPACES = 200
EVENTS_PER_EXECUTION = 3
HOURLY_STEPS = ("execution_metrics", "user_activity", "credit_consumption")

# What PostgreSQL needs merely to read a job's source rows: x is the step's own measure
# (user_activity has none, so the length of the event type it must read).
FLOORS = {
    "execution_metrics": "SELECT workspace_id, count(*), sum(duration) FROM public.execution_logs "
                         "WHERE started_at >= %(start)s AND started_at < %(end)s GROUP BY workspace_id",
    "credit_consumption": "SELECT workspace_id, count(*), sum(credits_used) FROM public.execution_logs "
                          "WHERE started_at >= %(start)s AND started_at < %(end)s GROUP BY workspace_id",
    "user_activity": "SELECT workspace_id, count(*), sum(length(event_type)) FROM analytics.user_activity "
                     "WHERE created_at >= %(start)s AND created_at < %(end)s GROUP BY workspace_id",
}
PERIOD_FLOOR = FLOORS["execution_metrics"]  # a period's floor: the scan of its raw executions

# Each hourly step's bound: PostgreSQL's own statement for the step's output rows, written the
# plain way (its built-ins: percentile_cont, GROUP BY, jsonb_object_agg; the sketch bins as one
# more GROUP BY), over the same rows, inserted with a plain INSERT into an empty table of the
# output's shape, key and indexes (bench_bound.<table>: LIKE analytics.<table> INCLUDING ALL),
# committed. Run with the step's planner settings (STEP_SETTINGS). What no step can beat: it
# reads, computes and writes the same rows with nothing else (no lock, no ledger, no state, no
# change marks, no upsert, no two-statement read for a parallel plan).
_VALID = "duration >= 0 AND duration < 'Infinity'::float8"
_OK = "lower(status COLLATE \"C\") IN ('completed', 'success', 'succeeded')"
_FAILED = "lower(status COLLATE \"C\") IN ('failed', 'failure', 'error', 'timeout', 'timed_out')"
BOUNDS = {
    "execution_metrics": (
        "WITH r AS (SELECT analytics.tally_key(workspace_id) AS ws, date_trunc('hour', started_at, 'UTC') AS h, "
        "status, duration, credits_used FROM public.execution_logs "
        "WHERE started_at >= %(start)s AND started_at < %(end)s), "
        "m AS (SELECT ws, h, count(*) AS n, count(*) FILTER (WHERE " + _OK + ") AS ok, "
        "count(*) FILTER (WHERE " + _FAILED + ") AS failed, avg(duration) FILTER (WHERE " + _VALID + ") AS mean, "
        "percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY duration) FILTER (WHERE " + _VALID + ") AS p, "
        "coalesce(sum(credits_used), 0) AS credits, count(*) FILTER (WHERE " + _VALID + ") AS rn, "
        "sum(duration) FILTER (WHERE " + _VALID + ") AS rs FROM r GROUP BY ws, h), "
        "k AS (SELECT ws, h, array_agg(bin ORDER BY bin) AS bins, array_agg(c ORDER BY bin) AS counts "
        "FROM (SELECT ws, h, CASE WHEN duration = 0 THEN -2147483648 ELSE ceil(ln(duration) / %(ln_gamma)s)::int END "
        "AS bin, count(*) AS c FROM r WHERE " + _VALID + " GROUP BY 1, 2, 3) b GROUP BY ws, h) "
        "INSERT INTO bench_bound.execution_metrics_hourly (workspace_id, hour, total_executions, successful_executions, "
        "failed_executions, avg_runtime, p50_runtime, p95_runtime, p99_runtime, total_credits, avg_credits_per_run, "
        "runtime_count, runtime_sum, runtime_sketch_bins, runtime_sketch_counts) "
        "SELECT m.ws, m.h, n, ok, failed, mean, p[1], p[2], p[3], credits, credits / n, rn, coalesce(rs, 0), "
        "coalesce(bins, '{}'), coalesce(counts, '{}') FROM m LEFT JOIN k ON k.ws = m.ws AND k.h = m.h"),
    "user_activity": (
        "WITH e AS (SELECT analytics.tally_key(workspace_id) AS ws, analytics.tally_key(user_id) AS u, session_id, "
        "event_type, created_at, date_trunc('hour', created_at, 'UTC') AS h FROM analytics.user_activity "
        "WHERE created_at >= %(start)s AND created_at < %(end)s), "
        "s AS (SELECT h, ws, u, session_id, count(*) AS n, max(created_at) - min(created_at) AS span "
        "FROM e GROUP BY h, ws, u, session_id), "
        "t AS (SELECT h, ws, u, jsonb_object_agg(event_type, n) AS types, "
        "coalesce(sum(n) FILTER (WHERE event_type = 'page_view'), 0) AS views "
        "FROM (SELECT h, ws, u, event_type, count(*) AS n FROM e GROUP BY 1, 2, 3, 4) x GROUP BY h, ws, u), "
        "us AS (SELECT h, ws, u, sum(n) AS n, count(session_id) AS sessions, "
        "coalesce(sum(extract(epoch FROM span)) FILTER (WHERE session_id IS NOT NULL), 0)::float8 AS active "
        "FROM s GROUP BY h, ws, u) "
        "INSERT INTO bench_bound.user_activity_hourly (workspace_id, user_id, hour, total_events, page_views, "
        "unique_sessions, event_type_counts, active_duration_seconds, avg_session_duration) "
        "SELECT us.ws, us.u, us.h, us.n, t.views, sessions, t.types, active, "
        "CASE WHEN sessions = 0 THEN 0 ELSE active / sessions END FROM us JOIN t USING (h, ws, u)"),
    "credit_consumption": (
        "INSERT INTO bench_bound.credit_consumption_hourly (workspace_id, user_id, agent_id, hour, total_credits, "
        "avg_credits_per_execution, peak_credits_per_execution, executions_count, successful_executions, "
        "credits_per_success) "
        "SELECT ws, u, a, h, sum(c), sum(c) / count(*), max(c), count(*), count(*) FILTER (WHERE ok), "
        "CASE WHEN count(*) FILTER (WHERE ok) = 0 THEN 0 ELSE coalesce(sum(c) FILTER (WHERE ok), 0) "
        "/ count(*) FILTER (WHERE ok) END "
        "FROM (SELECT analytics.tally_key(workspace_id) AS ws, analytics.tally_key(user_id) AS u, "
        "analytics.tally_key(agent_id) AS a, date_trunc('hour', started_at, 'UTC') AS h, "
        "coalesce(credits_used, 0) AS c, " + _OK + " AS ok FROM public.execution_logs "
        "WHERE started_at >= %(start)s AND started_at < %(end)s) r GROUP BY ws, u, a, h"),
}
BOUND_TABLES = {"execution_metrics": "execution_metrics_hourly", "user_activity": "user_activity_hourly",
                "credit_consumption": "credit_consumption_hourly"}
BOUND_TITLES = {
    "execution_metrics": "  PostgreSQL's own statement, written",
    "user_activity": "  PostgreSQL's own statement, written",
    "credit_consumption": "  PostgreSQL's own statement, written",
}


def make_bound_tables(url: str) -> None:
    """Empty tables of each hourly output's shape, key and indexes, for the bounds to write into."""
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("CREATE SCHEMA IF NOT EXISTS bench_bound")
        for table in BOUND_TABLES.values():
            c.execute(f"CREATE TABLE IF NOT EXISTS bench_bound.{table} (LIKE analytics.{table} INCLUDING ALL)")


OUTPUTS = ("execution_metrics_hourly", "user_activity_hourly", "credit_consumption_hourly",
           "execution_metrics_daily", "execution_metrics_weekly", "execution_metrics_monthly")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_scale(text: str) -> int:
    t = text.strip().lower()
    mult = {"k": 1_000, "m": 1_000_000}.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid scale {text!r} (examples: 100k, 1m, 4m)") from None


def scale_label(n: int) -> str:
    return f"{n // 1_000_000}m" if n % 1_000_000 == 0 else f"{n // 1_000}k" if n % 1_000 == 0 else str(n)


def with_db(url: str, name: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


# ---- scratch databases and data ------------------------------------------------------------

def create_db(admin_url: str, label: str) -> str:
    name = f"tally_bench_{label}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    url = with_db(admin_url, name)
    migrate.upgrade(url)
    make_bound_tables(url)
    return url


def drop_db(admin_url: str, url: str) -> None:
    name = urllib.parse.urlsplit(url).path.lstrip("/")
    with psycopg.connect(admin_url, autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _seed_child(url: str, start: dt.datetime, hours: int, per_day: int, seed: int, out) -> None:
    from tally.seed import seed as write
    t0 = time.monotonic()
    with psycopg.connect(url) as conn:
        r = write(conn, start=start, hours=hours, workspaces=WORKSPACES, executions_per_hour=per_day // 24,
                  events_per_hour=EVENTS_PER_EXECUTION * per_day // 24, seed=seed)
    out.send((r.executions, r.events, time.monotonic() - t0))


def seed_days(url: str, start: dt.datetime, days: int, per_day: int, seed: int) -> tuple[int, int]:
    """Seed in a child process (the generator's buffers must not count as tally's memory)."""
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_seed_child, args=(url, start, 24 * days, per_day, seed, send))
    p.start()
    send.close()  # ours: so that a child that dies ends recv() with EOFError
    try:
        executions, events, secs = recv.recv()
    except EOFError:
        p.join()
        raise RuntimeError(f"seeding process failed (exit code {p.exitcode})") from None
    p.join()
    log(f"seeded {executions:,} executions and {events:,} events in {secs:.0f}s")
    settle(url)
    return executions, events


def settle(url: str) -> None:
    """What autovacuum and the checkpointer do to freshly loaded tables, done now so that it
    cannot land mid-measurement."""
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("VACUUM (ANALYZE) public.execution_logs, analytics.user_activity")
    flush(url)


def flush(url: str) -> None:
    """Checkpoint, then let the OS write back what was just loaded: a local server's commits
    would otherwise wait behind gigabytes of writeback."""
    with psycopg.connect(url, autocommit=True) as c:
        try:
            c.execute("CHECKPOINT")
        except psycopg.errors.InsufficientPrivilege:  # not a superuser: the checkpointer will do it
            pass
    os.sync()


def reset_outputs(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("TRUNCATE " + ", ".join(f"analytics.{t}" for t in OUTPUTS) + ", analytics.aggregation_runs")


# ---- timing ---------------------------------------------------------------------------------

class Clock:
    """Times floors and rollups on one database; floors on their own connection."""

    def __init__(self, url: str):
        self.url = url
        self.conn = psycopg.connect(url, autocommit=True)
        self.conn.execute("SET TIME ZONE 'UTC'")
        self.runner = Runner(url, trigger="backfill", lock_wait=0)

    def close(self) -> None:
        self.runner.close()
        self.conn.close()

    def floor(self, sql: str, start: dt.datetime, end: dt.datetime) -> float:
        params = dict(start=start, end=end)
        self.conn.execute(sql, params).fetchall()  # warm-up: the job finds its rows in cache too
        t0 = time.perf_counter()
        self.conn.execute(sql, params).fetchall()
        return time.perf_counter() - t0

    def bound(self, step: str, start: dt.datetime, end: dt.datetime) -> float:
        """BOUNDS[step] into an empty table, committed, with the step's own planner settings (as
        the Runner sets them); after an untimed warm-up, as for a floor."""
        params = dict(start=start, end=end, ln_gamma=LN_GAMMA)
        for timed in (False, True):
            self.conn.execute(f"TRUNCATE bench_bound.{BOUND_TABLES[step]}")
            t0 = time.perf_counter()
            with self.conn.transaction():
                apply_step_settings(self.conn, STEPS[step])
                self.conn.execute(BOUNDS[step], params)
            secs = time.perf_counter() - t0
        return secs

    def rollup(self, bucket: B.Bucket, prepare: bool = True):
        t0 = time.perf_counter()
        result = self.runner.run(bucket, prepare=prepare)
        secs = time.perf_counter() - t0
        if not result.ok or any(s.status != "succeeded" for s in result.steps):
            raise RuntimeError(f"{bucket}: {[(s.step, s.status, s.error) for s in result.steps]}")
        if result.prepared:  # a timed period run must find its hours ready; say so if it did not
            log(f"  {bucket}: {len(result.prepared)} hour(s) aggregated first")
        return secs, {s.step: s.seconds for s in result.steps}


def hour_sample(clock: Clock, hour: dt.datetime, bounds: bool = False) -> dict:
    """Floors of the three hourly steps (and their BOUNDS), then the first run of the hourly
    rollup of ``hour``."""
    floors = {step: clock.floor(FLOORS[step], hour, hour + HOUR) for step in HOURLY_STEPS}
    sample = {"floors": floors}
    if bounds:
        sample["bounds"] = {step: clock.bound(step, hour, hour + HOUR) for step in HOURLY_STEPS}
    total, steps = clock.rollup(B.bucket("hourly", hour))
    return {**sample, "steps": steps, "rollup": total}


def run_schedule(clock: Clock, url: str, start: dt.datetime, end: dt.datetime) -> None:
    """The hourly rollup of every hour in [start, end) not yet aggregated, empty ones too, as the
    hourly schedule would have run them before a week or month closes (untimed)."""
    with psycopg.connect(url) as c:
        done = {r[0] for r in c.execute(
            "SELECT bucket_start FROM analytics.aggregation_latest WHERE rollup = 'hourly' "
            "AND bucket_start >= %s AND bucket_start < %s AND status = 'succeeded' "
            "GROUP BY bucket_start HAVING count(*) = %s", [start, end, len(HOURLY_STEPS)])}
    hour = start
    while hour < end:
        if hour not in done:
            clock.rollup(B.bucket("hourly", hour))
        hour += HOUR


def period_samples(clock: Clock, url: str, rollup: str, start: dt.datetime, runs: int) -> list[dict]:
    bucket = B.bucket(rollup, start)
    table = {"daily": "execution_metrics_daily", "weekly": "execution_metrics_weekly",
             "monthly": "execution_metrics_monthly"}[rollup]
    key = {"daily": "date", "weekly": "week_start", "monthly": "month"}[rollup]
    run_schedule(clock, url, bucket.start, bucket.end)
    clock.rollup(bucket)  # untimed: later runs are the first runs of a period whose hours are done
    with psycopg.connect(url, autocommit=True) as c:  # what autovacuum does after a backfill
        c.execute("ANALYZE analytics.execution_metrics_hourly, analytics.credit_consumption_hourly, "
                  "analytics.aggregation_runs")
    flush(url)
    out = []
    for _ in range(runs):
        with psycopg.connect(url, autocommit=True) as c:  # each timed run is a first run
            c.execute(f"DELETE FROM analytics.{table} WHERE {key} = %s", [bucket.start.date()])
        floor = clock.floor(PERIOD_FLOOR, bucket.start, bucket.end)
        secs, steps = clock.rollup(bucket)
        out.append({"floor": floor, "time": secs, "steps": steps})
    return out


def _measure_scale_child(url: str, runs: int, out) -> None:
    clock = Clock(url)
    hours = [DAY + h * HOUR for h in range(24)]
    backfills = []
    for r in range(runs):
        reset_outputs(url)
        samples = [hour_sample(clock, h, bounds=True) for h in hours]
        day_floor = clock.floor(PERIOD_FLOOR, DAY, DAY + 24 * HOUR)
        day_time, _ = clock.rollup(B.bucket("daily", DAY))
        backfills.append({"hours": samples, "day_floor": day_floor, "day_time": day_time})
        log(f"  backfill {r + 1}/{runs}: {sum(s['rollup'] for s in samples) + day_time:.2f}s")
    daily = period_samples(clock, url, "daily", DAY, runs)
    weekly = period_samples(clock, url, "weekly", B.floor("weekly", DAY), runs)
    monthly = period_samples(clock, url, "monthly", B.floor("monthly", DAY), runs)
    clock.close()
    out.send({"backfills": backfills, "daily": daily, "weekly": weekly, "monthly": monthly,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def _measure_history_child(url: str, hours: list, phase: str, runs: int, out) -> None:
    clock = Clock(url)
    result = {"hours": [hour_sample(clock, h) for h in hours]}
    if phase == "after":
        result["weekly"] = period_samples(clock, url, "weekly", B.floor("weekly", DAY), runs)
        result["monthly"] = period_samples(clock, url, "monthly", B.floor("monthly", DAY), runs)
    clock.close()
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.send(result)


def in_child(target, *args):
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=target, args=(*args, send))
    p.start()
    send.close()  # ours: so that a child that dies ends recv() with EOFError
    try:
        result = recv.recv()
    except EOFError:
        p.join()
        raise RuntimeError(f"measurement process failed (exit code {p.exitcode})") from None
    p.join()
    return result


# ---- summaries --------------------------------------------------------------------------------

def summarize_scale(raw: dict, executions: int, events: int) -> dict:
    hours = [h for b in raw["backfills"] for h in b["hours"]]
    s: dict = {}
    for step in HOURLY_STEPS:
        s[step] = {"time": median(h["steps"][step] for h in hours),
                   "ratio": median(h["steps"][step] / h["floors"][step] for h in hours)}
        s[f"{step}_bound"] = {"time": median(h["bounds"][step] for h in hours),
                              "ratio": median(h["bounds"][step] / h["floors"][step] for h in hours)}
    s["hourly"] = {"time": median(h["rollup"] for h in hours),
                   "ratio": median(h["rollup"] / sum(h["floors"].values()) for h in hours)}
    for rollup in ("daily", "weekly", "monthly"):
        s[rollup] = {"time": median(x["time"] for x in raw[rollup]),
                     "ratio": median(x["time"] / x["floor"] for x in raw[rollup])}
    bf_time, bf_ratio = [], []
    for b in raw["backfills"]:
        t = sum(h["rollup"] for h in b["hours"]) + b["day_time"]
        floors = sum(sum(h["floors"].values()) for h in b["hours"]) + b["day_floor"]
        bf_time.append(t)
        bf_ratio.append(t / floors)
    s["backfill"] = {"time": median(bf_time), "rows_per_s": (executions + events) / median(bf_time),
                     "ratio": median(bf_ratio)}
    s["peak_rss_mb"] = raw["peak_rss_mb"]
    s["rows"] = {"executions": executions, "events": events}
    return s


def summarize_history(before: dict, after: dict) -> dict:
    def block(raw):
        hs = raw["hours"]
        return {"time": median(h["rollup"] for h in hs),
                "ratio": median(h["rollup"] / sum(h["floors"].values()) for h in hs)}
    b, a = block(before), block(after)
    out = {"1_day": b, "n_days": a, "growth": a["time"] / b["time"]}
    for rollup in ("weekly", "monthly"):
        out[rollup] = {"time": median(x["time"] for x in after[rollup]),
                       "ratio": median(x["time"] / x["floor"] for x in after[rollup])}
    out["peak_rss_mb"] = max(before["peak_rss_mb"], after["peak_rss_mb"])
    return out


def fmt_time(secs) -> str:
    if secs is None:
        return "-"
    return f"{secs * 1000:.0f} ms" if secs < 10 else f"{secs:.1f} s"


def fmt_ratio(r) -> str:
    return "-" if r is None else f"{r:.2f}x"


def render(info: dict, scales: dict, history: dict | None, args) -> str:
    labels = list(scales)
    rows = [("", [f"{lab}/day" for lab in labels], [""] * len(labels))]
    rows.append(("rows per hour (executions + events)",
                 [f"{(s['rows']['executions'] + s['rows']['events']) // 24:,}" for s in scales.values()],
                 [""] * len(labels)))
    names = [("execution_metrics", "hourly step execution_metrics"),
             ("execution_metrics_bound", BOUND_TITLES["execution_metrics"]),
             ("user_activity", "hourly step user_activity"),
             ("user_activity_bound", BOUND_TITLES["user_activity"]),
             ("credit_consumption", "hourly step credit_consumption"),
             ("credit_consumption_bound", BOUND_TITLES["credit_consumption"]),
             ("hourly", "hourly rollup (3 steps + ledger)"),
             ("daily", "daily rollup (vs the day's raw scan)"),
             ("weekly", "weekly rollup, 1 day of data (vs the week's raw scan)"),
             ("monthly", "monthly rollup, 1 day of data (vs the month's raw scan)")]
    for key, title in names:
        rows.append((title, [fmt_time(s[key]["time"]) for s in scales.values()],
                     [fmt_ratio(s[key]["ratio"]) for s in scales.values()]))
    rows.append(("backfill 1 day (24 hourly + daily)",
                 [f"{s['backfill']['rows_per_s'] / 1000:,.0f} k rows/s" for s in scales.values()],
                 [fmt_ratio(s["backfill"]["ratio"]) for s in scales.values()]))
    rows.append(("  its wall time", [fmt_time(s["backfill"]["time"]) for s in scales.values()],
                 [""] * len(labels)))
    rows.append(("peak memory of the tally process (RSS)",
                 [f"{s['peak_rss_mb']:.0f} MB" for s in scales.values()], [""] * len(labels)))
    if not labels:  # --scales none: the table-size test only
        rows = []
    w0 = max([len(r[0]) for r in rows] + [45]) + 2
    wt = [max(len(r[1][i]) for r in rows) + 3 for i in range(len(labels))]
    wr = [max([len(r[2][i]) for r in rows] + [len("x floor")]) + 2 for i in range(len(labels))]
    lines = [f"tally bench: {info['cores']} cores, PostgreSQL {info['version']} ({info['where']}), "
             f"{WORKSPACES} workspaces, median of {args.runs} runs",
             f"server settings: {info['settings']}", ""]
    header = "".ljust(w0) + "".join(f"{'time':>{wt[i]}}{'x floor':>{wr[i]}}" for i in range(len(labels)))
    for n, (title, times, ratios) in enumerate(rows):
        lines.append(title.ljust(w0) + "".join(f"{times[i]:>{wt[i]}}{ratios[i]:>{wr[i]}}" for i in range(len(labels))))
        if n == 0:
            lines.append(header)
    if history:
        h = history
        week_days = min(args.history_days, (DAY - B.floor("weekly", DAY)).days + 1)
        month_days = min(args.history_days, DAY.day)
        lines += ["", f"table size ({args.history_scale_label}/day; the same {len(h['hours'])} hours aggregated "
                      f"when the tables hold 1 day, then {args.history_days} days)",
                  f"  hourly rollup, 1 day in the tables      {fmt_time(h['1_day']['time']):>10}  {fmt_ratio(h['1_day']['ratio']):>7}",
                  f"  hourly rollup, {args.history_days} days in the tables    {fmt_time(h['n_days']['time']):>10}  "
                  f"{fmt_ratio(h['n_days']['ratio']):>7}",
                  f"  {args.history_days} days / 1 day                          {h['growth']:>9.2f}x",
                  f"  weekly rollup, {week_days} days of data          {fmt_time(h['weekly']['time']):>10}  "
                  f"{fmt_ratio(h['weekly']['ratio']):>7}",
                  f"  monthly rollup, {month_days} days of data        {fmt_time(h['monthly']['time']):>10}  "
                  f"{fmt_ratio(h['monthly']['ratio']):>7}",
                  f"  peak memory of the tally process        {h['peak_rss_mb']:>7.0f} MB"]
    lines += ["", "x floor: time / the time PostgreSQL takes for SELECT workspace_id, count(*), sum(x) ... GROUP BY "
                  "workspace_id over the same rows (hourly rollup: the sum of its steps' floors; backfill: the sum of "
                  "all its floors).",
              "PostgreSQL's own statement, written: what PostgreSQL itself takes to compute the step's output rows "
              "from the same rows with its built-ins and INSERT them into an empty table of the output's shape, key "
              "and indexes, committed, with the step's planner settings (BOUNDS in bench/run.py)."]
    return "\n".join(lines)


def server_info(admin_url: str, where: str) -> dict:
    with psycopg.connect(admin_url) as c:
        version = c.execute("SHOW server_version").fetchone()[0]
        settings = ", ".join(f"{n}={c.execute(f'SHOW {n}').fetchone()[0]}" for n in
                             ("shared_buffers", "work_mem", "max_parallel_workers_per_gather", "jit"))
    return {"cores": os.cpu_count(), "version": version.split()[0], "where": where, "settings": settings}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--database-url", help="a PostgreSQL server to create scratch databases on "
                    "(any database URL of it; default: tally's embedded PostgreSQL)")
    ap.add_argument("--scales", default="100k,1m,4m",
                    help="executions per day, comma-separated, or none (default %(default)s)")
    ap.add_argument("--runs", type=int, default=3, help="repetitions of every measurement (default %(default)s)")
    ap.add_argument("--history-scale", default="100k", help="scale of the table-size test (default %(default)s)")
    ap.add_argument("--history-days", type=int, default=30, help="days in the tables for the table-size test")
    ap.add_argument("--history-hours", type=int, default=6, help="hours aggregated at each table size")
    ap.add_argument("--no-history", action="store_true", help="skip the table-size test")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json", type=Path, help="also write every raw measurement to this file")
    ap.add_argument("--keep", action="store_true", help="keep the scratch databases")
    args = ap.parse_args(argv)
    scales = [parse_scale(s) for s in args.scales.split(",") if s.strip() and s.strip() != "none"]
    args.history_scale_label = scale_label(parse_scale(args.history_scale))
    if args.runs < 1 or args.history_days < 2:
        ap.error("--runs must be >= 1 and --history-days >= 2")

    if args.database_url:
        admin_url, where = args.database_url, "given server"
    else:
        from tally.db import embedded_url
        admin_url, where = embedded_url(), "embedded"
    info = server_info(admin_url, where)
    log(f"{info['cores']} cores, PostgreSQL {info['version']} ({where})")

    raw: dict = {"info": info, "scales": {}, "history": None}
    summaries: dict = {}
    for per_day in scales:
        label = scale_label(per_day)
        log(f"scale {label}: seeding 1 day")
        url = create_db(admin_url, label)
        try:
            executions, events = seed_days(url, DAY, 1, per_day, args.seed)
            log(f"scale {label}: measuring")
            r = in_child(_measure_scale_child, url, args.runs)
        finally:
            if not args.keep:
                drop_db(admin_url, url)
        raw["scales"][label] = r
        summaries[label] = summarize_scale(r, executions, events)

    history = None
    if not args.no_history:
        per_day = parse_scale(args.history_scale)
        label = scale_label(per_day)
        log(f"table size: seeding 1 day at {label}")
        url = create_db(admin_url, f"history_{label}")
        try:
            seed_days(url, DAY, 1, per_day, args.seed)
            hours = [DAY + (8 + i) * HOUR for i in range(args.history_hours)]
            before = in_child(_measure_history_child, url, hours, "before", args.runs)
            log(f"table size: seeding {args.history_days - 1} more days")
            seed_days(url, DAY - (args.history_days - 1) * 24 * HOUR, args.history_days - 1, per_day, args.seed)
            with psycopg.connect(url, autocommit=True) as c:  # the same hours, first runs again
                c.execute("DELETE FROM analytics.aggregation_runs WHERE rollup = 'hourly' AND bucket_start = ANY(%s)", [hours])
                for t in OUTPUTS[:3]:
                    c.execute(f"DELETE FROM analytics.{t} WHERE hour = ANY(%s)", [hours])
                    c.execute(f"VACUUM analytics.{t}")  # no dead twin of every key to step over
            after = in_child(_measure_history_child, url, hours, "after", args.runs)
        finally:
            if not args.keep:
                drop_db(admin_url, url)
        raw["history"] = {"before": before, "after": after}
        history = summarize_history(before, after)
        history["hours"] = [h.isoformat() for h in hours]

    print(render(info, summaries, history, args))
    if args.json:
        args.json.write_text(json.dumps({"raw": raw, "summary": {"scales": summaries, "history": history},
                                         "args": {k: str(v) for k, v in vars(args).items()}}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
