"""Each hourly step against its bound (PostgreSQL's own statement for its output rows, written),
on two shapes of data.

    .venv/bin/python bench/bounds.py [--database-url URL] [--scales 1m,4m] [--shapes bench,small]
                                     [--hours 6] [--runs 3] [--json FILE]

For each shape and scale (executions per day) a scratch database gets ``--hours`` hours of
data at that rate (the hours of bench/run.py's day from 08:00), is settled, and then, ``--runs``
times, each hour is rolled up as a first run (its outputs and ledger emptied before, untimed),
right after its three bounds (``BOUNDS`` in bench/run.py: the step's output rows computed by
PostgreSQL's plain statement and inserted into an empty table of the output's shape, key and
indexes, committed; after an untimed warm-up).

* ``bench``: bench/run.py's data (``tally.seed.seed``: 200 workspaces, 3 events per
  execution, sessions of several users' events);
* ``small``: many small groups: every execution its own workspace, user and agent; every
  session its own user (and workspace), 3 events each, one event per execution.

Printed per shape and scale: each step's median time, its bound's, and the median of the
paired ratios step / bound; the hourly rollup (its three steps with their locks, ledger and
state writes, as ``Runner.run`` times it) against the sum of its steps' bounds.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import run as R  # noqa: E402  (bench/run.py: scratch databases, settling, the Clock, BOUNDS)
from tally import buckets as B  # noqa: E402

HOUR = dt.timedelta(hours=1)
FIRST = R.DAY + 8 * HOUR

SMALL_EXECUTIONS = """
INSERT INTO public.execution_logs (execution_id, workspace_id, user_id, agent_id, status, started_at,
                                   completed_at, duration, credits_used)
SELECT 'sg-' || %(tag)s || '-' || g, 'w-' || %(tag)s || '-' || g, 'u-' || %(tag)s || '-' || g,
       'a-' || %(tag)s || '-' || g,
       (ARRAY['completed', 'completed', 'completed', 'failed', 'running', 'timeout'])[1 + g %% 6],
       %(start)s + (g * 3600.0 / %(n)s) * interval '1 second',
       %(start)s + (g * 3600.0 / %(n)s + (hashint4(g) & 65535) / 1000.0) * interval '1 second',
       (hashint4(g) & 65535) / 1000.0, (hashint4(g + 7) & 1023)::numeric / 10
FROM generate_series(0, %(n)s - 1) g
"""
SMALL_EVENTS = """
INSERT INTO analytics.user_activity (workspace_id, user_id, session_id, event_type, event_name, page_path, created_at)
SELECT 'w-' || %(tag)s || '-' || g / 3, 'u-' || %(tag)s || '-' || g / 3, 's-' || %(tag)s || '-' || g / 3,
       (ARRAY['page_view', 'click', 'submit'])[1 + g %% 3], 'event', '/page',
       %(start)s + (g * 3600.0 / %(n)s) * interval '1 second'
