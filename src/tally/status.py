"""Which buckets are done: the status grid, the ledger listing, the failed steps.

Everything here reads the run ledger (analytics.aggregation_runs) and the change
log (analytics.dirty_log); nothing runs a step. The state of one step of one
bucket is one of

- ``ok``      its latest attempt succeeded and nothing changed since;
- ``failed``  its latest attempt failed (a dead process's attempt counts as failed);
- ``dirty``   it succeeded, but its source changed since: for an hour, the change log
              (analytics.dirty_log) holds a mark of the step's source table that the
              success did not read (unclaimed, or claimed after the success started); for
              a day, week or month, one of its hours' execution inputs is dirty, or was
              aggregated again after the period's latest success started;
- ``missing`` it was never attempted;
- ``running`` its latest attempt is running now.

An attempt that was skipped (another run held the bucket's lock) is ignored: the
attempt before it decides. :func:`bucket_states` is the one place that decides
this; backfill, retry and catch-up ask it.
"""
from __future__ import annotations

import bisect
import datetime as dt
from collections import Counter
from dataclasses import dataclass

import psycopg
from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import buckets as B
from .buckets import Bucket
from .ledger import reap_abandoned  # noqa: F401  (status, runs and backfill reap first)
from .queries import query
from .steps import PERIOD_INPUTS, ROLLUP_STEPS, STEPS

OK, FAILED, DIRTY, MISSING, RUNNING = "ok", "failed", "dirty", "missing", "running"
STATES = (OK, FAILED, DIRTY, MISSING, RUNNING)
COLORS = {OK: "green", FAILED: "bold red", DIRTY: "yellow", MISSING: "bright_black", RUNNING: "cyan"}
GLYPHS = {OK: "■", FAILED: "✗", DIRTY: "~", MISSING: "·", RUNNING: "▸"}
MEANING = {
    OK: "up to date",
    FAILED: "latest attempt failed",
    DIRTY: "source changed since",
    MISSING: "never run",
    RUNNING: "in progress",
}
FOLD_HOURS = 48  # longer ranges show one row per day, one mark per hour


def bucket_states(conn: psycopg.Connection, rollup: str, start: dt.datetime,
                  end: dt.datetime) -> dict[Bucket, dict[str, str]]:
    """step -> state for every bucket of ``rollup`` lying wholly inside [start, end), in order."""
    buckets = list(B.within(rollup, start, end))
    if not buckets:
        return {}
    lo, hi = buckets[0].start, buckets[-1].end
    latest = {(r[0], r[1]): (r[2], r[3])
              for r in conn.execute(query("ops_latest"), dict(rollup=rollup, start=lo, end=hi))}
    marks = {(r[0], r[1]): (r[2], r[3]) for r in conn.execute(query("ops_dirty_hours"), dict(start=lo, end=hi))}

    def changed_after(hour: dt.datetime, source: str, read_at: dt.datetime | None) -> bool:
        """The source rows of ``hour`` changed after a step that started at ``read_at`` read them."""
        mark = marks.get((hour, source))
        return mark is not None and (read_at is None or mark[0] or mark[1] > read_at)

    if rollup == "hourly":
        def stale(bucket: Bucket, step: str, succeeded_at: dt.datetime) -> bool:
            return changed_after(bucket.start, STEPS[step].source, succeeded_at)
    else:
        # a period is stale when one of its hours' inputs was aggregated again after the period
        # started its latest success, or changed in the source since it was last aggregated
        inputs = {(r[0], r[1]): (r[2], r[3]) for r in conn.execute(
            query("ops_inputs_refreshed"), dict(start=lo, end=hi, steps=list(PERIOD_INPUTS)))}
        hours = sorted({h for h, _ in inputs} | {h for h, source in marks if source == "execution_logs"})

        def stale(bucket: Bucket, step: str, succeeded_at: dt.datetime) -> bool:
            for hour in hours[bisect.bisect_left(hours, bucket.start):bisect.bisect_left(hours, bucket.end)]:
                for name in PERIOD_INPUTS:
                    started, finished = inputs.get((hour, name), (None, None))
                    if (finished is not None and finished > succeeded_at) or \
                            changed_after(hour, STEPS[name].source, started):
                        return True
            return False

    states: dict[Bucket, dict[str, str]] = {}
    for bucket in buckets:
        cells = {}
        for step in ROLLUP_STEPS[rollup]:
            status, started_at = latest.get((step, bucket.start), (None, None))
            if status is None:
                cells[step] = MISSING
            elif status == "running":
                cells[step] = RUNNING
            elif status == "failed":
                cells[step] = FAILED
            else:
                cells[step] = DIRTY if stale(bucket, step, started_at) else OK
        states[bucket] = cells
    return states


