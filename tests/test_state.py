"""One truth table for the state of a bucket, and every consumer's decision for it.

Part 1 (no PostgreSQL): every combination that matters — the latest attempt succeeded,
failed, skipped, running or dead; change marks claimed before, during and after the
latest success, or never; an hour aggregated again after its day; never run; sealed —
goes through the one set of rules (tally/state.py) and the decisions taken from it
(tally/plan.py): the status grid, catch-up (inside and outside its window), backfill and
retry-failed. Each row names its expected state and decisions, written by hand.

Part 2 (PostgreSQL): the same rows built for real through the stored transitions (a run
that succeeds or fails, a skip, a dead process, a change committed by the platform), read
back by ``tally status --json``, ``tally retry-failed --dry-run``, ``tally catch-up
--dry-run`` and backfill's choice; and the skipped-lock scenario as one real run.
"""
from __future__ import annotations

import datetime as dt
import json
import threading
import time

import psycopg
import pytest

from support import cli
from tally import backfill, hourly_rollup
from tally import buckets as B
from tally import plan as P
from tally import state as S
from tally.state import Facts, Marks, State

UTC = dt.timezone.utc
HOUR = B.bucket("hourly", dt.datetime(2026, 11, 25, 10, tzinfo=UTC))
DAY = B.bucket("daily", HOUR.start)
T = dt.datetime(2026, 11, 26, 8, tzinfo=UTC)  # wall-clock times of attempts and claims


def at(minute: int) -> dt.datetime:
    return T + dt.timedelta(minutes=minute)


INSIDE = P.Window.of(dt.datetime(2026, 11, 28, 12, 30, tzinfo=UTC), 7)  # holds HOUR and DAY
OUTSIDE = P.Window.of(dt.datetime(2026, 12, 30, 12, 30, tzinfo=UTC), 7)  # holds neither

# ---- part 1: the table ---------------------------------------------------------------------------

OK = Facts("ok", 1, 1, 0, at(10), at(11), 5)  # the latest success began at :10, ended at :11
FAILED = Facts("failed", 2, 2, 1, at(10), at(11), 5, "DataError: boom", False)
NEVER_OK_FAILED = Facts("failed", 1, 1, 1, None, None, None, "QueryCanceled: statement timeout", True)
RUNNING = Facts("running", 3, 1, 0, at(10), at(11), 5)
DEAD = Facts("failed", 3, 1, 1, at(10), at(11), 5, "abandoned: the process running this step died", True)
SEALED = Facts("sealed", 1, 1, 0, at(10), at(11), 5, sealed_at=at(60))
BEFORE = Marks(1, False, at(5))  # claimed before the latest success began: read
DURING = Marks(1, False, at(10) + dt.timedelta(seconds=30))  # claimed after it began: not read
AFTER = Marks(1, True, None)  # unclaimed: nobody has read it
IGNORED = Marks(0, False, None, 1)  # made after the hour could be sealed
ALSO_AFTER = Marks(2, True, at(5))  # one read, one new

HOURLY = ("execution_metrics", "user_activity", "credit_consumption")
SOURCE = {"execution_metrics": "execution_logs", "user_activity": "user_activity",
          "credit_consumption": "execution_logs"}


def hour_state(facts: Facts | None, marks: Marks | None, *, source: str = "execution_logs",
               old: bool = False) -> S.BucketState:
    """An hour whose three steps have ``facts``, with ``marks`` on ``source`` (none on the other);
    ``old``: it ended long enough ago to be sealed."""
    return S.BucketState(HOUR, {s: S.hour_step_state(facts, marks if SOURCE[s] == source else None, old)
                                for s in HOURLY})


def day_state(facts: Facts | None, inputs: list[tuple[Facts | None, Marks | None]], old: bool = False
              ) -> S.BucketState:
    """A day whose step has ``facts``, and hour 10 of it with (facts, marks) per input step."""
    rows = [(HOUR.start, f, m) for f, m in inputs]
    return S.BucketState(DAY, {"daily_metrics": S.period_step_state(facts, rows, old, lambda h: old)})


