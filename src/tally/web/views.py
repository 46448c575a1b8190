"""What each page of the console shows, as plain data: the HTML pages render it, ``/api/`` sends it.

Every state comes from tally/state.py (``read``, ``of``, ``starts_in``) and tally/status.py,
decided there once; this module only chooses which buckets to read and counts what it is
told. The ledger, the change log and the output tables are read with the named queries of
sql/console.sql. Nothing here writes, except :func:`tally.state.reap` (which does nothing for
the read-only dashboard role).
"""
from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal

import psycopg

from .. import buckets as B
from .. import ledger as L
from .. import plan as P
from .. import state as S
from .. import status as ST
from ..buckets import Bucket
from ..config import settings
from ..errors import InvalidInput
from ..queries import query
from ..state import BucketState, State, StepState
from ..steps import ROLLUP_STEPS, STEPS

STATES = [s.value for s in State]
# How many of the newest buckets the overview's health strip shows, per rollup.
STRIP = {"hourly": 48, "daily": 30, "weekly": 12, "monthly": 6}
RUNS_PAGE = 50


def now_utc() -> dt.datetime:
    return dt.datetime.now(B.UTC)


def link(b: Bucket) -> str:
    """The console's page of a bucket."""
    return f"/bucket/{b.rollup}/{b.label}"


def cell(b: Bucket, step: str, st: StepState | None, now: dt.datetime) -> dict:
    """One step of one bucket as a grid or strip cell (``st`` None: not read, e.g. outside the range)."""
    return {"rollup": b.rollup, "step": step, "bucket": b.label, "start": b.start, "end": b.end,
            "state": st.state.value if st else None, "why": st.why if st else "",
            "attempt_id": st.facts.attempt_id if st and st.facts else None,
            "future": b.end > now, "href": link(b)}


# ---- the catch-up window and freshness ---------------------------------------------------------

def window(now: dt.datetime) -> P.Window:
    """The catch-up window (TALLY_CATCHUP_DAYS) as of ``now``: what catch-up fills when missing."""
    return P.Window.of(now, settings().catchup_days)


def window_buckets(rollup: str, w: P.Window) -> list[Bucket]:
    """The buckets of ``rollup`` that catch-up looks at for missing and failed ones (Window.holds)."""
    g = B.grain(rollup)
    if g.parts is None:
        return list(B.within(rollup, w.start, w.end))
    found, b = [], g.bucket(w.start)
    while b.start < w.now:
        if w.holds(b):
            found.append(b)
        b = g.bucket(b.end)
    return found


def newest(rollup: str, now: dt.datetime, n: int) -> list[Bucket]:
    """The ``n`` newest buckets of ``rollup`` that have ended by ``now``, oldest first."""
    found = [B.last_complete(rollup, now)]
    g = B.grain(rollup)
    while len(found) < n:
        found.append(g.bucket(found[-1].start - dt.timedelta(microseconds=1)))
    return found[::-1]


def freshest(conn: psycopg.Connection, rollup: str, now: dt.datetime, known: dict[Bucket, BucketState]
             ) -> dict[str, Bucket | None]:
    """For each step of ``rollup``: the newest bucket that has ended and is ok or sealed (the state
    decides: a stored ok may be dirty now). ``known``: states already read (the catch-up window's),
    looked at first; older candidates are read in growing batches, the steps together."""
    steps = list(ROLLUP_STEPS[rollup])
    found: dict[str, Bucket | None] = {}
    for b in sorted(known, reverse=True):
        for step in steps:
            if step not in found and b.end <= now and known[b][step] in S.DONE:
                found[step] = b
    before = min((b.start for b in known), default=B.grain(rollup).advance(B.grain(rollup).floor(now)))
    offset = {step: 0 for step in steps}
    limit = 64
    while len(found) < len(steps):
        batch: dict[str, list[Bucket]] = {}
        for step in steps:
            if step in found:
                continue
            rows = conn.execute(query("console_ok_candidates"), dict(rollup=rollup, step=step, now=now, before=before,
                                                                     limit=limit, offset=offset[step])).fetchall()
            batch[step] = [Bucket(rollup, s.astimezone(B.UTC), e.astimezone(B.UTC)) for s, e in rows]
            offset[step] += len(rows)
        states = S.read(conn, rollup, {b for bs in batch.values() for b in bs})
        for step, candidates in batch.items():
            for b in candidates:  # newest first
                if states[b][step] in S.DONE:
                    found[step] = b
                    break
            else:
                if len(candidates) < limit:
                    found[step] = None
        limit *= 8
    return found


# ---- health: the overview and /metrics ------------------------------------------------------

