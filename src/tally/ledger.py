"""The run ledger (analytics.aggregation_runs): one row per step attempt, the history.

Attempts are begun and concluded through tally/state.py, which writes the ledger row
and the bucket's state together. Failures are written on the ledger's own autocommit
connection (:class:`Ledger`), so a failed step's row survives the rollback of its data
transaction; a success is written inside that transaction, with the step's rows.
"""
from __future__ import annotations

import datetime as dt
from typing import Callable, TypeVar

import psycopg

from . import buckets as B
from .db import Session
from .errors import InvalidInput
from .queries import query
from .steps import STEPS

T = TypeVar("T")


class Ledger:
    """A dedicated autocommit connection for ledger and state writes, reconnected once if lost."""

    def __init__(self, url: str, pooled: bool = False):
        self.url = url
        self.session = Session(url, pooled)

    @property
    def conn(self) -> psycopg.Connection:
        return self.session.conn

    def call(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """``fn(conn, ...)``; one reconnect: a failure must be recorded even after the server dropped us."""
        try:
            return fn(self.conn, *args, **kwargs)
        except psycopg.OperationalError:
            self.session.release()
            return fn(self.conn, *args, **kwargs)

    def close(self) -> None:
        self.session.release()


def marker(conn: psycopg.Connection) -> int:
    """The newest ledger id: attempts after it were made after this moment."""
    return conn.execute(query("ops_ledger_marker")).fetchone()[0]


STATUSES = ("running", "succeeded", "failed", "skipped")  # the ledger's CHECK constraint


def find_runs(conn: psycopg.Connection, *, rollup: str | None = None, step: str | None = None,
              status: str | None = None, trigger: str | None = None, start: dt.datetime | None = None,
              end: dt.datetime | None = None, since: dt.datetime | None = None, failing: bool = False,
              limit: int = 50, offset: int = 0) -> list[dict]:
    """Ledger rows, newest first, filtered and paginated (every filter optional).

    ``rollup``, ``step``, ``status``, ``trigger``: equal to; ``start``/``end``: buckets that
    overlap [start, end); ``since``: attempts started at or after it; ``failing``: what is failing
    now, the latest attempt of each (step, bucket) whose state is failed. A value that names no
    rollup, step, status or trigger is invalid input (one line), checked before any query.
    """
    from .rollups import TRIGGERS  # rollups imports this module

    if rollup is not None:
        B.grain(rollup)
    if step is not None and step not in STEPS:
        raise InvalidInput(f"unknown step {step!r} (expected one of {', '.join(STEPS)})")
    if step is not None and rollup is not None and STEPS[step].rollup != rollup:
        raise InvalidInput(f"step {step!r} is not a step of the {rollup} rollup")
    if status is not None and status not in STATUSES:
        raise InvalidInput(f"unknown status {status!r} (expected one of {', '.join(STATUSES)})")
    if trigger is not None and trigger not in TRIGGERS:
        raise InvalidInput(f"unknown trigger {trigger!r} (expected one of {', '.join(TRIGGERS)})")
    if start is not None and end is not None and start >= end:
        raise InvalidInput(f"invalid range: {start.isoformat()} is not before {end.isoformat()}")
    if not 1 <= limit <= 100_000:
        raise InvalidInput(f"invalid limit {limit}: expected 1 to 100000")
    if offset < 0:
        raise InvalidInput(f"invalid offset {offset}: expected 0 or more")
    cur = conn.execute(query("console_runs"), dict(rollup=rollup, step=step, status=status, trigger=trigger,
                                                   start=start, end=end, since=since, failing=failing, limit=limit,
                                                   offset=offset))
    cols = [c.name for c in cur.description]
    return [dict(zip(cols, r)) for r in cur.fetchall()]