EM_CC = ["execution_metrics", "credit_consumption"]
ALL = list(HOURLY)

# (name, bucket state, state of each step, backfill's steps, retry-failed's steps,
#  catch-up inside its window (reason, steps) or None, catch-up outside its window)
ROWS = [
    ("never run", hour_state(None, None), ["missing"] * 3, ALL, [], ("missing", ALL), None),
    ("never run, a source row arrived", hour_state(None, AFTER), ["missing"] * 3, ALL, [], ("missing", ALL), None),
    ("succeeded, nothing changed", hour_state(OK, None), ["ok"] * 3, [], [], None, None),
    ("succeeded; a change claimed before it began (it read it)", hour_state(OK, BEFORE), ["ok"] * 3, [], [],
     None, None),
    ("succeeded; a change claimed while it ran (after it began)", hour_state(OK, DURING),
     ["dirty", "ok", "dirty"], EM_CC, [], ("dirty", EM_CC), ("dirty", EM_CC)),
    ("succeeded; a change after it (unclaimed)", hour_state(OK, AFTER), ["dirty", "ok", "dirty"], EM_CC, [],
     ("dirty", EM_CC), ("dirty", EM_CC)),
    ("succeeded; one change read, one new", hour_state(OK, ALSO_AFTER), ["dirty", "ok", "dirty"], EM_CC, [],
     ("dirty", EM_CC), ("dirty", EM_CC)),
    ("succeeded; an event arrived after it", hour_state(OK, AFTER, source="user_activity"),
     ["ok", "dirty", "ok"], ["user_activity"], [], ("dirty", ["user_activity"]), ("dirty", ["user_activity"])),
    ("succeeded, then a run skipped (another held the lock): the skip leaves it", hour_state(OK, BEFORE),
     ["ok"] * 3, [], [], None, None),
    ("failed", hour_state(FAILED, None), ["failed"] * 3, ALL, ALL, ("failed", ALL), None),
    ("failed, never succeeded", hour_state(NEVER_OK_FAILED, None), ["failed"] * 3, ALL, ALL, ("failed", ALL), None),
    ("failed with a change it never read: still late data, at any age", hour_state(FAILED, AFTER),
     ["failed"] * 3, ALL, ALL, ("dirty", ALL), ("dirty", ALL)),
    ("failed, a change it had read", hour_state(FAILED, BEFORE), ["failed"] * 3, ALL, ALL, ("failed", ALL), None),
    ("running", hour_state(RUNNING, None), ["running"] * 3, [], [], None, None),
    ("running, a change after its claim: left to it, then dirty", hour_state(RUNNING, AFTER), ["running"] * 3,
     [], [], None, None),
    ("its process died (reaped)", hour_state(DEAD, None), ["failed"] * 3, ALL, ALL, ("failed", ALL), None),
    ("sealed", hour_state(SEALED, None), ["sealed"] * 3, [], [], None, None),
    ("ok and ended long ago: sealed, before the seal is stored", hour_state(OK, None, old=True), ["sealed"] * 3,
     [], [], None, None),
    ("ended long ago; a change after it could be sealed: ignored", hour_state(OK, IGNORED, old=True),
     ["sealed"] * 3, [], [], None, None),
    ("ended long ago; a change before it could be sealed, never read: dirty, not sealed",
     hour_state(OK, AFTER, old=True), ["dirty", "sealed", "dirty"], EM_CC, [], ("dirty", EM_CC), ("dirty", EM_CC)),
    ("ended long ago and failed: failed, never sealed", hour_state(FAILED, None, old=True), ["failed"] * 3, ALL, ALL,
     ("failed", ALL), None),
    ("sealed, a change after it: ignored", hour_state(SEALED, AFTER), ["sealed"] * 3, [], [], None, None),
    # a day, from hour 10's two input steps
    ("day never run", day_state(None, [(OK, None), (OK, None)]), ["missing"], ["daily_metrics"], [],
     ("missing", ["daily_metrics"]), None),
    ("day ok: its hour ended before it began", day_state(Facts("ok", 9, 1, 0, at(20), at(21)), [(OK, None)] * 2),
     ["ok"], [], [], None, None),
    ("day ok; its hour aggregated again after it", day_state(Facts("ok", 9, 1, 0, at(5), at(6)), [(OK, None)] * 2),
     ["dirty"], ["daily_metrics"], [], ("stale", ["daily_metrics"]), ("stale", ["daily_metrics"])),
    ("day ok; its hour ended while it ran", day_state(Facts("ok", 9, 1, 0, at(10) + dt.timedelta(seconds=59), at(12)),
                                                      [(OK, None)] * 2),
     ["dirty"], ["daily_metrics"], [], ("stale", ["daily_metrics"]), ("stale", ["daily_metrics"])),
    ("day ok; a source row of its hour changed since", day_state(Facts("ok", 9, 1, 0, at(20), at(21)),
                                                                 [(OK, AFTER)] * 2),
     ["dirty"], ["daily_metrics"], [], ("dirty", ["daily_metrics"]), ("dirty", ["daily_metrics"])),
    ("day ok; an hour never aggregated got a row", day_state(Facts("ok", 9, 1, 0, at(20), at(21)),
                                                             [(None, AFTER)] * 2),
     ["dirty"], ["daily_metrics"], [], ("dirty", ["daily_metrics"]), ("dirty", ["daily_metrics"])),
    ("day ok; its hour's change was read by the hour before the day began",
     day_state(Facts("ok", 9, 1, 0, at(20), at(21)), [(OK, BEFORE)] * 2), ["ok"], [], [], None, None),
    ("day ok; its hour is sealed and changed", day_state(Facts("ok", 9, 1, 0, at(5), at(6)), [(SEALED, AFTER)] * 2),
     ["ok"], [], [], None, None),
    ("day failed", day_state(Facts("failed", 9, 2, 1, at(20), at(21), error="inputs not ready"), [(OK, None)] * 2),
     ["failed"], ["daily_metrics"], ["daily_metrics"], ("failed", ["daily_metrics"]), None),
    ("day failed; its hour aggregated again after its last success",
     day_state(Facts("failed", 9, 2, 1, at(5), at(6), error="x"), [(OK, None)] * 2),
     ["failed"], ["daily_metrics"], ["daily_metrics"], ("stale", ["daily_metrics"]), ("stale", ["daily_metrics"])),
    ("day running", day_state(Facts("running", 9, 1, 0, at(5), at(6)), [(OK, None)] * 2), ["running"], [], [],
     None, None),
    ("day sealed", day_state(Facts("sealed", 9, 1, 0, at(5), at(6)), [(OK, AFTER)] * 2), ["sealed"], [], [],
     None, None),
    ("day ended long ago; its hour aggregated again after it (on purpose): the day stays sealed",
     day_state(Facts("ok", 9, 1, 0, at(5), at(6)), [(OK, None)] * 2, old=True), ["sealed"], [], [], None, None),
]


