"""The state of a bucket: stored once (analytics.bucket_state), decided here, once.

Every (rollup, step, bucket) is in one state (SPEC, "State of a bucket"):

``missing``  never attempted: no row;
``running``  an attempt holds the bucket's lock now;
``ok``       its latest attempt succeeded, and nothing it read has changed since;
``failed``   its latest attempt failed (a dead process's attempt counts as failed);
``dirty``    it succeeded, but changed since: for an hour, a change mark of the step's
             source table that the success did not read; for a day, week or month, one of
             its hours' inputs changed in the source, or was aggregated again after the
             period's latest success began;
``sealed``   final history (the data lifecycle): it ended more than ``TALLY_SEAL_AFTER_DAYS``
             ago and is ok; nothing re-aggregates it on its own, and a change to its source
             rows after that is ignored (counted, never making it dirty).

``running``, ``ok``, ``failed`` and ``sealed`` are stored; ``dirty`` and ``missing`` are
derived when the state is read, by :func:`hour_step_state` and :func:`period_step_state`,
from the stored row and the change marks of analytics.dirty_log — and so is ``sealed`` for
a bucket that could be sealed and was not stored so yet (:func:`seal` stores it, so that a
later change of the setting never unseals history).

What moves a bucket between states (each stored transition writes the ledger row that
causes it in the same statement, or in the same transaction):

======================  ============================  =====================================
event                   move                          where
======================  ============================  =====================================
an attempt begins       any -> running                :func:`begin` (under the bucket lock)
it succeeds             running -> ok                 :func:`succeed` (in the step's own
                                                      transaction, with its rows)
it fails                running -> failed             :func:`fail`
it is skipped           no move                       :func:`skip` (another run held the
                                                      lock: it says nothing of the bucket)
it cannot start         any but running -> failed     :func:`fail_unstarted` (an atomic
                                                      rollup's later steps; a period whose
                                                      hours failed)
its process dies        running -> failed             :func:`reap`
a source row changes    ok -> dirty                   derived: a mark not read (:func:`unread`)
the mark is read        dirty -> ok                   :func:`clear_marks` deletes it
an hour is aggregated   period ok -> dirty            derived: the hour's success ended after
again                                                 the period's began
time                    ok -> sealed                  derived: no change it did not read came
                                                      before it ended + TALLY_SEAL_AFTER_DAYS;
                                                      :func:`seal` stores it
a chunk of hours of     any -> ok                     :func:`done` (range execution: begun
one step succeeds                                     and concluded in the chunk's own
                                                      transaction, with its rows)
a change to a sealed    no move                       counted (:func:`sweep_ignored`)
bucket's rows
``--unseal``            sealed -> running             :func:`begin` (an attempt on purpose)
======================  ============================  =====================================

A change is *read* by a success that began after the change's mark was claimed
(:func:`claim_marks`, before the steps read): the claim saw the mark, so the change was
committed, so the step's later snapshot holds it. One rule, :func:`_read_by`, decides this
for the state and for clearing marks.
"""
from __future__ import annotations

import bisect
import datetime as dt
import enum
import os
import socket
import uuid
from dataclasses import dataclass, field
from typing import Callable, Iterable

import psycopg

from . import buckets as B
from .buckets import Bucket
from .config import settings
from .queries import query
from .steps import PERIOD_INPUTS, ROLLUP_STEPS, STEPS

WORKER = f"{socket.gethostname()}:{os.getpid()}"


class State(str, enum.Enum):
    OK = "ok"
    FAILED = "failed"
    DIRTY = "dirty"
    MISSING = "missing"
    RUNNING = "running"
    SEALED = "sealed"

    def __str__(self) -> str:
        return self.value


STATES = tuple(State)
DONE = (State.OK, State.SEALED)  # nothing to do


@dataclass(frozen=True)
class Facts:
    """One stored row of analytics.bucket_state: what the latest attempts left behind."""

    stored: str  # running | ok | failed | sealed
    attempt_id: int | None = None
    attempt: int = 1
    failures: int = 0
    ok_started_at: dt.datetime | None = None
    ok_finished_at: dt.datetime | None = None
    rows_written: int | None = None
    error: str | None = None
    transient: bool | None = None
    changed_at: dt.datetime | None = None
    sealed_at: dt.datetime | None = None
    ignored_changes: int = 0


@dataclass(frozen=True)
class Marks:
    """The change marks of one hour and one source table (those made before the hour could
    be sealed; the later ones are only counted, as ``ignored``)."""

    count: int
    unclaimed: bool  # one of them is not claimed yet: no run has started reading it
    last_claimed: dt.datetime | None  # the latest claim
    ignored: int = 0  # marks made after the hour could be sealed: changes ignored