@dataclass
class StepHealth:
    """One step of one rollup: everything the overview and the metrics say of it."""

    rollup: str
    step: str
    fresh: Bucket | None = None  # the newest bucket that is ok or sealed
    age: float | None = None  # seconds from its end to now
    window: Counter = field(default_factory=Counter)  # state -> buckets inside the catch-up window
    failing: list[tuple[Bucket, str]] = field(default_factory=list)  # latest attempt failed (any age), why
    running: list[Bucket] = field(default_factory=list)  # an attempt holds it now, at any age
    last: dict | None = None  # the newest concluded attempt: status, finished_at, seconds, rows, bucket
    last_ok: dict | None = None  # the newest success
    day: dict = field(default_factory=dict)  # the last 24 h: attempts per status, rows, seconds
    sealed: int = 0
    ignored: int = 0  # source row changes ignored because their bucket is sealed
    strip: list[dict] = field(default_factory=list)  # the newest buckets, as cells

    def as_dict(self) -> dict:
        return {"rollup": self.rollup, "step": self.step,
                "fresh": {"bucket": self.fresh.label, "end": self.fresh.end, "href": link(self.fresh)}
                if self.fresh else None,
                "freshness_seconds": self.age,
                "window": {s: self.window[s] for s in STATES},
                "failing": [{"bucket": b.label, "href": link(b), "why": why} for b, why in self.failing],
                "running": [{"bucket": b.label, "href": link(b)} for b in self.running],
                "last_attempt": self.last, "last_success": self.last_ok, "last_24h": self.day,
                "sealed": self.sealed, "ignored_changes": self.ignored, "strip": self.strip}


@dataclass
class Health:
    now: dt.datetime
    window: P.Window
    steps: list[StepHealth]
    backlog: list[dict]  # per source: marks, unclaimed, oldest

    @property
    def marks(self) -> int:
        return sum(b["marks"] for b in self.backlog)

    @property
    def oldest_mark(self) -> dt.datetime | None:
        return min((b["oldest"] for b in self.backlog), default=None)

    def as_dict(self) -> dict:
        oldest = self.oldest_mark
        return {"now": self.now, "window": {"days": settings().catchup_days, "from": self.window.start,
                                           "to": self.window.end},
                "steps": [s.as_dict() for s in self.steps],
                "dirty_log": {"marks": self.marks, "oldest": oldest,
                              "oldest_age_seconds": (self.now - oldest).total_seconds() if oldest else None,
                              "by_source": self.backlog}}


def _attempt(status, started, finished, seconds, rows, start, rollup) -> dict | None:
    if finished is None:
        return None
    b = B.bucket(rollup, start.astimezone(B.UTC))
    return {"status": status, "finished_at": finished, "seconds": seconds, "rows": rows, "bucket": b.label,
            "href": link(b)}


def health(conn: psycopg.Connection, now: dt.datetime | None = None, *, strips: bool = False) -> Health:
    """The health of every rollup and step as of ``now``: freshness, the catch-up window's states,
    failing and running buckets, the latest attempts, the last 24 h, sealed buckets; the
    dirty-log backlog. ``strips``: also the newest buckets of each step (the overview)."""
    now = now or now_utc()
    S.reap(conn)
    w = window(now)
    steps = {(r, s): StepHealth(r, s) for r in B.ROLLUPS for s in ROLLUP_STEPS[r]}
    for rollup in B.ROLLUPS:
        windowed = S.read(conn, rollup, window_buckets(rollup, w))
        for bs in windowed.values():
            for step, st in bs.steps.items():
                steps[(rollup, step)].window[st.state.value] += 1
        for bs in S.read(conn, rollup, S.starts_in(conn, rollup, ["failed", "running"])).values():
            for step, st in bs.steps.items():
                if st.state is State.FAILED:
                    steps[(rollup, step)].failing.append((bs.bucket, st.why))
                elif st.state is State.RUNNING:
                    steps[(rollup, step)].running.append(bs.bucket)
        known = dict(windowed)
        if strips:
            recent = S.read(conn, rollup, newest(rollup, now, STRIP[rollup]))
            known.update(recent)
            for step in ROLLUP_STEPS[rollup]:
                steps[(rollup, step)].strip = [cell(b, step, bs.steps[step], now) for b, bs in recent.items()]
        for step, fresh in freshest(conn, rollup, now, known).items():
            h = steps[(rollup, step)]
            h.fresh = fresh
            h.age = (now - fresh.end).total_seconds() if fresh else None
    keys = list(steps)
    for (rollup, step, status, started, finished, seconds, rows, start,
         ok_finished, ok_seconds, ok_rows, ok_start) in conn.execute(
            query("console_last_attempts"), dict(rollups=[r for r, _ in keys], steps=[s for _, s in keys])):
        h = steps[(rollup, step)]
        h.last = _attempt(status, started, finished, seconds, rows, start, rollup) if start else None
        h.last_ok = _attempt("succeeded", None, ok_finished, ok_seconds, ok_rows, ok_start, rollup) if ok_start else None
    for h in steps.values():
        h.day = {"attempts": {s: 0 for s in L.STATUSES}, "rows": 0, "seconds": 0.0}
    for rollup, step, status, n, rows, seconds in conn.execute(query("console_recent_attempts"),
                                                               dict(since=now - dt.timedelta(hours=24))):
        if (rollup, step) in steps:
            day = steps[(rollup, step)].day
            day["attempts"][status] = n
            day["rows"] += rows
            day["seconds"] += seconds
    for rollup, step, n, ignored in conn.execute(query("console_sealed")):
        if (rollup, step) in steps:
            steps[(rollup, step)].sealed, steps[(rollup, step)].ignored = n, ignored
    backlog = [{"source": src, "marks": n, "unclaimed": unclaimed, "oldest": oldest}
               for src, n, unclaimed, oldest in conn.execute(query("console_dirty_backlog"))]
    return Health(now, w, list(steps.values()), backlog)


