"""Helpers shared by the test modules: database names, the CLI in-process and as a subprocess,
small seeded data, the ledger, and the brute-force checks of every output column.

(A module of its own, not conftest.py: tests/faults has a conftest too, and importing
"conftest" would be ambiguous.)
"""
from __future__ import annotations

import contextlib
import datetime as dt
import io
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Iterator

import psycopg

import reference as ref
from outputs import read
from tally import seed as seeding

UTC = dt.timezone.utc
TALLY = str(Path(sys.executable).with_name("tally"))


def with_db(url: str, name: str) -> str:
    """``url`` with its database replaced by ``name`` (query parameters kept)."""
    base, _, params = url.partition("?")
    return f"{base.rsplit('/', 1)[0]}/{name}" + (f"?{params}" if params else "")


@contextlib.contextmanager
def throwaway_db(admin_url: str, template: str | None = None, prefix: str = "tally_t") -> Iterator[str]:
    """A new database (a copy of ``template``, or empty), dropped on leaving; yields its URL.
    The one way the suite makes a database."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
    try:
        yield with_db(admin_url, name)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class Ran:
    code: int
    out: str
    err: str


def cli(*args: str) -> Ran:
    """``tally ARGS`` in this process (fast): exit code, stdout, stderr."""
    from tally.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return Ran(code, out.getvalue(), err.getvalue())


def spawn(url: str, *args: str, stderr=None, **env: str) -> subprocess.Popen:
    """``tally ARGS`` as a subprocess on database ``url`` (extra environment as keywords)."""
    return subprocess.Popen([TALLY, *args], env={**os.environ, "TALLY_DATABASE_URL": url, "NO_COLOR": "1", **env},
                            stdout=subprocess.PIPE, stderr=stderr or subprocess.PIPE, text=True)


def seed(url: str, start: dt.datetime, hours: int, *, per_hour: int = 30, workspaces: int = 4, events: int = 40,
         seed_value: int = 7) -> None:
    """A small deterministic data set (the same arguments give the same rows in any database)."""
    with psycopg.connect(url) as conn:
        seeding.seed(conn, start=start, hours=hours, workspaces=workspaces, executions_per_hour=per_hour,
                     events_per_hour=events, seed=seed_value)


def ledger(conn) -> list[tuple]:
    """(id, rollup, step, bucket_start, status, trigger) of every attempt, oldest first."""
    return conn.execute("SELECT id, rollup, step, bucket_start, status, trigger, error "
                        "FROM analytics.aggregation_runs ORDER BY id").fetchall()


def counts(conn) -> dict[str, int]:
    """Rows of the ledger and of every output table: 'nothing was written' compares these."""
    tables = ["aggregation_runs", "execution_metrics_hourly", "user_activity_hourly", "credit_consumption_hourly",
              "execution_metrics_daily", "execution_metrics_weekly", "execution_metrics_monthly", "dirty_log",
              "bucket_state"]
    return {t: conn.execute(f"SELECT count(*) FROM analytics.{t}").fetchone()[0] for t in tables}


# ---- brute-force checks against tests/reference.py ------------------------------------------------

def check_hour(conn, hour, executions, events):
    problems = []
    problems += ref.compare(read(conn, "execution_metrics_hourly", hour), ref.execution_hourly(executions, hour))
    problems += ref.compare(read(conn, "user_activity_hourly", hour), ref.user_activity_hourly(events, hour))
    problems += ref.compare(read(conn, "credit_consumption_hourly", hour), ref.credit_hourly(executions, hour))
    return [f"{hour:%Y-%m-%dT%H}Z: {p}" for p in problems]


def check_period(conn, table, start, end, executions):
    got = read(conn, table, start)
    expected = {k: {c: v for c, v in row.items() if c not in ("runtime_count", "runtime_sum")}
                for k, row in ref.period_metrics(executions, start, end).items()}
    return [f"{table} {start:%Y-%m-%d}: {p}" for p in ref.compare(got, expected, percentile_rel=0.01)]


def heavy_rows(n, start, hours, *, workspaces, rng, prefix="r"):
    rows = []
    for i in range(n):
        started = start + dt.timedelta(microseconds=rng.randrange(hours * 3600 * 10**6))
        kind = rng.random()
        duration = min(3600.0, max(0.001, rng.lognormvariate(0.7, 1.6)))
        if kind < 0.01:
            duration = None
        elif kind < 0.015:
            duration = rng.choice([float("nan"), float("inf"), -1.0, float("-inf")])
        rows.append({
            "execution_id": f"{prefix}{i}",
            "workspace_id": rng.choice(workspaces),
            "user_id": rng.choice([f"u{j}" for j in range(40)] + [None]),
            "agent_id": rng.choice([f"a{j}" for j in range(12)] + [None]),
            "status": rng.choice(["completed", "SUCCESS", "failed", "timed_out", "running", "queued", "Error"]),
            "started_at": started,
            "completed_at": None,
            "duration": duration,
            "credits_used": rng.choice([None, Decimal(rng.randrange(0, 10**8)) / 10000,
                                        Decimal("99999999999999.9999")]),
            "metadata": None,
        })
    return rows


def copy_executions(conn, rows):
    cols = ("execution_id", "workspace_id", "user_id", "agent_id", "status", "started_at", "duration", "credits_used")
    with conn.transaction(), conn.cursor().copy(
        f"COPY public.execution_logs ({', '.join(cols)}) FROM STDIN"
    ) as copy:
        for r in rows:
            copy.write_row([r[c] for c in cols])