# ---- the rules ------------------------------------------------------------------------------

def _read_by(claimed_at: dt.datetime | None, started_at: dt.datetime | None) -> bool:
    """A change whose mark was claimed at ``claimed_at`` is read by a success that began at ``started_at``."""
    return claimed_at is not None and started_at is not None and claimed_at <= started_at


def unread(marks: Marks | None, started_at: dt.datetime | None) -> bool:
    """Whether the source behind ``marks`` changed after a success that began at ``started_at``
    read it (``None``: nothing ever read it)."""
    if marks is None or marks.count == 0:
        return False
    return marks.unclaimed or not _read_by(marks.last_claimed, started_at)


def _stored_state(facts: Facts) -> State | None:
    return {"running": State.RUNNING, "failed": State.FAILED, "sealed": State.SEALED}.get(facts.stored)


@dataclass(frozen=True)
class StepState:
    """The state of one step of one bucket, with the facts it was decided from."""

    state: State
    facts: Facts | None = None
    change: str | None = None  # what changed since the latest success read: 'source' or 'hour'
    where: dt.datetime | None = None  # for a period: the (first) hour that changed under it

    @property
    def why(self) -> str:
        """Why the step is in this state, in a few words."""
        if self.state is State.MISSING:
            return "never run"
        if self.state is State.RUNNING:
            return "running now"
        if self.state is State.SEALED:
            return "sealed"
        if self.state is State.FAILED:
            first = (self.facts.error or "").strip().splitlines()[0] if self.facts and self.facts.error else ""
            return f"latest attempt failed: {first}" if first else "latest attempt failed"
        if self.state is State.DIRTY:
            if self.where is None:
                return "a source row changed since it was aggregated"
            hour = B.HOUR.label(self.where)
            if self.change == "hour":
                return f"hour {hour} was aggregated again after it"
            return f"a source row of hour {hour} changed since"
        return "up to date"


def hour_step_state(facts: Facts | None, marks: Marks | None, sealable: bool = False) -> StepState:
    """The state of one step of one hour, from its stored row and its source's marks;
    ``sealable``: the hour ended long enough ago to be sealed."""
    changed = "source" if unread(marks, facts.ok_started_at if facts else None) else None
    if facts is None:
        return StepState(State.MISSING, None, changed)
    stored = _stored_state(facts)
    if stored is State.SEALED:
        return StepState(State.SEALED, facts)
    if stored is not None:
        return StepState(stored, facts, changed)
    if changed:
        return StepState(State.DIRTY, facts, changed)
    return StepState(State.SEALED if sealable else State.OK, facts)


def period_step_state(facts: Facts | None, inputs: Iterable[tuple[dt.datetime, Facts | None, Marks | None]],
                      sealable: bool = False, hour_sealable: Callable[[dt.datetime], bool] = lambda h: False
                      ) -> StepState:
    """The state of a day's, week's or month's step, from its stored row and, for each of its
    hours and each hourly step it reads, that step's stored row and its source's marks;
    ``sealable``: the period ended long enough ago to be sealed (``hour_sealable``: an hour)."""
    if facts is None:
        return StepState(State.MISSING)
    stored = _stored_state(facts)
    if stored is State.SEALED:
        return StepState(State.SEALED, facts)
    change, where = None, None
    for hour, f, m in inputs:
        if f is not None and (f.stored == "sealed" or (f.stored == "ok" and hour_sealable(hour)
                                                        and not unread(m, f.ok_started_at))):
            continue  # final (or as good as): its changes are ignored, and so they are for the period
        if unread(m, f.ok_started_at if f else None):
            change, where = "source", hour
            break
        if (f is not None and f.ok_finished_at is not None and facts.ok_started_at is not None
                and f.ok_finished_at > facts.ok_started_at):
            change, where = "hour", hour
            break
    if stored is not None:
        return StepState(stored, facts, change, where)
    if change:
        return StepState(State.DIRTY, facts, change, where)
    return StepState(State.SEALED if sealable else State.OK, facts)


@dataclass
class BucketState:
    """The state of every step of one bucket."""

    bucket: Bucket
    steps: dict[str, StepState]
    ignored: int = 0  # changes to its source ignored because it is sealed (or could be), not yet counted

    def __getitem__(self, step: str) -> State:
        return self.steps[step].state

    @property
    def states(self) -> dict[str, State]:
        return {s: st.state for s, st in self.steps.items()}

    def where(self, *states: State) -> list[str]:
        """The steps in one of ``states``, in the rollup's order."""
        return [s for s, st in self.steps.items() if st.state in states]

    @property
    def done(self) -> bool:
        return all(st.state in DONE for st in self.steps.values())