# ---- the grid ---------------------------------------------------------------------------------

ZOOMS = ("hour", "day", "week", "month")
# Each zoom: the grain of a row, the rollups it reads, the default span, and per row which
# rollup's steps show one cell (the row's own bucket) and which show a strip of finer buckets.
ZOOM = {
    "hour": dict(row="hourly", cells="hourly", strip=None, read=list(B.ROLLUPS)),
    "day": dict(row="daily", cells="daily", strip="hourly", read=["hourly", "daily"]),
    "week": dict(row="weekly", cells="weekly", strip="daily", read=["daily", "weekly"]),
    "month": dict(row="monthly", cells="monthly", strip="daily", read=["daily", "monthly"]),
}
MAX_ROWS = 400


def default_range(by: str, now: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    """The range a zoom shows by default: up to the bucket that holds ``now``.

    hour: today (UTC); day: the last 14 days; week: the last 12 ISO weeks; month: the last 12 months.
    """
    if by == "hour":
        start = B.DAY.floor(now)
        return start, B.DAY.advance(start)
    g = B.grain(ZOOM[by]["row"])
    end = g.advance(g.floor(now))
    start = end
    for _ in range({"day": 14, "week": 12, "month": 12}[by]):
        start = g.floor(start - dt.timedelta(microseconds=1))
    return start, end


def shift(by: str, start: dt.datetime, end: dt.datetime, direction: int) -> tuple[dt.datetime, dt.datetime]:
    """The range of the same length just before (-1) or after (+1) [start, end)."""
    if by == "month" and start == B.MONTH.floor(start) and end == B.MONTH.floor(end):
        months = (end.year - start.year) * 12 + end.month - start.month

        def add(t: dt.datetime, n: int) -> dt.datetime:
            m = t.year * 12 + t.month - 1 + n
            return t.replace(year=m // 12, month=m % 12 + 1)
        return add(start, direction * months), add(end, direction * months)
    span = end - start
    return start + direction * span, end + direction * span


def grid(conn: psycopg.Connection, start: dt.datetime, end: dt.datetime, by: str, now: dt.datetime | None = None
         ) -> dict:
    """The states of [start, end) at zoom ``by``: one row per bucket of the zoom's grain, a cell
    for each step of that rollup, a strip of finer cells (hours of a day, days of a week or month)."""
    if by not in ZOOMS:
        raise InvalidInput(f"invalid by {by!r}: expected hour, day, week or month")
    now = now or now_utc()
    z = ZOOM[by]
    rows_of = list(B.touching(z["row"], start, end))
    if len(rows_of) > MAX_ROWS:
        raise InvalidInput(f"{len(rows_of)} rows of {B.KIND[z['row']]}s: too many (at most {MAX_ROWS}); "
                           "choose a coarser zoom or a shorter range")
    g = ST.grid(conn, {r: (start, end) for r in z["read"]}, now)
    mine: dict[Bucket, BucketState] = g.states.get(z["cells"], {})
    fine: dict[Bucket, BucketState] = g.states.get(z["strip"], {}) if z["strip"] else {}
    strip_steps = list(ROLLUP_STEPS[z["strip"]]) if z["strip"] else []
    rows = []
    for b in rows_of:
        bs = mine.get(b)
        row = {"rollup": b.rollup, "bucket": b.label, "start": b.start, "end": b.end, "href": link(b),
               "future": b.start >= now,
               "cells": {s: cell(b, s, bs.steps[s] if bs else None, now) for s in ROLLUP_STEPS[z["cells"]]},
               "strips": {}}
        if z["strip"]:
            parts = list(B.touching(z["strip"], b.start, b.end))
            for s in strip_steps:
                row["strips"][s] = [cell(p, s, fine[p].steps[s] if p in fine else None, now) for p in parts]
        rows.append(row)
    periods = []
    if by == "hour":  # the days, weeks and months wholly inside the range, below the hours
        for rollup in ("daily", "weekly", "monthly"):
            for b, bs in g.states.get(rollup, {}).items():
                periods.append({"rollup": rollup, "bucket": b.label, "href": link(b),
                                "cells": {s: cell(b, s, bs.steps[s], now) for s in ROLLUP_STEPS[rollup]}})
    summary = g.summary()
    return {"from": start, "to": end, "by": by, "row_kind": B.KIND[z["row"]],
            "cell_steps": list(ROLLUP_STEPS[z["cells"]]), "strip_steps": strip_steps,
            "strip_kind": B.KIND[z["strip"]] if z["strip"] else None,
            "rows": rows, "periods": periods, "summary": {s: summary[s] for s in STATES}}


# ---- one bucket ---------------------------------------------------------------------------------

def step_row(step: str, st: StepState) -> dict:
    f = st.facts
    return {"step": step, "state": st.state.value, "why": st.why, "change": st.change, "where": st.where,
            "attempt_id": f.attempt_id if f else None, "attempt": f.attempt if f else None,
            "failures": f.failures if f else 0, "ok_started_at": f.ok_started_at if f else None,
            "ok_finished_at": f.ok_finished_at if f else None, "rows_written": f.rows_written if f else None,
            "error": f.error if f else None, "transient": f.transient if f else None,
            "changed_at": f.changed_at if f else None, "sealed_at": f.sealed_at if f else None,
            "ignored_changes": f.ignored_changes if f else 0}


def bucket(conn: psycopg.Connection, b: Bucket, now: dt.datetime | None = None) -> dict:
    """One bucket: its steps' states, every attempt from the ledger, its change marks, the buckets
    around it (before, after, the periods that hold it, the finer buckets it is built from)."""
    now = now or now_utc()
    S.reap(conn)
    bs = S.of(conn, b)
    steps = list(ROLLUP_STEPS[b.rollup])
    cur = conn.execute(query("console_bucket_attempts"), dict(rollup=b.rollup, steps=steps, start=b.start,
                                                               limit=1000))
    cols = [c.name for c in cur.description]
    attempts = [dict(zip(cols, r)) for r in cur.fetchall()]
    marks = [{"hour": h, "source": src, "marks": n, "unclaimed": unclaimed, "first_marked": first,
              "last_marked": last, "last_claimed": claimed}
             for h, src, n, unclaimed, first, last, claimed in conn.execute(
                 query("console_bucket_marks"), dict(start=b.start, end=b.end))]
    g = b.grain
    before = _neighbour(lambda: g.bucket(b.start - dt.timedelta(microseconds=1)))
    after = _neighbour(lambda: g.bucket(b.end))
    holders = []  # the days, weeks and months that hold this bucket whole
    for r in B.ROLLUPS:
        holder = B.bucket(r, b.start)
        if B.grain(r).parts is not None and r != b.rollup and holder.start <= b.start and holder.end >= b.end:
            holders.append({"rollup": r, "bucket": holder.label, "href": link(holder)})
    parts: dict[str, list[dict]] = {}
    if g.parts is not None:
        finer = "hourly" if b.rollup == "daily" else "daily"
        pieces = list(B.within(finer, b.start, b.end))
        states = S.read(conn, finer, pieces)
        for s in ROLLUP_STEPS[finer]:
            parts[s] = [cell(p, s, states[p].steps[s], now) for p in pieces]
    return {"rollup": b.rollup, "kind": b.kind, "bucket": b.label, "start": b.start, "end": b.end,
            "future": b.end > now, "done": bs.done,
            "steps": [step_row(s, st) for s, st in bs.steps.items()],
            "failed_steps": P.retryable(bs), "needs_work": P.work(bs),
            "attempts": attempts, "marks": marks,
            "before": {"bucket": before.label, "href": link(before)} if before else None,
            "after": {"bucket": after.label, "href": link(after)} if after else None,
            "holders": holders, "parts": parts}


def _neighbour(make) -> Bucket | None:
    """A bucket next to another, if the calendar has one (years 1 to 9999)."""
    try:
        return make()
    except (OverflowError, ValueError, InvalidInput):
        return None


def parse_bucket(rollup: str, label: str) -> Bucket:
    """The bucket a URL names (one-line InvalidInput otherwise)."""
    return B.parse_bucket(rollup, label)


# ---- the ledger ----------------------------------------------------------------------------------

def runs(conn: psycopg.Connection, *, page: int = 1, **filters) -> dict:
    """One page of the ledger, newest first, with the filters that made it."""
    if page < 1:
        raise InvalidInput(f"invalid page {page}: expected 1 or more")
    rows = L.find_runs(conn, limit=RUNS_PAGE + 1, offset=(page - 1) * RUNS_PAGE, **filters)
    for r in rows:
        r["href"] = link(Bucket(r["rollup"], r["bucket_start"].astimezone(B.UTC), r["bucket_end"].astimezone(B.UTC)))
    return {"filters": filters, "page": page, "page_size": RUNS_PAGE, "has_next": len(rows) > RUNS_PAGE,
            "runs": rows[:RUNS_PAGE]}


# ---- the output itself ------------------------------------------------------------------------------

# the grains whose execution metrics per workspace the output page charts (sql/console.sql)
OUTPUT = {"hour": "execution_metrics_hourly", **{B.KIND[s.rollup]: s.table for s in STEPS.values() if s.key}}
MEASURES = {
    "executions": "executions",
    "failure_rate": "failure rate (%)",
    "p50_runtime": "p50 runtime (s)",
    "p95_runtime": "p95 runtime (s)",
    "p99_runtime": "p99 runtime (s)",
    "credits": "credits",
}
MAX_POINTS = 2000


def _number(v) -> float | None:
    if v is None:
        return None
    return float(v) if isinstance(v, Decimal) else v


def output(conn: psycopg.Connection, grain: str, start: dt.datetime, end: dt.datetime, *,
           workspace: str | None = None, top: int = 5) -> dict:
    """Execution metrics of one workspace, or of the ``top`` busiest, per ``grain`` over [start, end):
    executions, failure rate, p50/p95/p99 runtime, credits, one series per workspace, straight from
    the output tables (a day's, week's or month's percentiles are its own rows, never merged)."""
    if grain not in OUTPUT:
        raise InvalidInput(f"invalid grain {grain!r}: expected {', '.join(OUTPUT)}")
    if not 1 <= top <= 20:
        raise InvalidInput(f"invalid top {top}: expected 1 to 20")
    rollup = next(r for r, k in B.KIND.items() if k == grain)
    times = [b.start for b in B.touching(rollup, start, end)]
    if len(times) > MAX_POINTS:
        raise InvalidInput(f"{len(times)} {grain}s: too many points (at most {MAX_POINTS}); choose a coarser grain")
    first = times[0] if times else start
    span = dict(grain=grain, start=first, end=end, start_day=first.date(),
                end_day=B.DAY.advance(B.DAY.floor(end - dt.timedelta(microseconds=1))).date())
    ranked = conn.execute(query("console_output_top"), dict(span, limit=50)).fetchall()
    totals = {ws: {"executions": n, "failed": f, "credits": _number(c)} for ws, n, f, c in ranked}
    chosen = [workspace] if workspace is not None else [ws for ws, *_ in ranked[:top]]
    rows = conn.execute(query("console_output_rows"), dict(span, workspaces=chosen)).fetchall()
    values: dict[str, dict[dt.datetime, dict]] = {ws: {} for ws in chosen}
    for t, ws, total, ok, failed, avg, p50, p95, p99, credits in rows:
        values[ws][t.astimezone(B.UTC)] = {
            "executions": total, "failure_rate": 100.0 * failed / total if total else None,
            "p50_runtime": p50, "p95_runtime": p95, "p99_runtime": p99, "credits": _number(credits)}
    series = {m: [{"workspace": ws, "points": [values[ws].get(t, {}).get(m) for t in times]} for ws in chosen]
              for m in MEASURES}
    return {"grain": grain, "table": f"analytics.{OUTPUT[grain]}", "from": start, "to": end,
            "workspace": workspace, "top": top,
            "workspaces": chosen, "times": times,
            "labels": [B.bucket(rollup, t).label for t in times],
            "measures": MEASURES, "series": series,
            "ranking": [{"workspace": ws, **totals[ws]} for ws, *_ in ranked],
            "totals": {ws: totals.get(ws) for ws in chosen}}