def decisions(bs: S.BucketState, window: P.Window):
    planned = P.catch_up(bs, window)
    return None if planned is None else (planned.reason, list(planned.steps))


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_the_truth_table(row):
    name, bs, states, backfilled, retried, inside, outside = row
    assert [st.value for st in bs.states.values()] == states
    assert P.work(bs) == backfilled
    assert P.retryable(bs) == retried
    assert decisions(bs, INSIDE) == inside
    assert decisions(bs, OUTSIDE) == outside


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_every_consumer_agrees_with_the_state(row):
    """Done (ok, sealed) means no one runs it; failed means everyone does; running is left to its run."""
    _, bs, *_ = row
    if State.RUNNING in bs.states.values():
        assert P.work(bs) == P.retryable(bs) == [] and decisions(bs, INSIDE) is decisions(bs, OUTSIDE) is None
    else:
        assert bs.done == (P.work(bs) == []) == (decisions(bs, INSIDE) is None)
        assert decisions(bs, INSIDE) is None or decisions(bs, INSIDE)[1] == P.work(bs)
    assert set(P.retryable(bs)) <= set(P.work(bs))
    for step, st in bs.steps.items():
        assert (step in P.retryable(bs)) == (st.state is State.FAILED)


def test_the_rule_of_a_read_change_is_one_inequality():
    """A mark claimed at or before a success began was read by it; after, or unclaimed, it was not."""
    assert not S.unread(Marks(1, False, at(10)), at(10))
    assert S.unread(Marks(1, False, at(10) + dt.timedelta(microseconds=1)), at(10))
    assert S.unread(Marks(1, True, None), at(10)) and S.unread(Marks(1, False, at(1)), None)
    assert not S.unread(None, None) and not S.unread(Marks(0, False, None), None)


