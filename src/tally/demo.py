"""``tally demo``: the whole job on a fresh machine, end to end."""
from __future__ import annotations

import datetime as dt
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import buckets as B
from . import migrate
from . import seed as seeding
from .db import connection
from .rollups import Runner


def run(url: str, *, hours: int, executions_per_hour: int, workspaces: int, out: Console, err: Console) -> int:
    t0 = time.monotonic()
    migrate.upgrade(url)
    out.print(f"[bold]1. migrations[/] applied (revision {migrate.current(url)})")

    end = B.floor("hourly", dt.datetime.now(B.UTC))
    start = end - dt.timedelta(hours=hours)
    with connection(url) as conn:
        present = conn.execute(
            "SELECT count(*) FROM public.execution_logs WHERE started_at >= %s AND started_at < %s", (start, end)
        ).fetchone()[0]
        if present:
            out.print(f"[bold]2. seed[/] skipped: {present:,} executions already in {start:%Y-%m-%dT%H:00Z} .. {end:%Y-%m-%dT%H:00Z}")
        else:
            res = seeding.seed(conn, start=start, hours=hours, workspaces=workspaces,
                               executions_per_hour=executions_per_hour, events_per_hour=3 * executions_per_hour, seed=42)
            out.print(f"[bold]2. seed[/] {res.executions:,} executions, {res.events:,} events, "
                      f"{start:%Y-%m-%dT%H:00Z} .. {end:%Y-%m-%dT%H:00Z}")

    work = [*B.within("hourly", start, end), *B.within("daily", start, end)]
    failed = 0
    rows = 0
    with Runner(url, trigger="manual") as runner, Progress(
        TextColumn("[bold]3. rollups[/] {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err, transient=True,
    ) as progress:
        task = progress.add_task("", total=len(work))
        for bucket in work:
            progress.update(task, description=str(bucket))
            result = runner.run(bucket)
            failed += len(result.failed)
            rows += result.rows
            progress.advance(task)
    n_hours = sum(1 for b in work if b.rollup == "hourly")
    out.print(f"[bold]3. rollups[/] {n_hours} hourly and {len(work) - n_hours} daily buckets, "
              f"{rows:,} output rows, {failed} failed steps")

    days = list(B.within("daily", start, end))
    if days:
        day = days[-1]
        with connection(url) as conn:
            top = conn.execute(
                "SELECT workspace_id, total_executions, successful_executions, failed_executions, avg_runtime, "
                "p50_runtime, p95_runtime, p99_runtime, total_credits, unique_users, unique_agents, health_score "
                "FROM analytics.execution_metrics_daily WHERE date = %s ORDER BY total_executions DESC LIMIT 8",
                (day.start.date(),),
            ).fetchall()
        table = Table(title=f"4. execution_metrics_daily for {day.label} (busiest workspaces)", title_justify="left")
        for col in ("workspace", "runs", "ok", "failed", "avg s", "p50 s", "p95 s", "p99 s", "credits", "users", "agents", "health"):
            table.add_column(col, justify="left" if col == "workspace" else "right")
        for r in top:
            table.add_row(r[0] or "''", f"{r[1]:,}", f"{r[2]:,}", f"{r[3]:,}", f"{r[4] or 0:.2f}", f"{r[5] or 0:.2f}",
                          f"{r[6] or 0:.2f}", f"{r[7] or 0:.2f}", f"{r[8]:,.2f}", str(r[9]), str(r[10]), f"{r[11]:.1f}")
        out.print(table)

    with connection(url, autocommit=True) as conn:
        summary = conn.execute(
            "SELECT rollup, status, count(*) FROM analytics.aggregation_latest "
            "WHERE bucket_start >= %s AND bucket_start < %s GROUP BY 1, 2 ORDER BY 1, 2", (start, end)
        ).fetchall()
    out.print("[bold]5. ledger[/] latest attempt per step and bucket: "
              + ", ".join(f"{r} {s} {n}" for r, s, n in summary))
    out.print(f"demo finished in {time.monotonic() - t0:.1f}s; try `tally runs`, `tally run hourly --hour "
              f"{(end - dt.timedelta(hours=1)):%Y-%m-%dT%H:00Z}` or `tally db stop`")
    return 1 if failed else 0