# ---- reading --------------------------------------------------------------------------------

def _ranges(buckets: list[Bucket]) -> tuple[list[dt.datetime], list[dt.datetime]]:
    """The buckets' spans, merged into disjoint ranges."""
    los: list[dt.datetime] = []
    his: list[dt.datetime] = []
    for b in sorted(buckets):
        if his and b.start <= his[-1]:
            his[-1] = max(his[-1], b.end)
        else:
            los.append(b.start)
            his.append(b.end)
    return los, his


def _facts(row) -> Facts:
    (_, _, _, _, _, stored, attempt_id, attempt, failures, ok_started_at, ok_finished_at, rows_written, error,
     transient, changed_at, sealed_at, ignored, *_) = row
    return Facts(stored, attempt_id, attempt, failures, ok_started_at, ok_finished_at, rows_written, error,
                 transient, changed_at, sealed_at, ignored or 0)


def seal_after() -> dt.timedelta:
    return dt.timedelta(days=settings().seal_after_days)


def read(conn: psycopg.Connection, rollup: str, buckets: Iterable[Bucket], now: dt.datetime | None = None
         ) -> dict[Bucket, BucketState]:
    """The state of every step of ``buckets`` (all of ``rollup``), in one query, in order, as of
    ``now`` (default: the current time; it decides which buckets could be sealed)."""
    wanted = sorted(set(buckets))
    if not wanted:
        return {}
    grain = B.grain(rollup)
    steps = list(ROLLUP_STEPS[rollup])
    inputs = list(PERIOD_INPUTS) if grain.parts is not None else []
    los, his = _ranges(wanted)
    horizon = seal_after()
    cutoff = (now or dt.datetime.now(B.UTC)) - horizon  # a bucket ended by then could be sealed
    facts: dict[tuple[str, str, dt.datetime], Facts] = {}
    marks: dict[tuple[dt.datetime, str], Marks] = {}
    for row in conn.execute(query("state_of_ranges"), dict(rollup=rollup, steps=steps, inputs=inputs,
                                                           los=los, his=his, seal_after=horizon)):
        if row[0] == "state":
            facts[(row[1], row[2], row[3])] = _facts(row)
        else:
            marks[(row[3], row[2])] = Marks(row[17], row[18], row[19], row[16])
    result: dict[Bucket, BucketState] = {}
    if grain.parts is None:
        for b in wanted:
            result[b] = BucketState(b, {s: hour_step_state(facts.get((rollup, s, b.start)),
                                                           marks.get((b.start, STEPS[s].source)),
                                                           b.end <= cutoff)
                                        for s in steps}, ignored=_ignored(marks, b.start))
        return result
    # a period: only the hours with a stored input or a mark can have changed under it
    hours = sorted({k[2] for k in facts if k[0] == B.HOUR.rollup} | {h for h, _ in marks})
    for b in wanted:
        inside = hours[bisect.bisect_left(hours, b.start):bisect.bisect_left(hours, b.end)]
        inputs_of = [(h, facts.get((B.HOUR.rollup, s, h)), marks.get((h, STEPS[s].source)))
                     for h in inside for s in inputs]
        result[b] = BucketState(b, {s: period_step_state(facts.get((rollup, s, b.start)), inputs_of, b.end <= cutoff,
                                                         lambda h: h + dt.timedelta(hours=1) <= cutoff)
                                    for s in steps})
    return result


def _ignored(marks: dict[tuple[dt.datetime, str], Marks], hour: dt.datetime) -> int:
    return sum(m.ignored for (h, _), m in marks.items() if h == hour)


def read_range(conn: psycopg.Connection, rollup: str, start: dt.datetime, end: dt.datetime
               ) -> dict[Bucket, BucketState]:
    """The state of every bucket of ``rollup`` lying wholly inside [start, end)."""
    return read(conn, rollup, B.within(rollup, start, end))


def of(conn: psycopg.Connection, bucket: Bucket) -> BucketState:
    """The state of one bucket."""
    return read(conn, bucket.rollup, [bucket])[bucket]