@dataclass
class Grid:
    """The states of every rollup's buckets over one range."""

    start: dt.datetime
    end: dt.datetime
    states: dict[str, dict[Bucket, dict[str, str]]]  # rollup -> bucket -> step -> state

    def summary(self) -> Counter:
        return Counter(s for rows in self.states.values() for cells in rows.values() for s in cells.values())

    def as_dict(self) -> dict:
        return {
            "from": self.start.isoformat(),
            "to": self.end.isoformat(),
            "buckets": [
                {"rollup": b.rollup, "bucket": b.label, "start": b.start.isoformat(), "end": b.end.isoformat(),
                 "steps": cells}
                for rows in self.states.values() for b, cells in rows.items()
            ],
            "summary": {s: self.summary()[s] for s in STATES},
        }


def grid(conn: psycopg.Connection, start: dt.datetime, end: dt.datetime, rollups: list[str]) -> Grid:
    """Reap dead runs, then the state of every step of every whole bucket in [start, end)."""
    reap_abandoned(conn)
    return Grid(start, end, {r: bucket_states(conn, r, start, end) for r in rollups})


# ---- the grid on a terminal -------------------------------------------------------------

def _word(state: str) -> Text:
    return Text(state, style=COLORS[state])


def _legend() -> Text:
    text = Text()
    for i, s in enumerate(STATES):
        text.append(f"{GLYPHS[s]} {s}", style=COLORS[s])
        text.append(f" = {MEANING[s]}" + ("  ·  " if i < len(STATES) - 1 else ""))
    return text


def _summary_line(g: Grid) -> Text:
    counts = g.summary()
    sizes = ", ".join(f"{len(rows)} {B.KIND[r]}{'s' if len(rows) != 1 else ''}"
                      for r, rows in g.states.items() if rows) or "no whole bucket"
    text = Text(f"{g.start:%Y-%m-%dT%H:00Z} .. {g.end:%Y-%m-%dT%H:00Z}: {sizes}; steps: ")
    for i, s in enumerate(STATES):
        text.append(f"{counts[s]} {s}", style=COLORS[s] if counts[s] else None)
        text.append(", " if i < len(STATES) - 1 else "")
    hints = []
    if counts[FAILED]:
        hints.append("tally retry-failed")
    if counts[DIRTY] or counts[MISSING]:
        hints.append("tally catch-up (or tally backfill)")
    if hints:
        text.append(f"  → {' · '.join(hints)}")
    return text


def _hour_strip(day: dt.datetime, step: str, hours: dict[Bucket, dict[str, str]]) -> Text:
    text = Text()
    for i in range(24):
        if i and i % 6 == 0:
            text.append(" ")
        cells = hours.get(B.bucket("hourly", day + dt.timedelta(hours=i)))
        if cells is None:
            text.append(" ")
        else:
            text.append(GLYPHS[cells[step]], style=COLORS[cells[step]])
    return text


