"""The run ledger (analytics.aggregation_runs): one row per step attempt, the history.

Attempts are begun and concluded through tally/state.py, which writes the ledger row
and the bucket's state together. Failures are written on the ledger's own autocommit
connection (:class:`Ledger`), so a failed step's row survives the rollback of its data
transaction; a success is written inside that transaction, with the step's rows.
"""
from __future__ import annotations

from typing import Callable, TypeVar

import psycopg

from .db import connect
from .queries import query

T = TypeVar("T")


class Ledger:
    """A dedicated autocommit connection for ledger and state writes, reconnected once if lost."""

    def __init__(self, url: str):
        self.url = url
        self._conn: psycopg.Connection | None = None

    @property
    def conn(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = connect(self.url, autocommit=True)
            self._conn.execute("SET TIME ZONE 'UTC'")
        return self._conn

    def call(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """``fn(conn, ...)``; one reconnect: a failure must be recorded even after the server dropped us."""
        try:
            return fn(self.conn, *args, **kwargs)
        except psycopg.OperationalError:
            if self._conn is not None:
                self._conn.close()
            self._conn = None
            return fn(self.conn, *args, **kwargs)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def runs(conn: psycopg.Connection, *, failed: bool = False, limit: int = 50) -> list[dict]:
    """Ledger rows, newest first (only failed attempts with ``failed``)."""
    cur = conn.execute(query("ops_runs"), dict(failed=failed, limit=limit))
    cols = [c.name for c in cur.description]
    return [dict(zip(cols, r)) for r in cur.fetchall()]


def marker(conn: psycopg.Connection) -> int:
    """The newest ledger id: attempts after it were made after this moment."""
    return conn.execute(query("ops_ledger_marker")).fetchone()[0]
