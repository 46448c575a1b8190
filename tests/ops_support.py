"""Helpers for the operations tests: the CLI in-process and as a subprocess, small seeded data."""
from __future__ import annotations

import contextlib
import datetime as dt
import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psycopg

from tally import seed as seeding

UTC = dt.timezone.utc
TALLY = str(Path(sys.executable).with_name("tally"))


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
              "execution_metrics_daily", "execution_metrics_weekly", "execution_metrics_monthly", "dirty_log"]
    return {t: conn.execute(f"SELECT count(*) FROM analytics.{t}").fetchone()[0] for t in tables}