# ---- part 2: the same rows for real ----------------------------------------------------------------

FAIL_UA = """
CREATE TABLE public.fail_step (tbl text PRIMARY KEY);
CREATE FUNCTION public.fail_step() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM public.fail_step WHERE tbl = TG_TABLE_NAME) THEN
        RAISE EXCEPTION 'injected failure of %', TG_TABLE_NAME USING ERRCODE = '22000';
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER fail_step BEFORE INSERT ON analytics.execution_metrics_hourly
    FOR EACH STATEMENT EXECUTE FUNCTION public.fail_step();
CREATE TRIGGER fail_step BEFORE INSERT ON analytics.user_activity_hourly
    FOR EACH STATEMENT EXECUTE FUNCTION public.fail_step();
CREATE TRIGGER fail_step BEFORE INSERT ON analytics.credit_consumption_hourly
    FOR EACH STATEMENT EXECUTE FUNCTION public.fail_step();
"""


def add_execution(conn, eid: str, when: dt.datetime = HOUR.start + dt.timedelta(minutes=7)) -> None:
    conn.execute("INSERT INTO public.execution_logs (execution_id, workspace_id, user_id, agent_id, status, "
                 "started_at, duration, credits_used) VALUES (%s, 'w', 'u', 'a', 'completed', %s, 2.0, 1)",
                 (eid, when))


def add_event(conn) -> None:
    conn.execute("INSERT INTO analytics.user_activity (workspace_id, user_id, session_id, event_type, created_at) "
                 "VALUES ('w', 'u', 's', 'page_view', %s)", (HOUR.start + dt.timedelta(minutes=3),))


def fail_all(conn, on: bool) -> None:
    conn.execute("DELETE FROM public.fail_step")
    if on:
        conn.execute("INSERT INTO public.fail_step VALUES ('execution_metrics_hourly'), ('user_activity_hourly'), "
                     "('credit_consumption_hourly')")


