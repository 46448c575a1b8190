"""What to run, and why: the decisions every command and task takes from the state of a bucket.

The state itself is decided in tally/state.py; here it becomes work. The same rules serve
``tally status`` (the hints), ``catch-up``, ``backfill``, ``retry-failed``, the Celery tasks
and a day, week or month preparing its hours:

* a step needs work when it is ``missing``, ``failed`` or ``dirty`` (:data:`NEEDS_WORK`);
* a step that is ``running`` is left to its run; one that is ``ok`` or ``sealed`` is done;
* ``retry-failed`` runs the ``failed`` steps only;
* a forced backfill runs every step (but a ``sealed`` one only with unseal);
* a period first prepares each of its hours whose inputs are not done (``running`` ones
  included: it must wait for them), running that hour's steps that are not done.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import psycopg

from . import buckets as B
from . import state as S
from .buckets import Bucket
from .errors import InvalidInput
from .queries import query
from .state import BucketState, State
from .steps import PERIOD_INPUTS

NEEDS_WORK = (State.MISSING, State.FAILED, State.DIRTY)


@dataclass(frozen=True)
class Planned:
    """One bucket to run: which steps, and why."""

    bucket: Bucket
    steps: tuple[str, ...]
    reason: str  # dirty | missing | failed | stale | changed | forced | ...
    why: str = ""  # in words, for plans shown before work

    def as_dict(self) -> dict:
        return {"rollup": self.bucket.rollup, "bucket": self.bucket.label, "steps": list(self.steps),
                "reason": self.reason, "why": self.why}


def work(bs: BucketState) -> list[str]:
    """The steps of a bucket that need work (missing, failed or dirty), in order."""
    return bs.where(*NEEDS_WORK)


def retryable(bs: BucketState) -> list[str]:
    """The steps ``retry-failed`` re-runs: those whose latest attempt failed."""
    return bs.where(State.FAILED)


def forced(bs: BucketState, unseal: bool = False) -> list[str]:
    """Every step of a forced backfill (a sealed step only when unsealing)."""
    return [s for s, st in bs.steps.items() if unseal or st.state is not State.SEALED]


def purged_under(conn: psycopg.Connection, start: dt.datetime, end: dt.datetime) -> tuple | None:
    """The first hour in [start, end) whose source or hourly rows retention purged: (source, hour)."""
    return conn.execute(query("purged_in"), dict(start=start, end=end)).fetchone()


def check_sealed(conn: psycopg.Connection, bucket: Bucket, steps: list[str] | tuple[str, ...], unseal: bool) -> None:
    """An explicit run of ``steps`` of ``bucket``: a sealed one needs ``unseal``, and is refused even
    then if retention purged what it is built from (re-aggregating would erase its history)."""
    sealed = S.sealed_steps(conn, bucket) & set(steps)
    if not sealed:
        return
    if not unseal:
        raise InvalidInput(f"{bucket} is sealed (final history: it ended more than TALLY_SEAL_AFTER_DAYS ago); "
                           "add --unseal to re-aggregate it on purpose")
    refuse_purged(conn, bucket.start, bucket.end, str(bucket))


def refuse_purged(conn: psycopg.Connection, start: dt.datetime, end: dt.datetime, what: str) -> None:
    purged = purged_under(conn, start, end)
    if purged is not None:
        source, hour = purged
        rows = "hourly output" if source == "hourly" else f"{source} source"
        raise InvalidInput(f"refusing to unseal {what}: retention purged the {rows} rows of "
                           f"{B.HOUR.label(hour.astimezone(B.UTC))}; aggregating again would erase its history")


def reason(bs: BucketState, steps: list[str]) -> str:
    """One word for why ``steps`` of ``bs`` run: the most pressing of their states."""
    states = {bs[s] for s in steps}
    for st, word in ((State.DIRTY, "dirty"), (State.FAILED, "failed"), (State.MISSING, "missing")):
        if st in states:
            if st is State.DIRTY and any(bs.steps[s].change == "hour" for s in steps):
                return "stale"
            return word
    return "forced"


def why(bs: BucketState, steps: list[str]) -> str:
    """The reasons of ``steps``, in words."""
    return "; ".join(f"{s}: {bs.steps[s].why}" for s in steps)


def planned(bs: BucketState, steps: list[str], word: str | None = None) -> Planned:
    return Planned(bs.bucket, tuple(steps), word or reason(bs, steps), why(bs, steps))


def hours_to_prepare(conn: psycopg.Connection, period: Bucket) -> list[Planned]:
    """The hours of a day, week or month whose inputs are not done, each with the steps to run.

    An hour never aggregated counts only if it holds executions: it has nothing to give.
    """
    hours = S.read(conn, B.HOUR.rollup, [B.HOUR.bucket(h) for h in B.hours_of(period)])
    todo: list[BucketState] = []
    unknown: list[BucketState] = []
    for bs in hours.values():
        inputs = {bs[s] for s in PERIOD_INPUTS}
        if inputs <= set(S.DONE):
            continue
        if inputs == {State.MISSING} and not any(bs.steps[s].change for s in PERIOD_INPUTS):
            unknown.append(bs)
        else:
            todo.append(bs)
    busy = S.hours_with_executions(conn, [bs.bucket.start for bs in unknown])
    todo += [bs for bs in unknown if bs.bucket.start in busy]
    return [planned(bs, bs.where(*NEEDS_WORK, State.RUNNING)) for bs in sorted(todo, key=lambda b: b.bucket)]


def failing(conn: psycopg.Connection, since: dt.datetime | None = None) -> list[Planned]:
    """Every bucket with a failed step (retry-failed), hours first, then by time; with ``since``,
    only those whose failure came at or after it (attempt time)."""
    found: list[Planned] = []
    for rollup in B.ROLLUPS:
        candidates = S.starts_in(conn, rollup, ["failed"], since)
        for bs in S.read(conn, rollup, candidates).values():
            steps = retryable(bs)
            if steps:
                found.append(planned(bs, steps, "failed"))
    return found


@dataclass(frozen=True)
class Window:
    """The hours a catch-up looks at for missing and failed buckets: [start, end), whole hours by ``now``."""

    now: dt.datetime
    start: dt.datetime
    end: dt.datetime

    @classmethod
    def of(cls, now: dt.datetime, days: int) -> "Window":
        end = B.HOUR.floor(now)
        return cls(now, end - dt.timedelta(days=days), end)

    def holds(self, b: Bucket) -> bool:
        """``b`` ended inside the window (hours: lies in it)."""
        return self.start < b.end <= self.now if b.grain.parts is not None else self.start <= b.start < self.end


def catch_up(bs: BucketState, window: Window, *, late: bool = False, touched: bool = False) -> Planned | None:
    """Whether a catch-up runs this bucket, which steps and why (None: it does not).

    * a bucket another run is on is left to it (a change that lands meanwhile stays marked
      for the next catch-up);
    * dirty, at any age: a step is dirty, or failed with an unread change (the change must
      still be read), or — an hour never aggregated — its source changed and a day, week or
      month holding it was aggregated (``late``: the change is late data for that period;
      old data never aggregated is not);
    * missing or failed, if it lies (an hour) or ended (a period) inside the window;
    * ``touched`` (a period holding an hour this catch-up re-aggregated): ``changed``, if it
      has ended or was aggregated before (a period that has not ended and never ran is not due).
    """
    if State.RUNNING in bs.states.values():
        return None
    steps = work(bs)
    if any(st.state is State.DIRTY or (st.change and (st.state is State.FAILED or late))
           for st in bs.steps.values()):
        return planned(bs, steps, "stale" if any(bs.steps[s].change == "hour" for s in steps) else "dirty")
    if steps and window.holds(bs.bucket):
        return planned(bs, steps)
    if touched and (bs.bucket.end <= window.now or not bs.where(State.MISSING)):
        steps = steps or [s for s, st in bs.steps.items() if st.state is not State.SEALED]
        if steps:
            return planned(bs, steps, "changed")
    return None


def catch_up_hours(conn: psycopg.Connection, window: Window) -> list[Planned]:
    """The hours a catch-up runs (:func:`catch_up`), oldest first."""
    candidates = {B.HOUR.bucket(h) for h in S.marked_hours(conn)}
    candidates |= set(B.within(B.HOUR.rollup, window.start, window.end))
    states = S.read(conn, B.HOUR.rollup, candidates, window.now)
    unknown = [bs.bucket.start for bs in states.values()
               if not window.holds(bs.bucket) and set(bs.states.values()) == {State.MISSING}
               and any(st.change for st in bs.steps.values())]
    late = _under_aggregated_periods(conn, unknown, window.now)
    return [p for bs in states.values() if (p := catch_up(bs, window, late=bs.bucket.start in late))]


def _under_aggregated_periods(conn: psycopg.Connection, hours: list[dt.datetime], now: dt.datetime
                              ) -> set[dt.datetime]:
    """Those of ``hours`` that lie in a day, week or month that was aggregated before."""
    found: set[dt.datetime] = set()
    for rollup, grain in B.GRAINS.items():
        if grain.parts is None or not hours:
            continue
        periods = {grain.bucket(h) for h in hours}
        seen = {b for b, bs in S.read(conn, rollup, periods, now).items() if not bs.where(State.MISSING)}
        found |= {h for h in hours if grain.bucket(h) in seen}
    return found


def catch_up_periods(conn: psycopg.Connection, rollup: str, window: Window, hours: list[dt.datetime]
                     ) -> list[Planned]:
    """The days, weeks or months a catch-up runs (:func:`catch_up`), oldest first; ``hours``:
    the hours this catch-up re-aggregated."""
    grain = B.grain(rollup)
    touched = {grain.bucket(h) for h in hours}
    candidates = set(touched)
    candidates |= set(S.starts_in(conn, rollup, ["ok", "failed"]))  # aggregated before: dirty at any age
    b = grain.bucket(window.start)
    while b.end <= window.now:
        if window.holds(b):
            candidates.add(b)
        b = grain.bucket(b.end)
    return [p for bs in S.read(conn, rollup, candidates, window.now).values()
            if (p := catch_up(bs, window, touched=bs.bucket in touched))]
