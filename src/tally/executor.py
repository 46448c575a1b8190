"""The step executor: one step of one bucket, inside a transaction the caller opened.

It takes the (step, bucket) lock, sets the step's statement timeout and planner
settings, and runs the step's SQL. It records nothing: the Runner begins and
concludes attempts (tally/state.py) around it.
"""
from __future__ import annotations

import datetime as dt
import logging
import time
import weakref
from dataclasses import dataclass

import psycopg
from psycopg import errors as pgerrors
from psycopg import sql

from .buckets import UTC, Bucket
from .config import settings
from .db import scrub
from .steps import LN_GAMMA, LN_HALF_WIDTH, SOURCES, Step, lock_key

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
    "*": {"jit": "off", "work_mem": "64MB", "enable_indexscan": None, "enable_seqscan": None, "enable_sort": None,
          # the hourly reads (CREATE TEMP TABLE ... AS) may run in parallel: cheaper Gather rows let
          # the planner take a parallel scan for a busy hour; min_parallel_index_scan_size (512 kB of
          # index) still keeps a quiet hour serial
          "parallel_setup_cost": "100", "parallel_tuple_cost": "0.001"},
    "user_activity": {"work_mem": "256MB", "enable_indexscan": "off", "enable_seqscan": "off"},
    # execution_metrics: hash the (workspace, hour) groups rather than sort the rows into them
    # (the planner's choice for a chunk of hours, 1.5x slower); a bitmap scan of the range
    "execution_metrics": {"enable_sort": "off", "enable_indexscan": "off"},
}


def step_settings(step: Step) -> dict[str, str | None]:
    """The planner settings ``step`` runs with (see STEP_SETTINGS)."""
    return {**STEP_SETTINGS["*"], **STEP_SETTINGS.get(step.name, {})}


def apply_step_settings(conn: psycopg.Connection, step: Step, timeout: float | None = None) -> None:
    """SET LOCAL ``step``'s planner settings (and a statement timeout of ``timeout`` s) in the
    open transaction, in one round trip; a None is the session's own value, read once per connection."""
    tuning = step_settings(step)
    own = _session_values.get(conn)
    if own is None:
        names = sorted({n for part in STEP_SETTINGS.values() for n in part})
        own = _session_values[conn] = dict(conn.execute(
            "SELECT name, reset_val FROM pg_settings WHERE name = ANY(%s)", [names]).fetchall())
    values = {name: own[name] if value is None else value for name, value in tuning.items()}
    if timeout is not None:
        values["statement_timeout"] = f"{int(timeout * 1000)}ms"
    conn.execute("SELECT set_config(name, value, true) FROM unnest(%s::text[], %s::text[]) AS s(name, value)",
                 [list(values), list(values.values())])


_session_values: "weakref.WeakKeyDictionary[psycopg.Connection, dict[str, str]]" = weakref.WeakKeyDictionary()


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
    if conn.execute("SELECT pg_try_advisory_xact_lock(%s, %s)", key).fetchone()[0]:
        return 0.0  # free: the usual case, one round trip
    if lock_wait <= 0:
        raise BucketBusy(0.0)
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


NOTHING = Counts(0, 0, 0)


def try_lock(conn: psycopg.Connection, step: Step, bucket: Bucket) -> bool:
    """Take the (step, bucket) lock for the open transaction if it is free."""
    return conn.execute("SELECT pg_try_advisory_xact_lock(%s, %s)",
                        lock_key(step, int(bucket.start.timestamp()) // 3600)).fetchone()[0]


def estimate_rows(conn: psycopg.Connection, start: dt.datetime, end: dt.datetime) -> dict[str, int]:
    """The planner's estimate of each source's rows in [start, end) (by name, as in SOURCES):
    what a range statement over it will read, known without reading it."""
    rows = {}
    for name, (schema, table, column) in SOURCES.items():
        plan = conn.execute(sql.SQL("EXPLAIN (FORMAT JSON) SELECT 1 FROM {} WHERE {} >= %s AND {} < %s").format(
            sql.Identifier(schema, table), sql.Identifier(column), sql.Identifier(column)),
            [start, end]).fetchone()[0]
        rows[name] = int(plan[0]["Plan"]["Plan Rows"])
    return rows


def run_step(conn: psycopg.Connection, step: Step, bucket: Bucket) -> Counts:
    """Run ``step`` for ``bucket`` in the open transaction (its lock held); return what it wrote."""
    return run_range(conn, step, bucket.start, bucket.end).get(bucket.start, NOTHING)


def run_range(conn: psycopg.Connection, step: Step, start: dt.datetime, end: dt.datetime
              ) -> dict[dt.datetime, Counts]:
    """Run ``step`` for the buckets of [start, end) in the open transaction (their locks held):
    one bucket, or a chunk of consecutive hours in one set-based statement, with the same
    rows as hour by hour. Returns what it wrote, per bucket start (absent: nothing)."""
    params = dict(start=start, end=end, bucket=start.date(), ln_gamma=LN_GAMMA, ln_half_width=LN_HALF_WIDTH)
    if step.reads_separately:
        # under the hours' locks: no other run can add their output rows before we commit
        schema, table, column = SOURCES[step.source]
        first_run, has_rows = conn.execute(
            sql.SQL("SELECT NOT EXISTS (SELECT 1 FROM {} WHERE hour >= %(start)s AND hour < %(end)s), "
                    "EXISTS (SELECT 1 FROM {} WHERE {} >= %(start)s AND {} < %(end)s)").format(
                sql.Identifier("analytics", step.table), sql.Identifier(schema, table), sql.Identifier(column),
                sql.Identifier(column)), params).fetchone()
        if first_run and not has_rows:
            return {}  # nothing to read and nothing to remove: an empty hour writes nothing
    timeout = settings().statement_timeout_of(step.name)
    apply_step_settings(conn, step, timeout if timeout > 0 else None)
    if not step.reads_separately:  # a day, week or month: one bucket
        rows, changed, removed = conn.execute(step.statement(), params).fetchone()
        return {start: Counts(rows, changed, removed)}
    # a utility statement takes no bound parameters: the buckets' times and the sketch's
    # constant are quoted client-side (they come from Bucket and steps.py, never from text)
    with psycopg.ClientCursor(conn) as cur:
        cur.execute(step.materialize_statement(), params)
    return {hour.astimezone(UTC): Counts(rows, changed, removed)
            for hour, rows, changed, removed in conn.execute(step.statement(first_run), params)}