def build(name: str, conn) -> None:
    """Bring HOUR into the situation ``name`` of the table, through tally's own transitions."""
    if name == "never run":
        return
    add_execution(conn, "e0")
    if name == "never run, a source row arrived":
        return  # its change, marked and never claimed
    add_event(conn)
    assert hourly_rollup(HOUR.start).ok  # claims the marks of e0 and the event, then every step reads them
    if name in ("succeeded, nothing changed", "succeeded; a change claimed before it began (it read it)"):
        return
    if name == "succeeded; a change claimed while it ran (after it began)":
        add_execution(conn, "e1")
        S.claim_marks(conn, [HOUR.start], ["execution_logs"])  # as a run that then skipped every step would
        return
    if name == "succeeded; a change after it (unclaimed)":
        add_execution(conn, "e1")
        return
    if name == "succeeded; one change read, one new":
        add_execution(conn, "e1")
        S.claim_marks(conn, [HOUR.start], ["execution_logs"])
        add_execution(conn, "e2")
        return
    if name == "succeeded; an event arrived after it":
        add_event(conn)
        return
    if name == "succeeded, then a run skipped (another held the lock): the skip leaves it":
        for step in HOURLY:
            S.skip(conn, S.Run("manual"), step, HOUR, None, "skipped: another run held the lock")
        return
    if name in ("failed", "failed, a change it had read"):  # (a read change's mark is deleted once read)
        fail_all(conn, True)
        assert not hourly_rollup(HOUR.start).ok
        fail_all(conn, False)
        return
    if name == "failed with a change it never read: still late data, at any age":
        fail_all(conn, True)
        assert not hourly_rollup(HOUR.start).ok
        fail_all(conn, False)
        add_execution(conn, "e1")
        return
    if name in ("running", "running, a change after its claim: left to it, then dirty"):
        for step in HOURLY:  # the attempts of a live session (this test's own)
            S.begin(conn, S.Run("manual"), step, [HOUR], conn.info.backend_pid)
        if name.startswith("running, a change"):
            add_execution(conn, "e1")
        return
    if name == "its process died (reaped)":
        for step in HOURLY:
            S.begin(conn, S.Run("schedule"), step, [HOUR], 2_000_000_000)  # no such backend
        return
    raise AssertionError(f"no real construction for {name!r}")


REAL = [r for r in ROWS if r[1].bucket == HOUR  # (sealing for real: tests/test_lifecycle.py)
        and not r[0].startswith(("sealed", "failed, never", "ok and ended", "ended long ago"))]


@pytest.mark.parametrize("row", REAL, ids=[r[0] for r in REAL])
def test_the_truth_table_for_real(row, db_url, conn):
    name, expected_bs, states, backfilled, retried, inside, outside = row
    conn.execute(FAIL_UA)
    build(name, conn)
    if name == "its process died (reaped)":
        S.reap(conn)
    bs = S.of(conn, HOUR)
    assert [st.value for st in bs.states.values()] == states
    assert [st.change is not None for st in bs.steps.values()] == \
        [st.change is not None for st in expected_bs.steps.values()]
    # every consumer, through its own entry point
    grid = json.loads(cli("status", "--from", "2026-11-25T10:00Z", "--to", "2026-11-25T11:00Z", "--json").out)
    assert list(grid["buckets"][0]["steps"].values()) == states
    assert backfill.pending_steps(conn, HOUR) == backfilled
    dry = json.loads(cli("retry-failed", "--dry-run", "--json").out)
    assert [s for b in dry if b["bucket"] == HOUR.label for s in b["steps"]] == retried
    for window, expected in ((INSIDE, inside), (OUTSIDE, outside)):
        from tally.catchup import catch_up
        plan = catch_up(db_url, now=window.now, days=7, dry_run=True).plans["hourly"]
        got = [(p.reason, list(p.steps)) for p in plan if p.bucket == HOUR]
        assert got == ([expected] if expected else []), window


