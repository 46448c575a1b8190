"""The console's actions: Celery tasks sent to the workers, never SQL from the console.

=========  =====================================================  ==============================
action     task                                                   what it runs
=========  =====================================================  ==============================
retry      ``tally.retry_bucket(rollup, bucket)``                 the bucket's failed steps
re-run     ``tally.backfill_bucket(rollup, bucket, force=True)``  every step of the bucket
backfill   ``tally.backfill_bucket(rollup, bucket, force)``       per bucket of a range that needs
                                                                  work (all with force), hours
                                                                  first, like ``backfill --queue``
verify     ``tally.verify_bucket(rollup, bucket)``                ``tally verify`` of the bucket
=========  =====================================================  ==============================

An action is offered when the console has credentials (TALLY_WEB_AUTH) and a broker answers
(asked with a one-second timeout, the answer kept a few seconds); otherwise it is shown
disabled with the reason. What an action did is read back from the state (attempts after the
ledger row that was newest when it was sent), and a verify's result from Celery's backend.
"""
from __future__ import annotations

import re
import threading
import time

import psycopg

from .. import buckets as B
from .. import ledger as L
from .. import plan as P
from .. import state as S
from .. import tasks
from ..buckets import Bucket
from ..db import redact, scrub

BROKER_TTL = 5.0  # seconds an answer of the broker is trusted
_TASK_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
# send once, quickly: the broker answered a moment ago; if it is gone now, say so at once
_SEND = dict(retry=True, retry_policy=dict(max_retries=1, interval_start=0, interval_step=0.2, interval_max=0.2))


class Broker:
    """Whether the broker answers: asked with a short timeout, remembered for BROKER_TTL seconds."""

    def __init__(self):
        self._lock = threading.Lock()
        self._asked = -BROKER_TTL
        self._reason: str | None = None

    def reason(self) -> str | None:
        """None when the broker answers, else why actions cannot be sent."""
        with self._lock:
            if time.monotonic() - self._asked < BROKER_TTL:
                return self._reason
            url = tasks.app.conf.broker_url
            try:
                with tasks.app.connection_for_write() as conn:
                    conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=1)
                self._reason = None
            except Exception as exc:  # kombu raises OperationalError or the transport's own errors
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                self._reason = f"no broker answers at {redact(url)}: {scrub(first, url)}"
            self._asked = time.monotonic()
            return self._reason


class Actions:
    """Whether actions are offered, and sending them."""

    def __init__(self, authorized: bool):
        self.authorized = authorized
        self.broker = Broker()

    def disabled(self) -> str | None:
        """Why actions are disabled (None: they are enabled)."""
        if not self.authorized:
            return "actions need credentials: set TALLY_WEB_AUTH=user:password and restart tally serve"
        return self.broker.reason()

    def _send(self, name: str, args: list, kwargs: dict | None = None) -> str:
        return tasks.app.send_task(name, args=args, kwargs=kwargs or {}, **_SEND).id

    def retry(self, conn: psycopg.Connection, b: Bucket) -> dict:
        marker = L.marker(conn)
        return {"task": self._send("tally.retry_bucket", [b.rollup, b.label]), "since": marker}

    def rerun(self, conn: psycopg.Connection, b: Bucket) -> dict:
        marker = L.marker(conn)
        return {"task": self._send("tally.backfill_bucket", [b.rollup, b.label], {"force": True}), "since": marker}

    def verify(self, b: Bucket) -> dict:
        return {"task": self._send("tally.verify_bucket", [b.rollup, b.label])}

    def backfill(self, conn: psycopg.Connection, start, end, rollups: list[str], force: bool) -> dict:
        """One ``tally.backfill_bucket`` per bucket of [start, end) that needs work (every bucket with
        ``force``): hours first, then days, weeks and months in the order they end (a period
        prepares any of its hours not done yet itself, should a worker reach it first)."""
        marker = L.marker(conn)
        wanted = []
        for r in rollups:  # the same choice as `tally backfill` (backfill.pending_steps), read in one query
            for b, bs in S.read(conn, r, B.within(r, start, end)).items():
                if P.forced(bs) if force else P.work(bs):
                    wanted.append(b)
        rank = {r: i for i, r in enumerate(B.ROLLUPS)}
        wanted.sort(key=lambda b: (b.grain.parts is not None, b.end, rank[b.rollup]))
        sent = [self._send("tally.backfill_bucket", [b.rollup, b.label], {"force": force}) for b in wanted]
        return {"tasks": len(sent), "buckets": [str(b) for b in wanted[:50]], "since": marker,
                "first_task": sent[0] if sent else None}


def task_state(task_id: str | None) -> dict | None:
    """A task's state and result from Celery's result backend (None: no such id given)."""
    if not task_id:
        return None
    if not _TASK_ID.match(task_id):
        return {"id": task_id, "state": "UNKNOWN", "ready": True, "error": "not a task id"}
    result = tasks.app.AsyncResult(task_id)
    try:
        state = result.state
        value = result.result if state in ("SUCCESS", "FAILURE", "RETRY") else None
    except Exception as exc:  # no result backend, or it is unreachable
        return {"id": task_id, "state": "UNKNOWN", "ready": False,
                "error": scrub(f"{type(exc).__name__}: {exc}", tasks.app.conf.broker_url)}
    out = {"id": task_id, "state": state, "ready": state in ("SUCCESS", "FAILURE", "REVOKED")}
    if state == "SUCCESS":
        out["result"] = value
    elif value is not None:
        out["error"] = scrub(f"{type(value).__name__}: {value}", tasks.app.conf.broker_url)
    return out