def sealed_steps(conn: psycopg.Connection, bucket: Bucket, now: dt.datetime | None = None) -> set[str]:
    """The steps of ``bucket`` that are sealed. A bucket that did not end long enough ago to be
    sealed by :func:`read`'s rule is sealed only where a seal is stored (one index lookup: the
    scheduled hour's task asks this every time); an older one is read whole."""
    if bucket.end <= (now or dt.datetime.now(B.UTC)) - seal_after():
        return {s for s, st in of(conn, bucket).steps.items() if st.state is State.SEALED}
    return {step for step, in conn.execute(query("stored_seals"), dict(rollup=bucket.rollup, start=bucket.start))}


def starts_in(conn: psycopg.Connection, rollup: str, states: Iterable[str], since: dt.datetime | None = None
              ) -> list[Bucket]:
    """The buckets of ``rollup`` with a step whose *stored* state is one of ``states`` (oldest first);
    with ``since``, only those whose state changed at or after it (attempt time)."""
    rows = conn.execute(query("state_starts"), dict(rollup=rollup, states=list(states), since=since)).fetchall()
    return [Bucket(rollup, s.astimezone(B.UTC), e.astimezone(B.UTC)) for s, e in rows]


def marked_hours(conn: psycopg.Connection) -> list[dt.datetime]:
    """Every hour with a change mark, oldest first."""
    return [h.astimezone(B.UTC) for h, _ in conn.execute(query("marks_hours"))]


def hours_with_executions(conn: psycopg.Connection, hours: list[dt.datetime]) -> set[dt.datetime]:
    """Which of ``hours`` hold at least one execution."""
    if not hours:
        return set()
    return {r[0].astimezone(B.UTC) for r in conn.execute(query("hours_with_executions"), dict(hours=hours))}


# ---- transitions ----------------------------------------------------------------------------

@dataclass
class Attempt:
    """One attempt of one step of one bucket: its ledger row."""

    id: int
    attempt: int
    bucket: Bucket
    step: str
    started_at: dt.datetime | None = None


@dataclass
class Run:
    """Who makes attempts: written into every ledger row."""

    trigger: str
    task_id: str | None = None
    run_id: uuid.UUID = field(default_factory=uuid.uuid4)

    def args(self, rollup: str, step: str) -> dict:
        return dict(run_id=self.run_id, rollup=rollup, step=step, trigger=self.trigger, worker=WORKER,
                    task_id=self.task_id)


def begin(conn: psycopg.Connection, run: Run, step: str, buckets: list[Bucket], backend_pid: int | None
          ) -> list[Attempt]:
    """Attempts begin (the caller holds their locks): ledger rows and states ``running``."""
    rollup = buckets[0].rollup
    rows = conn.execute(query("attempts_begin"), dict(
        run.args(rollup, step), starts=[b.start for b in buckets], ends=[b.end for b in buckets],
        backend_pid=backend_pid)).fetchall()
    by_start = {b.start: b for b in buckets}
    return [Attempt(i, n, by_start[s.astimezone(B.UTC)], step, started) for i, s, n, started in rows]


def succeed(conn: psycopg.Connection, attempts: list[Attempt], rows: list[int]) -> None:
    """Attempts succeed: call inside their data transaction, just before it commits."""
    conn.execute(query("attempts_succeeded"), dict(ids=[a.id for a in attempts], rows=rows))


def done(conn: psycopg.Connection, run: Run, step: str, buckets: list[Bucket], rows: list[int],
         started_at: dt.datetime, backend_pid: int | None) -> list[Attempt]:
    """A chunk of hours of one step succeeded in one statement (call inside its transaction, its
    locks held): ledger rows succeeded and states ok, begun and concluded together."""
    rows_of = conn.execute(query("attempts_done"), dict(
        run.args(buckets[0].rollup, step), starts=[b.start for b in buckets], ends=[b.end for b in buckets],
        rows=rows, started_at=started_at, backend_pid=backend_pid)).fetchall()
    by_start = {b.start: b for b in buckets}
    return [Attempt(i, n, by_start[s.astimezone(B.UTC)], step, started_at) for i, s, n in rows_of]


def fail(conn: psycopg.Connection, attempts: list[Attempt], errors: list[str], sqlstates: list[str | None],
         transients: list[bool]) -> None:
    """Running attempts fail: ledger rows and states ``failed``."""
    conn.execute(query("attempts_failed"), dict(ids=[a.id for a in attempts], errors=errors, sqlstates=sqlstates,
                                                transients=transients))


