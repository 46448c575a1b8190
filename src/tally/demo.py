"""``tally demo``: the whole job on a fresh machine, end to end (shown through a view: tally/terminal.py)."""
from __future__ import annotations

import datetime as dt
import time

from . import buckets as B
from . import migrate
from . import seed as seeding
from .db import connection
from .rollups import Runner


def run(url: str, view, *, hours: int, executions_per_hour: int, workspaces: int) -> int:
    """Migrate, seed ``hours`` ending at the current hour, run every hour and day, show the result."""
    t0 = time.monotonic()
    migrate.upgrade(url)
    view.stage(f"[bold]1. migrations[/] applied (revision {migrate.current(url)})")

    end = B.floor("hourly", dt.datetime.now(B.UTC))
    start = end - dt.timedelta(hours=hours)
    with connection(url) as conn:
        present = conn.execute(
            "SELECT count(*) FROM public.execution_logs WHERE started_at >= %s AND started_at < %s", (start, end)
        ).fetchone()[0]
        if present:
            view.stage(f"[bold]2. seed[/] skipped: {present:,} executions already in "
                       f"{start:%Y-%m-%dT%H:00Z} .. {end:%Y-%m-%dT%H:00Z}")
        else:
            res = seeding.seed(conn, start=start, hours=hours, workspaces=workspaces,
                               executions_per_hour=executions_per_hour, events_per_hour=3 * executions_per_hour, seed=42)
            view.stage(f"[bold]2. seed[/] {res.executions:,} executions, {res.events:,} events, "
                       f"{start:%Y-%m-%dT%H:00Z} .. {end:%Y-%m-%dT%H:00Z}")

    work = [*B.within("hourly", start, end), *B.within("daily", start, end)]
    failed = rows = 0
    with Runner(url, trigger="manual") as runner, view.progress(len(work)) as advance:
        for bucket in work:
            result = runner.run(bucket)
            failed += len(result.failed)
            rows += result.rows
            advance(str(bucket))
    n_hours = sum(1 for b in work if b.grain.parts is None)
    view.stage(f"[bold]3. rollups[/] {n_hours} hourly and {len(work) - n_hours} daily buckets, "
               f"{rows:,} output rows, {failed} failed steps")

    days = list(B.within("daily", start, end))
    with connection(url) as conn:
        if days:
            top = conn.execute(
                "SELECT workspace_id, total_executions, successful_executions, failed_executions, avg_runtime, "
                "p50_runtime, p95_runtime, p99_runtime, total_credits, unique_users, unique_agents, health_score "
                "FROM analytics.execution_metrics_daily WHERE date = %s ORDER BY total_executions DESC LIMIT 8",
                (days[-1].start.date(),),
            ).fetchall()
            view.busiest(f"4. execution_metrics_daily for {days[-1].label} (busiest workspaces)", top)
        summary = conn.execute(
            "SELECT rollup, state, count(*) FROM analytics.bucket_state "
            "WHERE bucket_start >= %s AND bucket_start < %s GROUP BY 1, 2 ORDER BY 1, 2", (start, end)
        ).fetchall()
    view.stage("[bold]5. state[/] of every step and bucket: " + ", ".join(f"{r} {s} {n}" for r, s, n in summary))
    view.stage(f"demo finished in {time.monotonic() - t0:.1f}s; try `tally status`, `tally runs`, "
               f"`tally run hourly --hour {(end - dt.timedelta(hours=1)):%Y-%m-%dT%H:00Z}` or `tally db stop`")
    return 1 if failed else 0
