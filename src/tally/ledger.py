"""The run ledger (analytics.aggregation_runs): one row per step attempt.

Ledger writes go through their own autocommit connection, so a step's row
survives the rollback of the step's data transaction.
"""
from __future__ import annotations

import datetime as dt
import os
import socket
import uuid
from dataclasses import dataclass

import psycopg

from .buckets import Bucket
from .db import connect
from .queries import query

WORKER = f"{socket.gethostname()}:{os.getpid()}"


def reap_abandoned(conn: psycopg.Connection) -> int:
    """Mark 'running' attempts whose process died as failed; return how many.

    A role that may not update the ledger (the read-only dashboard role) only reads it.
    """
    if not conn.execute("SELECT has_table_privilege('analytics.aggregation_runs', 'UPDATE')").fetchone()[0]:
        return 0
    return len(conn.execute(query("ledger_reap_abandoned")).fetchall())


@dataclass
class Attempt:
    id: int
    attempt: int


class Ledger:
    """Writes and reads the ledger on a dedicated autocommit connection."""

    def __init__(self, url: str):
        self.url = url
        self._conn: psycopg.Connection | None = None

    @property
    def conn(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = connect(self.url, autocommit=True)
        return self._conn

    def _execute(self, name: str, params: dict):
        # one reconnect: the ledger must record a failure even after the server dropped us
        try:
            return self.conn.execute(query(name), params)
        except psycopg.OperationalError:
            if self._conn is not None:
                self._conn.close()
            self._conn = None
            return self.conn.execute(query(name), params)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def start(self, run_id: uuid.UUID, bucket: Bucket, step: str, trigger: str,
              backend_pid: int | None, task_id: str | None) -> Attempt:
        row = self._execute("ledger_start", dict(
            run_id=run_id, rollup=bucket.rollup, step=step, start=bucket.start, end=bucket.end,
            trigger=trigger, backend_pid=backend_pid, worker=WORKER, task_id=task_id,
        )).fetchone()
        return Attempt(id=row[0], attempt=row[1])

    def finish(self, attempt: Attempt, status: str, rows: int | None = None, error: str | None = None) -> None:
        self._execute("ledger_finish", dict(id=attempt.id, status=status, rows=rows, error=error))

    def latest(self, bucket: Bucket) -> dict[str, str]:
        """step -> status of its latest attempt for this bucket."""
        rows = self._execute("ledger_latest_for_bucket", dict(rollup=bucket.rollup, start=bucket.start)).fetchall()
        return {r[0]: r[1] for r in rows}

    def reap_abandoned(self) -> int:
        return reap_abandoned(self.conn)

    def claim_dirty(self, bucket: Bucket) -> None:
        self._execute("dirty_claim", dict(start=bucket.start))

    def clear_dirty(self, bucket: Bucket, steps: tuple[str, ...]) -> None:
        self._execute("dirty_clear", dict(start=bucket.start, steps=list(steps), nsteps=len(steps)))

    def hours_to_prepare(self, start: dt.datetime, end: dt.datetime, steps: tuple[str, ...]) -> list[tuple[dt.datetime, bool]]:
        rows = self._execute("hours_to_prepare", dict(start=start, end=end, steps=list(steps))).fetchall()
        return [(r[0], r[1]) for r in rows]
