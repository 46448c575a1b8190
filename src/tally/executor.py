"""The step executor: one step of one bucket, inside a transaction the caller opened.

It takes the (step, bucket) lock, sets the step's statement timeout and planner
settings, and runs the step's SQL. It records nothing: the Runner begins and
concludes attempts (tally/state.py) around it.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import psycopg
from psycopg import errors as pgerrors
from psycopg import sql

from .buckets import Bucket
from .config import settings
from .db import scrub
from .steps import LN_GAMMA, LN_HALF_WIDTH, Step, lock_key

log = logging.getLogger("tally")


class BucketBusy(Exception):
    """Another run holds the (step, bucket) lock and did not let go within the lock wait."""

    def __init__(self, waited: float):
        self.waited = waited


@dataclass(frozen=True)
class Counts:
    rows: int  # output rows the bucket has now
    changed: int  # inserted or updated (an unchanged row is left alone)
    removed: int  # deleted: their source rows are gone


# Planner settings per step, SET LOCAL in the step's own transaction (docs/PERFORMANCE.md).
# Every step: no JIT (compiling costs more than these statements run) and hash tables that fit
# in memory. user_activity: a bitmap scan of the hour; events are stored session by session,
# so an index scan in time order visits one heap page per event (30x the pages at 4 M a day),
# and the planner, seeing a time-ordered table, prefers it. A value None restores the session's
# own (atomic mode runs several steps in one transaction).
STEP_SETTINGS: dict[str, dict[str, str | None]] = {
    "*": {"jit": "off", "work_mem": "64MB", "enable_indexscan": None, "enable_seqscan": None,
          # the hourly reads (CREATE TEMP TABLE ... AS) may run in parallel: cheaper Gather rows let
          # the planner take a parallel scan for a busy hour; min_parallel_index_scan_size (512 kB of
          # index) still keeps a quiet hour serial
          "parallel_setup_cost": "100", "parallel_tuple_cost": "0.001"},
    "user_activity": {"work_mem": "256MB", "enable_indexscan": "off", "enable_seqscan": "off"},
}


def step_settings(step: Step) -> dict[str, str | None]:
    """The planner settings ``step`` runs with (see STEP_SETTINGS)."""
    return {**STEP_SETTINGS["*"], **STEP_SETTINGS.get(step.name, {})}


def apply_step_settings(conn: psycopg.Connection, step: Step) -> None:
    """SET LOCAL ``step``'s planner settings in the open transaction (None: the session's own)."""
    tuning = step_settings(step)
    conn.execute("SELECT set_config(s.name, coalesce(s.value, p.reset_val), true) "
                 "FROM unnest(%s::text[], %s::text[]) AS s(name, value) JOIN pg_settings p USING (name)",
                 [list(tuning), list(tuning.values())])


def describe_error(exc: BaseException, url: str | None = None) -> str:
    """A failure as the ledger keeps it: its type and text, never a password."""
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, pgerrors.QueryCanceled):
        text = f"statement timeout: {text}"
    return scrub(f"{type(exc).__name__}: {text}", url)[:2000]


def lock(conn: psycopg.Connection, step: Step, bucket: Bucket, lock_wait: float) -> float:
    """Take the (step, bucket) lock for the open transaction; raise BucketBusy after ``lock_wait`` s."""
    key = lock_key(step, int(bucket.start.timestamp()) // 3600)
    started = time.monotonic()
    if lock_wait <= 0:
        if not conn.execute("SELECT pg_try_advisory_xact_lock(%s, %s)", key).fetchone()[0]:
            raise BucketBusy(0.0)
    else:
        conn.execute("SELECT set_config('lock_timeout', %s, true)", [f"{int(lock_wait * 1000)}ms"])
        try:
            conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", key)
        except pgerrors.LockNotAvailable:
            raise BucketBusy(time.monotonic() - started) from None
        conn.execute("SELECT set_config('lock_timeout', '0', true)")
    waited = time.monotonic() - started
    if waited > 1:
        log.info("%s %s: waited %.1fs for another run of this bucket", step.name, bucket, waited)
    return waited


def run_step(conn: psycopg.Connection, step: Step, bucket: Bucket) -> Counts:
    """Run ``step`` for ``bucket`` in the open transaction (its lock held); return what it wrote."""
    timeout = settings().statement_timeout_of(step.name)
    if timeout > 0:
        conn.execute("SELECT set_config('statement_timeout', %s, true)", [f"{int(timeout * 1000)}ms"])
    apply_step_settings(conn, step)
    params = dict(start=bucket.start, end=bucket.end, bucket=bucket.start.date(),
                  ln_gamma=LN_GAMMA, ln_half_width=LN_HALF_WIDTH)
    first_run = False
    if step.reads_separately:
        # under the bucket's lock: no other run can add this hour's rows before we commit
        first_run = not conn.execute(
            sql.SQL("SELECT EXISTS (SELECT 1 FROM {} WHERE hour = %s)").format(
                sql.Identifier("analytics", step.table)), [bucket.start]).fetchone()[0]
        # a utility statement takes no bound parameters: the bucket's times and the sketch's
        # constant are quoted client-side (they come from Bucket and steps.py, never from text)
        with psycopg.ClientCursor(conn) as cur:
            cur.execute(step.materialize_statement(), params)
    rows, changed, removed = conn.execute(step.statement(first_run), params).fetchone()
    return Counts(rows, changed, removed)