def render(console: Console, g: Grid, by: str = "auto") -> None:
    """Print the grid: tables of buckets × steps, a legend and a one-line summary."""
    hours = g.states.get("hourly", {})
    fold = by == "day" or (by == "auto" and len(hours) > FOLD_HOURS)
    periods = [r for r in g.states if r != "hourly"]
    if hours and fold:
        days = list(B.touching("daily", g.start, g.end))
        daily = g.states.get("daily", {})
        table = Table(title="hours by day (one mark per hour, 00-23 UTC)", title_justify="left")
        table.add_column("day")
        for step in ROLLUP_STEPS["hourly"]:
            table.add_column(step, no_wrap=True)
        if "daily" in g.states:
            table.add_column("daily_metrics")
        for day in days:
            row = [day.label, *(_hour_strip(day.start, s, hours) for s in ROLLUP_STEPS["hourly"])]
            if "daily" in g.states:
                cells = daily.get(day)
                row.append(_word(cells["daily_metrics"]) if cells else Text("(partial day)", style="bright_black"))
            table.add_row(*row)
        console.print(table)
        periods = [r for r in periods if r != "daily"]
    elif hours:
        table = Table(title="hourly", title_justify="left")
        table.add_column("hour")
        for step in ROLLUP_STEPS["hourly"]:
            table.add_column(step)
        for b, cells in hours.items():
            table.add_row(b.label, *(_word(cells[s]) for s in ROLLUP_STEPS["hourly"]))
        console.print(table)
    for rollup in periods:
        rows = g.states[rollup]
        if not rows:
            continue
        table = Table(title=rollup, title_justify="left")
        table.add_column(B.KIND[rollup])
        for step in ROLLUP_STEPS[rollup]:
            table.add_column(step)
        for b, cells in rows.items():
            table.add_row(b.label, *(_word(cells[s]) for s in ROLLUP_STEPS[rollup]))
        console.print(table)
    console.print(_legend())
    console.print(_summary_line(g))


# ---- the ledger ----------------------------------------------------------------------------

def recent_runs(conn: psycopg.Connection, *, failed: bool = False, limit: int = 50) -> list[dict]:
    """Ledger rows, newest first (only failed attempts with ``failed``)."""
    cur = conn.execute(query("ops_runs"), dict(failed=failed, limit=limit))
    cols = [c.name for c in cur.description]
    return [dict(zip(cols, r)) for r in cur.fetchall()]


def render_runs(console: Console, rows: list[dict]) -> None:
    table = Table(title=f"ledger, newest first ({len(rows)} rows)", title_justify="left")
    for col in ("id", "started", "rollup", "step", "bucket", "status", "seconds", "rows", "attempt", "trigger"):
        table.add_column(col, justify="right" if col in ("id", "seconds", "rows", "attempt") else "left", no_wrap=True)
    table.add_column("error", no_wrap=True, overflow="ellipsis", max_width=64)
    colors = {"succeeded": "green", "failed": "bold red", "skipped": "yellow", "running": "cyan"}
    for r in rows:
        table.add_row(
            str(r["id"]), f"{r['started_at'].astimezone(B.UTC):%Y-%m-%d %H:%M:%SZ}", r["rollup"], r["step"], r["bucket"],
            Text(r["status"], style=colors.get(r["status"])),
            "" if r["seconds"] is None else f"{r['seconds']:.3f}",
            "" if r["rows_written"] is None else f"{r['rows_written']:,}",
            str(r["attempt"]), r["trigger"], first_line(r["error"]),
        )
    console.print(table)


def first_line(error: str | None, width: int = 100) -> str:
    if not error:
        return ""
    line = error.strip().splitlines()[0] if error.strip() else ""
    return line if len(line) <= width else line[: width - 1] + "…"


# ---- what retry-failed re-runs -----------------------------------------------------------------

def failed_steps(conn: psycopg.Connection, since: dt.datetime | None = None) -> dict[Bucket, list[str]]:
    """Every bucket with steps whose latest attempt failed, hourly first, then by time."""
    found: dict[Bucket, list[str]] = {}
    for rollup, step, start, end, _, _ in conn.execute(query("ops_failed_steps"), dict(since=since)):
        found.setdefault(Bucket(rollup, start.astimezone(B.UTC), end.astimezone(B.UTC)), []).append(step)
    return {b: [s for s in ROLLUP_STEPS[b.rollup] if s in steps] for b, steps in found.items()}