def skip(conn: psycopg.Connection, run: Run, step: str, bucket: Bucket, backend_pid: int | None,
         error: str) -> Attempt:
    """Another run held the lock: a ledger row; the state does not move."""
    i, n = conn.execute(query("attempt_skipped"), dict(run.args(bucket.rollup, step), start=bucket.start,
                                                       end=bucket.end, backend_pid=backend_pid,
                                                       error=error)).fetchone()
    return Attempt(i, n, bucket, step)


def fail_unstarted(conn: psycopg.Connection, run: Run, step: str, buckets: list[Bucket], error: str,
                   transient: bool = True) -> list[Attempt]:
    """Attempts that failed before they could start: failed ledger rows; the states ``failed``
    unless another run is on the bucket now."""
    rows = conn.execute(query("attempts_not_run"), dict(
        run.args(buckets[0].rollup, step), starts=[b.start for b in buckets], ends=[b.end for b in buckets],
        error=error, transient=transient)).fetchall()
    by_start = {b.start: b for b in buckets}
    return [Attempt(i, n, by_start[s.astimezone(B.UTC)], step) for i, s, n in rows]


def reap(conn: psycopg.Connection) -> int:
    """Attempts whose process died fail, with their states; returns how many.

    A role that may not update the ledger (the read-only dashboard role) only reads it.
    """
    if not conn.execute("SELECT has_table_privilege('analytics.aggregation_runs', 'UPDATE') "
                        "AND has_table_privilege('analytics.bucket_state', 'UPDATE')").fetchone()[0]:
        return 0
    return len(conn.execute(query("attempts_reap")).fetchall())


def claim_marks(conn: psycopg.Connection, hours: list[dt.datetime], sources: Iterable[str]) -> None:
    """Claim the change marks of ``hours`` of ``sources`` before their steps read them."""
    conn.execute(query("marks_claim"), dict(hours=hours, sources=sorted(set(sources))))


def clear_marks(conn: psycopg.Connection, hours: list[dt.datetime]) -> None:
    """Delete the marks of ``hours`` that every step reading their source has read (:func:`_read_by`)."""
    if not hours:
        return
    claimed = conn.execute(query("marks_claimed"), dict(hours=hours)).fetchall()
    if not claimed:
        return
    states = read(conn, B.HOUR.rollup, [B.HOUR.bucket(h.astimezone(B.UTC)) for h in {r[1] for r in claimed}])
    read_ids = []
    for mark_id, hour, source, claimed_at in claimed:
        steps = states[B.HOUR.bucket(hour.astimezone(B.UTC))].steps
        readers = [steps[s].facts for s in ROLLUP_STEPS[B.HOUR.rollup] if STEPS[s].source == source]
        if all(f is not None and _read_by(claimed_at, f.ok_started_at) for f in readers):
            read_ids.append(mark_id)
    if read_ids:
        conn.execute(query("marks_delete"), dict(ids=read_ids))


def seal(conn: psycopg.Connection, now: dt.datetime | None = None) -> dict[str, int]:
    """Store the seal of every bucket that could be sealed (every step of it sealed when read),
    and count and drop the marks of sealed hours (:func:`sweep_ignored`); returns buckets
    sealed per rollup. Stored, a seal survives a later change of TALLY_SEAL_AFTER_DAYS."""
    now = now or dt.datetime.now(B.UTC)
    sealed: dict[str, int] = {}
    for rollup in B.ROLLUPS:
        candidates = [Bucket(rollup, a.astimezone(B.UTC), b.astimezone(B.UTC)) for a, b in conn.execute(
            query("seal_candidates"), dict(rollup=rollup, now=now, seal_after=seal_after()))]
        starts = [b.start for b, bs in read(conn, rollup, candidates, now).items()
                  if all(st.state is State.SEALED for st in bs.steps.values())]
        if starts:
            sealed[rollup] = conn.execute(query("seal"), dict(rollup=rollup, starts=starts, now=now)).rowcount
    sweep_ignored(conn)
    return sealed


def sweep_ignored(conn: psycopg.Connection) -> None:
    """Count the marks of sealed hours as ignored changes (on the first step reading each
    source) and delete them, so the dirty log holds only what may still be read."""
    readers = {}
    for step in ROLLUP_STEPS[B.HOUR.rollup]:
        readers.setdefault(STEPS[step].source, step)
    conn.execute(query("sweep_ignored"), dict(sources=list(readers), steps=list(readers.values())))


def ignored_total(conn: psycopg.Connection) -> int:
    """Changes ignored for sealed buckets, all told (counted, and marks not swept yet)."""
    return conn.execute(query("ignored_total"), dict(seal_after=seal_after())).fetchone()[0]