def test_the_skipped_lock_scenario_for_real(db_url, conn, monkeypatch):
    """Run A holds execution_metrics of hour 10 while run B skips that step. A claimed the change
    mark before its steps read, and every step read the late row: the hour is ok, its mark is
    cleared, and status, catch-up, backfill and retry-failed all say so."""
    add_execution(conn, "e0")
    assert hourly_rollup(HOUR.start).ok
    add_execution(conn, "late")  # a late row: the hour is dirty
    assert backfill.pending_steps(conn, HOUR) == EM_CC
    monkeypatch.setenv("TALLY_LOCK_WAIT", "0")
    box = {}
    with psycopg.connect(db_url) as locker:
        # A's execution_metrics reads, then waits on this row lock to write: it holds the bucket lock
        locker.execute("SELECT 1 FROM analytics.execution_metrics_hourly WHERE hour = %s FOR UPDATE", (HOUR.start,))
        a = threading.Thread(target=lambda: box.update(a=hourly_rollup(HOUR.start)))
        a.start()
        deadline = time.monotonic() + 60
        while not conn.execute("SELECT count(*) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))",
                               (locker.info.backend_pid,)).fetchone()[0]:
            assert time.monotonic() < deadline, "run A never reached its write"
            time.sleep(0.02)
        b = hourly_rollup(HOUR.start)  # run B: execution_metrics is busy, so it skips it
        assert [s.status for s in b.steps] == ["skipped", "succeeded", "succeeded"]
        locker.rollback()
        a.join(60)
    assert box["a"].ok
    ems = conn.execute("SELECT status FROM analytics.aggregation_runs WHERE step = 'execution_metrics' "
                       "ORDER BY id").fetchall()
    assert [r[0] for r in ems][-2:] == ["succeeded", "skipped"]  # the ledger ends succeeded, skipped
    assert conn.execute("SELECT count(*) FROM analytics.dirty_log").fetchone()[0] == 0  # the mark is cleared
    assert S.of(conn, HOUR).states == {s: State.OK for s in HOURLY}
    grid = json.loads(cli("status", "--from", "2026-11-25T10:00Z", "--to", "2026-11-25T11:00Z", "--json").out)
    assert set(grid["buckets"][0]["steps"].values()) == {"ok"}
    assert backfill.pending_steps(conn, HOUR) == []
    assert json.loads(cli("retry-failed", "--dry-run", "--json").out) == []
    from tally.catchup import catch_up
    assert [p for p in catch_up(db_url, now=INSIDE.now, days=7, dry_run=True).plans["hourly"] if p.bucket == HOUR] == []
    total = conn.execute("SELECT total_executions FROM analytics.execution_metrics_hourly WHERE hour = %s",
                         (HOUR.start,)).fetchone()[0]
    assert total == 2  # and the late row is in the output


def test_migration_fills_the_state_from_the_ledger(make_db):
    """A database with a ledger written before the state table existed gets the same states."""
    from tally import migrate
    url = make_db()
    migrate.downgrade(url, "0004")
    with psycopg.connect(url, autocommit=True) as c:
        run = "INSERT INTO analytics.aggregation_runs (run_id, rollup, step, bucket_start, bucket_end, status, attempt, " \
              "trigger, started_at, finished_at, rows_written, error) VALUES (gen_random_uuid(), 'hourly', %s, %s, %s, " \
              "%s, %s, 'manual', %s, %s, %s, %s)"
        h = HOUR.start
        for step, status, attempt, start, rows, error in [
                ("execution_metrics", "succeeded", 1, at(1), 4, None),
                ("execution_metrics", "failed", 1, at(2), None, "boom"),
                ("execution_metrics", "skipped", 2, at(3), None, "skipped"),  # says nothing of the bucket
                ("user_activity", "succeeded", 1, at(1), 7, None),
                ("user_activity", "skipped", 1, at(3), None, "skipped"),
                ("credit_consumption", "failed", 1, at(1), None, "x"),
                ("credit_consumption", "failed", 2, at(2), None, "y")]:
            c.execute(run, (step, h, h + dt.timedelta(hours=1), status, attempt, start, start + dt.timedelta(seconds=5),
                            rows, error))
    migrate.upgrade(url)
    with psycopg.connect(url, autocommit=True) as c:
        got = {r[0]: r[1:] for r in c.execute(
            "SELECT step, state, failures, ok_started_at, rows_written, error FROM analytics.bucket_state")}
    assert got == {"execution_metrics": ("failed", 1, at(1), 4, "boom"),
                   "user_activity": ("ok", 0, at(1), 7, None),
                   "credit_consumption": ("failed", 2, None, None, "y")}
