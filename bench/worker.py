"""One Celery worker process rolling up empty hours: what a task costs beyond its steps.

    .venv/bin/python bench/worker.py [--database-url URL] [--broker-url URL] [--tasks 400]
                                     [--runs 3] [--src DIR] [--json FILE]

Starts ``tally worker --concurrency 1`` (prefork: one pool process) against a scratch,
migrated, empty database on the given server (default: tally's embedded PostgreSQL) and a
Redis broker (default redis://127.0.0.1:6379/0, under a fresh key prefix), warms it up with
20 tasks, then ``--runs`` times sends ``--tasks`` ``tally.hourly_rollup`` tasks, one per
distinct empty hour, all at once, and waits for every result. On an empty hour only
overhead remains: the three steps find no rows. It prints

* rollups/s: tasks / (the last step's finish - the first step's start, as the ledger
  records them) -- the worker's own rate, the broker round trip of the last result aside;
* per-task overhead: the task's runtime as the worker logs it ("succeeded in Xs") minus
  the wall time of its three steps as the ledger records them (finished_at - started_at);
  what the task costs beyond its steps (connections, planning reads, the broker);
* the median step time, for scale.

``--src DIR`` runs the worker from another checkout's ``src`` (e.g. a ``git worktree`` of
an older commit) against the same database schema, for a before/after figure.
The scratch database is dropped at the end.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from tally import migrate  # noqa: E402

UTC = dt.timezone.utc
FIRST_HOUR = dt.datetime(2026, 1, 5, tzinfo=UTC)
SUCCEEDED = re.compile(r"Task tally\.hourly_rollup\[([0-9a-f-]+)\] succeeded in ([0-9.e-]+)s")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def with_db(url: str, name: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + name))


def start_worker(env: dict, logfile: Path, src: Path | None) -> subprocess.Popen:
    cmd = [sys.executable, "-c", "from tally.cli import main; main()", "worker", "--concurrency", "1",
           "--loglevel", "INFO", "-n", f"bench{uuid.uuid4().hex[:6]}@%h", "--without-gossip", "--without-mingle"]
    if src is not None:
        env = {**env, "PYTHONPATH": str(src)}
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=logfile.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 60
    while " ready." not in logfile.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the worker did not start:\n{logfile.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)
    return proc


def stop_worker(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def send_all(app, hours: list[dt.datetime]) -> list:
    results = [app.send_task("tally.hourly_rollup", kwargs=dict(hour=h.isoformat())) for h in hours]
    for r in results:
        r.get(timeout=600, propagate=False)
    return results


def measure(app, url: str, logfile: Path, hours: list[dt.datetime]) -> dict:
    t0 = time.monotonic()
    results = send_all(app, hours)
    client_wall = time.monotonic() - t0
    ids = [r.id for r in results]
    bad = [r.id for r in results if r.status != "SUCCESS"]
    if bad:
        raise SystemExit(f"{len(bad)} task(s) did not succeed, e.g. {bad[0]}")
    runtime = {}
    deadline = time.monotonic() + 10
    while len(runtime) < len(ids) and time.monotonic() < deadline:  # the log line may trail the result
        runtime = {m[1]: float(m[2]) for m in SUCCEEDED.finditer(logfile.read_text(errors="replace")) if m[1] in set(ids)}
        time.sleep(0.1)
    with psycopg.connect(url) as c:
        rows = c.execute(
            "SELECT task_id, count(*), sum(extract(epoch FROM finished_at - started_at)), min(started_at), max(finished_at), "
            "       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - started_at)) "
            "FROM analytics.aggregation_runs WHERE task_id = ANY(%s) AND status = 'succeeded' GROUP BY task_id",
            [ids]).fetchall()
    steps = {r[0]: float(r[2]) for r in rows}
    if any(r[1] != 3 for r in rows) or len(rows) != len(ids):
        raise SystemExit(f"expected 3 succeeded steps per task in the ledger, found {len(rows)} tasks")
    span = (max(r[4] for r in rows) - min(r[3] for r in rows)).total_seconds()
    overhead = [runtime[t] - steps[t] for t in ids if t in runtime]
    return dict(tasks=len(ids), client_wall_s=client_wall, ledger_span_s=span, rate=len(ids) / span,
                client_rate=len(ids) / client_wall, overhead_ms=[1000 * o for o in overhead],
                runtime_ms=[1000 * runtime[t] for t in ids if t in runtime],
                step_ms=[1000 * steps[t] / 3 for t in ids])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--database-url", help="a PostgreSQL server to create the scratch database on "
                    "(any database URL of it; default: tally's embedded PostgreSQL)")
    ap.add_argument("--broker-url", default="redis://127.0.0.1:6379/0", help="Redis (default %(default)s)")
    ap.add_argument("--tasks", type=int, default=400, help="tasks per run (default %(default)s)")
    ap.add_argument("--runs", type=int, default=3, help="runs (default %(default)s)")
    ap.add_argument("--src", type=Path, help="run the worker from this src directory (another checkout)")
    ap.add_argument("--json", type=Path, help="also write the raw measurements to this file")
    args = ap.parse_args(argv)
    if args.tasks < 1 or args.runs < 1:
        ap.error("--tasks and --runs must be >= 1")

    if args.database_url:
        admin_url = args.database_url
    else:
        from tally.db import embedded_url
        admin_url = embedded_url()
    name = f"tally_bench_worker_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    url = with_db(admin_url, name)
    prefix = f"tally-bench-{uuid.uuid4().hex[:8]}:"
    env = {"TALLY_DATABASE_URL": url, "TALLY_BROKER_URL": args.broker_url, "TALLY_BROKER_PREFIX": prefix,
           "TALLY_SEAL_AFTER_DAYS": "36500", "TALLY_ALERT_WEBHOOK": ""}
    os.environ.update(env)
    workdir = Path(tempfile.mkdtemp(prefix="tally-bench-worker-"))
    logfile = workdir / "worker.log"
    proc = None
    try:
        migrate.upgrade(url)
        from tally import tasks

        tasks.app.conf.update(tasks._celery_settings())
        proc = start_worker(env, logfile, args.src)
        log(f"worker up ({'src ' + str(args.src) if args.src else 'this checkout'}); warming up")
        hour = FIRST_HOUR
        send_all(tasks.app, [hour + dt.timedelta(hours=i) for i in range(20)])
        hour += dt.timedelta(hours=20)
        runs = []
        for i in range(args.runs):
            hours = [hour + dt.timedelta(hours=k) for k in range(args.tasks)]
            hour += dt.timedelta(hours=args.tasks)
            r = measure(tasks.app, url, logfile, hours)
            runs.append(r)
            log(f"run {i + 1}: {r['rate']:.1f} rollups/s, overhead median {statistics.median(r['overhead_ms']):.1f} ms")
    finally:
        if proc is not None:
            stop_worker(proc)
        with psycopg.connect(admin_url, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        try:
            import redis
            r = redis.Redis.from_url(args.broker_url)
            for key in r.scan_iter(match=f"{prefix}*", count=1000):
                r.delete(key)
        except Exception:  # noqa: BLE001 - cleanup only
            pass

    overhead = [o for r in runs for o in r["overhead_ms"]]
    runtime = [o for r in runs for o in r["runtime_ms"]]
    step = [o for r in runs for o in r["step_ms"]]
    q = statistics.quantiles(overhead, n=10)
    rates = sorted(r["rate"] for r in runs)
    print(f"one worker process, {args.tasks} empty one-hour rollups x {args.runs} runs"
          f"{' (src ' + str(args.src) + ')' if args.src else ''}")
    print(f"  rollups/s (ledger span)      median {statistics.median(rates):6.1f}   runs {', '.join(f'{x:.1f}' for x in rates)}")
    print(f"  rollups/s (client, send..results) median {statistics.median(r['client_rate'] for r in runs):6.1f}")
    print(f"  task runtime                 median {statistics.median(runtime):6.1f} ms")
    print(f"  per-task overhead            median {statistics.median(overhead):6.1f} ms   p90 {q[8]:.1f} ms")
    print(f"  one step (ledger)            median {statistics.median(step):6.1f} ms")
    if args.json:
        args.json.write_text(json.dumps(dict(tasks=args.tasks, runs=runs), indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