FROM generate_series(0, %(n)s - 1) g
"""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def seed(url: str, shape: str, per_day: int, hours: int) -> None:
    per_hour = per_day // 24
    if shape == "bench":
        from tally.seed import seed as write
        with psycopg.connect(url) as conn:
            write(conn, start=FIRST, hours=hours, workspaces=R.WORKSPACES, executions_per_hour=per_hour,
                  events_per_hour=R.EVENTS_PER_EXECUTION * per_hour, seed=7)
        return
    with psycopg.connect(url) as conn:
        for i in range(hours):
            start = FIRST + i * HOUR
            tag = f"{start:%d%H}"
            conn.execute(SMALL_EXECUTIONS, dict(tag=tag, start=start, n=per_hour))
            conn.execute(SMALL_EVENTS, dict(tag=tag, start=start, n=per_hour))
            conn.commit()


def _measure_child(url: str, hours: list, runs: int, out) -> None:
    clock = R.Clock(url)
    samples = []
    for r in range(runs):
        R.reset_outputs(url)
        for hour in hours:
            bounds = {step: clock.bound(step, hour, hour + HOUR) for step in R.HOURLY_STEPS}
            total, steps = clock.rollup(B.bucket("hourly", hour))
            samples.append({"hour": hour.isoformat(), "bounds": bounds, "steps": steps, "rollup": total})
        log(f"  run {r + 1}/{runs}")
    # the bound computed the step's rows: the last hour's bound tables hold as many rows as its outputs
    for step, table in R.BOUND_TABLES.items():
        mine, theirs = (clock.conn.execute(f"SELECT count(*) FROM {schema}.{table} WHERE hour = %s",
                                           [hours[-1]]).fetchone()[0] for schema in ("analytics", "bench_bound"))
        if mine != theirs:
            raise RuntimeError(f"{step}: the bound wrote {theirs} rows for {hours[-1]}, the step {mine}")
    clock.close()
    out.send(samples)


def summarize(samples: list[dict]) -> dict:
    s = {}
    for step in R.HOURLY_STEPS:
        s[step] = {"time": R.median(x["steps"][step] for x in samples),
                   "bound": R.median(x["bounds"][step] for x in samples),
                   "ratio": R.median(x["steps"][step] / x["bounds"][step] for x in samples)}
    s["hourly"] = {"time": R.median(x["rollup"] for x in samples),
                   "bound": R.median(sum(x["bounds"].values()) for x in samples),
                   "ratio": R.median(x["rollup"] / sum(x["bounds"].values()) for x in samples)}
    return s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--database-url", help="a PostgreSQL server (any database URL of it; default: tally's embedded one)")
    ap.add_argument("--scales", default="1m,4m", help="executions per day, comma-separated (default %(default)s)")
    ap.add_argument("--shapes", default="bench,small", help="bench, small or both (default %(default)s)")
    ap.add_argument("--hours", type=int, default=6, help="hours sampled (default %(default)s)")
    ap.add_argument("--runs", type=int, default=3, help="first runs of each hour (default %(default)s)")
    ap.add_argument("--json", type=Path, help="also write every raw measurement to this file")
    args = ap.parse_args(argv)
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    if not shapes or any(s not in ("bench", "small") for s in shapes) or args.hours < 1 or args.runs < 1:
        ap.error("--shapes takes bench and/or small; --hours and --runs must be >= 1")
    scales = [R.parse_scale(s) for s in args.scales.split(",") if s.strip()]
    if not args.database_url:
        from tally.db import embedded_url
        args.database_url = embedded_url()
    info = R.server_info(args.database_url, "given server")
    hours = [FIRST + i * HOUR for i in range(args.hours)]
    raw, summary = {}, {}
    for shape in shapes:
        for per_day in scales:
            label = f"{shape} {R.scale_label(per_day)}/day"
            url = R.create_db(args.database_url, f"bounds_{shape}_{R.scale_label(per_day)}")
            try:
                log(f"{label}: seeding {args.hours} hours")
                seed(url, shape, per_day, args.hours)
                R.settle(url)
                log(f"{label}: measuring")
                raw[label] = R.in_child(_measure_child, url, hours, args.runs)
            finally:
                R.drop_db(args.database_url, url)
            summary[label] = summarize(raw[label])

    print(f"tally hourly steps against their bounds: {info['cores']} cores, PostgreSQL {info['version']}, "
          f"{args.hours} hours x {args.runs} first runs, medians")
    print("bound: PostgreSQL's own statement for the step's output rows, INSERTed into an empty table of the output's "
          "shape, key and indexes, committed (BOUNDS in bench/run.py)")
    print(f"{'':34}{'step':>10}{'bound':>10}{'step/bound':>12}")
    for label, s in summary.items():
        print(label)
        for step in (*R.HOURLY_STEPS, "hourly"):
            name = "hourly rollup vs sum of bounds" if step == "hourly" else step
            print(f"  {name:32}{1000 * s[step]['time']:8.0f}ms{1000 * s[step]['bound']:8.0f}ms"
                  f"{s[step]['ratio']:11.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"info": info, "raw": raw, "summary": summary}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
