"""Late data: change capture, the claim/clear of dirty hours, and catch-up.

Every output is checked against tests/reference.py over the source rows as they are now.
"""
from __future__ import annotations

import datetime as dt
import threading
import time
from decimal import Decimal

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reference as ref
import strategies as S
from outputs import read, source_rows
from support import throwaway_db
from tally import buckets as B
from tally import hourly_rollup, monthly_rollup
from tally.catchup import catch_up
from tally.cli import main
from tally import state as states
from tally.steps import STEPS, lock_key

UTC = dt.timezone.utc
HOUR = dt.timedelta(hours=1)
DAY = dt.timedelta(days=1)
US = dt.timedelta(microseconds=1)


def t(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=UTC)


def execution(eid, started_at, *, workspace="w1", user="u1", agent="a1", status="completed", duration=1.0,
              credits="2.5") -> dict:
    return {"execution_id": str(eid), "workspace_id": workspace, "user_id": user, "agent_id": agent,
            "status": status, "started_at": started_at, "completed_at": None, "duration": duration,
            "credits_used": Decimal(credits), "metadata": None}


COLUMNS = ("execution_id", "workspace_id", "user_id", "agent_id", "status", "started_at", "duration", "credits_used")


def add(url_or_conn, *rows) -> None:
    """Insert executions in one statement (committed unless the caller holds a transaction)."""
    values = ", ".join(["(" + ", ".join(["%s"] * len(COLUMNS)) + ")"] * len(rows))
    params = [r[c] for r in rows for c in COLUMNS]
    sql = f"INSERT INTO public.execution_logs ({', '.join(COLUMNS)}) VALUES {values}"
    if isinstance(url_or_conn, psycopg.Connection):
        url_or_conn.execute(sql, params)
    else:
        with psycopg.connect(url_or_conn, autocommit=True) as conn:
            conn.execute(sql, params)


def marks(conn) -> list[tuple]:
    return conn.execute("SELECT hour, source, claimed_at IS NOT NULL FROM analytics.dirty_log ORDER BY id").fetchall()


def dirty_hours(conn) -> set[dt.datetime]:
    return {r[0] for r in conn.execute("SELECT DISTINCT hour FROM analytics.dirty_log")}


def plan_of(result) -> dict[str, list[tuple[str, str]]]:
    return {r: [(p.bucket.label, p.reason) for p in plan] for r, plan in result.plans.items()}


def ledger_since(conn, marker: int) -> list[tuple]:
    return conn.execute("SELECT rollup, step, bucket_start, status FROM analytics.aggregation_runs "
                        "WHERE id > %s ORDER BY id", (marker,)).fetchall()


def ledger_marker(conn) -> int:
    return conn.execute("SELECT coalesce(max(id), 0) FROM analytics.aggregation_runs").fetchone()[0]


PERIODS = {"daily": "execution_metrics_daily", "weekly": "execution_metrics_weekly",
           "monthly": "execution_metrics_monthly"}


def check_all(conn, hours, periods) -> list[str]:
    """Every output row of ``hours`` and ``periods`` against the reference; no rows elsewhere."""
    executions, events = source_rows(conn)
    problems = []
    for h in hours:
        for table, expected in (("execution_metrics_hourly", ref.execution_hourly(executions, h)),
                                ("user_activity_hourly", ref.user_activity_hourly(events, h)),
                                ("credit_consumption_hourly", ref.credit_hourly(executions, h))):
            problems += [f"{table} {h:%Y-%m-%dT%H}Z: {p}" for p in ref.compare(read(conn, table, h), expected)]
    for b in periods:
        expected = {k: {c: v for c, v in r.items() if c not in ("runtime_count", "runtime_sum")}
                    for k, r in ref.period_metrics(executions, b.start, b.end).items()}
        got = read(conn, PERIODS[b.rollup], b.start)
        problems += [f"{b}: {p}" for p in ref.compare(got, expected, percentile_rel=0.01)]
    for table in ("execution_metrics_hourly", "user_activity_hourly", "credit_consumption_hourly"):
        stray = {r[0] for r in conn.execute(f"SELECT DISTINCT hour FROM analytics.{table}")} - set(hours)
        problems += [f"{table}: rows in an unexpected hour {h}" for h in stray]
    for rollup, table in PERIODS.items():
        key = {"daily": "date", "weekly": "week_start", "monthly": "month"}[rollup]
        stray = ({r[0] for r in conn.execute(f"SELECT DISTINCT {key} FROM analytics.{table}")}
                 - {b.start.date() for b in periods if b.rollup == rollup})
        problems += [f"{table}: rows in an unexpected period {d}" for d in stray]
    return problems


FAULT = """
CREATE TABLE public.test_fault (step text PRIMARY KEY);
CREATE FUNCTION public.test_fault() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM public.test_fault WHERE step = TG_ARGV[0]) THEN
        RAISE EXCEPTION 'injected fault in %', TG_ARGV[0];
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER test_fault BEFORE INSERT ON analytics.credit_consumption_hourly
    FOR EACH STATEMENT EXECUTE FUNCTION public.test_fault('credit_consumption');
"""


@pytest.fixture
def fault(conn):
    """A real failure of the credit_consumption step while ``fault.on``: a statement trigger raises."""
    conn.execute(FAULT)

    class Fault:
        def __set_name__(self, *a):  # pragma: no cover
            pass

        @property
        def on(self):
            return bool(conn.execute("SELECT count(*) FROM public.test_fault").fetchone()[0])

        @on.setter
        def on(self, value):
            conn.execute("DELETE FROM public.test_fault")
            if value:
                conn.execute("INSERT INTO public.test_fault VALUES ('credit_consumption')")

    return Fault()


# ---- change capture (migration 0002) ------------------------------------------------------

def test_change_capture_marks_every_touched_hour_once_per_statement(conn):
    conn.execute("SET TIME ZONE 'Asia/Kolkata'")  # hours are UTC hours whatever the session says
    seen = 0

    def new_marks():
        nonlocal seen
        rows = conn.execute("SELECT hour, source FROM analytics.dirty_log WHERE id > %s ORDER BY hour", (seen,)).fetchall()
        seen = conn.execute("SELECT coalesce(max(id), 0) FROM analytics.dirty_log").fetchone()[0]
        return [(h.astimezone(UTC), s) for h, s in rows]

    h10, h11, h14 = t("2027-03-03T10:00"), t("2027-03-03T11:00"), t("2027-03-03T14:00")
    ex = "execution_logs"
    add(conn, execution(1, h11 - US), execution(2, h11), execution(3, h11 + 30 * 60 * 10**6 * US))
    assert new_marks() == [(h10, ex), (h11, ex)]  # one statement, three rows, two hours
    conn.execute("UPDATE public.execution_logs SET started_at = %s WHERE execution_id = '3'", (h14 + 10 * US,))
    assert new_marks() == [(h11, ex), (h14, ex)]  # a row that moves marks both hours
    conn.execute("UPDATE public.execution_logs SET status = 'failed', duration = 9 WHERE execution_id = '1'")
    assert new_marks() == [(h10, ex)]
    conn.execute("UPDATE public.execution_logs SET status = 'x' WHERE false")
    assert new_marks() == []
    conn.execute("DELETE FROM public.execution_logs WHERE execution_id = '2'")
    assert new_marks() == [(h11, ex)]
    conn.execute("INSERT INTO public.execution_logs (execution_id, status, started_at) VALUES ('1', 'done', %s) "
                 "ON CONFLICT (execution_id) DO UPDATE SET started_at = EXCLUDED.started_at", (h14,))
    assert new_marks() == [(h10, ex), (h14, ex)]
    with conn.cursor().copy("COPY public.execution_logs (execution_id, status, started_at) FROM STDIN") as copy:
        copy.write_row(("c1", "completed", h10 + 5 * US))
        copy.write_row(("c2", "completed", h10 + 7 * US))
    assert new_marks() == [(h10, ex)]

    ua = "user_activity"
    conn.execute("INSERT INTO analytics.user_activity (user_id, event_type, created_at) VALUES ('u', 'click', %s), "
                 "('u', 'click', %s)", (h10, h14 - US))
    assert new_marks() == [(h10, ua), (t("2027-03-03T13:00"), ua)]
    conn.execute("UPDATE analytics.user_activity SET created_at = created_at + interval '1 hour' WHERE created_at = %s", (h10,))
    assert new_marks() == [(h10, ua), (h11, ua)]
    conn.execute("DELETE FROM analytics.user_activity")
    assert new_marks() == [(h11, ua), (t("2027-03-03T13:00"), ua)]
    # a rolled-back change leaves no mark
    with pytest.raises(ZeroDivisionError), conn.transaction():
        add(conn, execution(99, h14))
        raise ZeroDivisionError
    assert new_marks() == []


def test_a_run_clears_the_marks_only_when_every_hourly_step_succeeded(db_url, conn, fault):
    hour = t("2027-03-03T10:00")
    add(conn, execution(1, hour + 5 * US))
    assert hourly_rollup(hour, steps=["execution_metrics"]).ok
    assert dirty_hours(conn) == {hour}  # the other steps did not read the change yet
    assert hourly_rollup(hour).ok
    assert dirty_hours(conn) == set()

    add(conn, execution(2, hour + 7 * US))
    fault.on = True
    result = hourly_rollup(hour)
    assert [s.status for s in result.steps] == ["succeeded", "succeeded", "failed"]
    assert "injected fault" in result.steps[2].error
    assert dirty_hours(conn) == {hour}
    fault.on = False
    assert hourly_rollup(hour, only_unfinished=True).ok  # only credit_consumption runs
    assert dirty_hours(conn) == set()
    assert not check_all(conn, [hour], [])


# ---- the race: a change that lands while its hour is being aggregated ---------------------

def _wait_blocked_by(conn, pid: int, what: str) -> None:
    """Until some backend waits on a lock held by ``pid`` (bounded; not a timing assertion)."""
    deadline = time.monotonic() + 60
    while not conn.execute("SELECT count(*) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))",
                           (pid,)).fetchone()[0]:
        if time.monotonic() > deadline:
            raise AssertionError(f"nothing blocked on {what}")
        time.sleep(0.02)


def _in_thread(fn):
    box = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as exc:  # pragma: no cover - surfaced by the caller
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    return thread, box


def test_a_change_committed_mid_step_is_not_lost(db_url, conn, monkeypatch):
    """The step reads its snapshot, then blocks (a row lock held here) before writing; a late row
    is committed meanwhile. The step's output misses that row, so the hour must stay dirty, and
    the next catch-up must pick it up."""
    monkeypatch.setenv("TALLY_LOCK_WAIT", "120")
    hour, now = t("2027-03-03T10:00"), t("2027-03-05T00:00")
    add(db_url, execution(1, hour + 60 * US))
    assert hourly_rollup(hour).ok
    add(db_url, execution(2, hour + 120 * US))  # a change before the run: it will be claimed and read
    with psycopg.connect(db_url) as locker:
        locker.execute("SELECT 1 FROM analytics.execution_metrics_hourly WHERE hour = %s FOR UPDATE", (hour,))
        thread, box = _in_thread(lambda: hourly_rollup(hour))
        _wait_blocked_by(conn, locker.info.backend_pid, "the execution_metrics_hourly row")
        add(db_url, execution(3, hour + 180 * US))  # committed while the step is blocked
        locker.rollback()
        thread.join(60)
    assert box["result"].ok
    got = conn.execute("SELECT total_executions FROM analytics.execution_metrics_hourly WHERE hour = %s",
                       (hour,)).fetchone()[0]
    assert got == 2  # the step's snapshot predates row 3: the race really happened
    assert marks(conn) == [(hour, "execution_logs", False)]  # the late change kept the hour dirty

    result = catch_up(now=now, days=2)
    assert ("2027-03-03T10:00Z", "dirty") in plan_of(result)["hourly"]
    assert result.ok
    assert dirty_hours(conn) == set()
    assert not check_all(conn, [hour], [B.bucket("daily", hour)])
    assert conn.execute("SELECT total_executions FROM analytics.execution_metrics_daily").fetchone()[0] == 3


def test_a_change_between_claim_and_step_keeps_the_hour_dirty_through_catch_up(db_url, conn, monkeypatch):
    """catch-up claims the hour's marks, then its first step waits on the bucket's advisory lock
    (held here); a change lands in between. That change's mark was not claimed: the hour stays
    dirty after this catch-up and the next one re-aggregates it."""
    monkeypatch.setenv("TALLY_LOCK_WAIT", "120")
    hour = t("2027-03-03T10:00")
    now = hour + 2 * HOUR + 30 * 60 * 10**6 * US  # the day is not complete: only hours are due
    add(db_url, execution(1, hour + 60 * US))
    key = lock_key(STEPS["execution_metrics"], int(hour.timestamp()) // 3600)
    with psycopg.connect(db_url, autocommit=True) as locker:
        locker.execute("SELECT pg_advisory_lock(%s, %s)", key)
        thread, box = _in_thread(lambda: catch_up(now=now, days=1))
        _wait_blocked_by(conn, locker.info.backend_pid, "the bucket lock")
        assert marks(conn) == [(hour, "execution_logs", True)]  # claimed before the step began
        add(db_url, execution(2, hour + 120 * US))
        locker.execute("SELECT pg_advisory_unlock(%s, %s)", key)
        thread.join(60)
    first = box["result"]
    assert first.ok and ("2027-03-03T10:00Z", "missing") in plan_of(first)["hourly"]  # never aggregated yet
    assert "2027-03-03" not in dict(plan_of(first)["daily"])  # its day is not complete yet
    assert marks(conn) == [(hour, "execution_logs", False)]

    second = catch_up(now=now, days=1)
    assert plan_of(second)["hourly"] == [("2027-03-03T10:00Z", "dirty")]
    assert dirty_hours(conn) == set()
    assert not check_all(conn, [hour], [])
    assert sum(len(p) for p in catch_up(now=now, days=1).plans.values()) == 0


# ---- what catch-up plans ------------------------------------------------------------------

def test_catch_up_fills_the_window_and_leaves_old_never_aggregated_data(db_url, conn):
    now = t("2027-03-10T12:30")  # a Wednesday; the window is [03-03T12:00, 03-10T12:00)
    old, recent = t("2027-01-15T10:00"), t("2027-03-05T10:00")
    add(conn, execution(1, old + US), execution(2, recent + US, workspace="w2"))
    result = catch_up(now=now)
    plan = plan_of(result)
    hourly = plan["hourly"]
    assert len(hourly) == 7 * 24 and hourly[0][0] == "2027-03-03T12:00Z" and hourly[-1][0] == "2027-03-10T11:00Z"
    # never aggregated, so missing (its change mark is no late data yet)
    assert ("2027-03-05T10:00Z", "missing") in hourly and {r for _, r in hourly} == {"missing"}
    # days that ended inside the window; the ISO week that did; no month did; nothing incomplete
    assert plan["daily"] == [(f"2027-03-{d:02d}", "missing") for d in range(3, 10)]
    assert plan["weekly"] == [("2027-03-01", "missing")]
    assert plan["monthly"] == []
    assert result.ok and not result.failed
    assert dirty_hours(conn) == {old}  # seeded long ago, never aggregated: not late data
    assert not check_all(conn, [recent], [B.bucket("daily", recent), B.bucket("weekly", recent)])

    again = catch_up(now=now)
    assert sum(len(p) for p in again.plans.values()) == 0 and again.buckets == []

    # Once January has been aggregated, a change in it is late data at any age -- even in an
    # hour that was never aggregated itself (it was empty, so the month did not need it).
    assert monthly_rollup("2027-01").ok
    assert dirty_hours(conn) == set()
    late = t("2027-01-20T05:00")
    add(conn, execution(3, late + US, workspace="w3"))
    conn.execute("UPDATE public.execution_logs SET duration = 4 WHERE execution_id = '2'")
    result = catch_up(now=now)
    assert plan_of(result) == {
        "hourly": [("2027-01-20T05:00Z", "dirty"), ("2027-03-05T10:00Z", "dirty")],
        "daily": [("2027-01-20", "changed"), ("2027-03-05", "stale")],
        "weekly": [("2027-01-18", "changed"), ("2027-03-01", "stale")],
        "monthly": [("2027-01", "stale")],
    }
    assert dirty_hours(conn) == set()
    assert not check_all(conn, [old, late, recent],
                         [B.bucket("daily", late), B.bucket("daily", recent), B.bucket("weekly", late),
                          B.bucket("weekly", recent), B.bucket("monthly", old)])


def test_a_period_is_stale_when_one_of_its_hours_was_aggregated_after_it(db_url, conn):
    now = t("2027-03-10T00:00")
    hour = t("2027-02-10T07:00")
    add(conn, execution(1, hour + US))
    assert monthly_rollup("2027-02").ok
    marker = ledger_marker(conn)
    assert catch_up(now=now).plans["monthly"] == []  # February ended before the window
    # someone re-runs the hour by hand (nothing changed in the source): the month may be behind it
    assert hourly_rollup(hour).ok
    result = catch_up(now=now)
    assert plan_of(result)["hourly"] == []  # the hour re-run by hand is done (the window's ran above)
    assert plan_of(result)["monthly"] == [("2027-02", "stale")]
    assert plan_of(result)["daily"] == [] and plan_of(result)["weekly"] == []  # never aggregated: not due
    assert catch_up(now=now).plans["monthly"] == []
    assert ("monthly", "monthly_metrics", t("2027-02-01T00:00"), "succeeded") in ledger_since(conn, marker)


def test_failed_buckets_are_retried_in_the_window_and_dirty_ones_at_any_age(db_url, conn, fault):
    now = t("2027-03-10T00:00")
    inside, outside = t("2027-03-06T07:00"), t("2027-02-06T07:00")
    add(conn, execution(1, inside + US), execution(2, outside + US))
    assert catch_up(now=now).ok
    assert monthly_rollup("2027-02").ok and dirty_hours(conn) == set()

    # a manual re-run that fails, with no change behind it: failed, not dirty
    fault.on = True
    for h in (inside, outside):
        assert not hourly_rollup(h).ok
    fault.on = False
    assert dirty_hours(conn) == set()
    marker = ledger_marker(conn)
    result = catch_up(now=now)
    assert plan_of(result)["hourly"] == [("2027-03-06T07:00Z", "failed")]  # the old one is out of the window
    assert [s for r, s, b, _ in ledger_since(conn, marker) if b == inside] == \
        ["credit_consumption"]  # a failed hour retries only its unfinished steps
    # February was behind its re-run hour: stale, and its preparation retried the old failed hour
    assert plan_of(result)["monthly"] == [("2027-02", "stale")]
    assert [s for r, s, b, _ in ledger_since(conn, marker) if b == outside] == ["credit_consumption"]
    assert result.ok

    # a change to the old hour while its steps fail: retried at any age until it succeeds
    fault.on = True
    add(conn, execution(3, outside + 2 * US))
    result = catch_up(now=now)
    assert not result.ok
    assert plan_of(result)["hourly"] == [("2027-02-06T07:00Z", "dirty")]
    failed = {str(r.bucket) for r in result.failed}
    assert "hourly 2027-02-06T07:00Z" in failed
    assert {"daily 2027-02-06", "weekly 2027-02-01", "monthly 2027-02"} & failed  # inputs not ready
    assert dirty_hours(conn) == {outside}
    fault.on = False
    result = catch_up(now=now)
    assert result.ok and plan_of(result)["hourly"] == [("2027-02-06T07:00Z", "dirty")]
    # the month had succeeded before: its hour ended after that, so it is stale; the day and week had
    # only failed (inputs not ready): they hold a re-aggregated hour and have ended, so they run as changed
    assert {r: plan_of(result)[r] for r in ("daily", "weekly", "monthly")} == {
        "daily": [("2027-02-06", "changed")], "weekly": [("2027-02-01", "changed")], "monthly": [("2027-02", "stale")]}
    assert dirty_hours(conn) == set()
    assert not check_all(conn, [inside, outside],
                         [B.bucket("daily", inside), B.bucket("weekly", inside), B.bucket("monthly", outside)]
                         + [b for b in (B.bucket("daily", outside), B.bucket("weekly", outside))
                            if read(conn, PERIODS[b.rollup], b.start)])
    assert sum(len(p) for p in catch_up(now=now).plans.values()) == 0


def test_a_bucket_being_aggregated_is_left_to_its_run(db_url, conn):
    now = t("2027-03-08T12:00")  # no day, week or month holding the hour has ended
    hour = t("2027-03-08T05:00")
    with psycopg.connect(db_url, autocommit=True) as other:  # a live session: its attempt is not abandoned
        states.begin(conn, states.Run("manual"), "execution_metrics", [B.bucket("hourly", hour)], other.info.backend_pid)
        conn.execute("INSERT INTO analytics.dirty_log (hour, source, claimed_at) VALUES (%s, 'execution_logs', now())",
                     (hour,))
        hours = [label for label, _ in plan_of(catch_up(now=now, days=1))["hourly"]]
        assert "2027-03-08T05:00Z" not in hours and len(hours) == 24 - 1
        add(conn, execution(1, hour + US))  # a change after that run's claim: it stays marked, unclaimed
        assert plan_of(catch_up(now=now, days=1))["hourly"] == []
        assert marks(conn)[-1] == (hour, "execution_logs", False)
    # the session is gone: its 'running' attempt is reaped as failed, and the hour is done again
    result = catch_up(now=now, days=1)
    assert result.ok and plan_of(result)["hourly"] == [("2027-03-08T05:00Z", "dirty")]
    assert conn.execute("SELECT count(*) FROM analytics.aggregation_runs WHERE status = 'running'").fetchone()[0] == 0
    assert dirty_hours(conn) == set()
    assert not check_all(conn, [hour], [])


def test_cli_catch_up_reports_progress_and_exits_1_on_a_failed_step(db_url, conn, fault, capsys):
    hour = B.floor("hourly", dt.datetime.now(UTC)) - 3 * HOUR
    add(conn, execution(1, hour + US))
    fault.on = True
    assert _cli("catch-up") == 1
    captured = capsys.readouterr()
    assert "hourly: 168 to run" in captured.out
    assert "credit_consumption" in captured.err and "injected fault" in captured.err
    assert "failed" in captured.out
    fault.on = False
    assert _cli("catch-up", "--json") == 0
    captured = capsys.readouterr()
    assert '"ok": true' in captured.out and captured.out.lstrip().startswith("{")
    assert _cli("catch-up") == 0
    assert "nothing to do" in capsys.readouterr().out


def _cli(*args: str) -> int:
    return main(list(args))


# ---- property: any interleaving of changes and catch-ups ends equal to a recomputation ----

# The generated rows lie around 2027-02-01T00:00 (a Monday): a day, ISO week and month boundary.
# `now` makes January and February complete; the window (29 days) holds every generated hour.
P_BASE = t("2027-01-31T22:00")
P_HOURS = 4
P_NOW = t("2027-03-01T00:00")
P_DAYS = 29
P_CHECK_HOURS = [P_BASE + k * HOUR for k in range(-1, P_HOURS + 1)]
P_PERIODS = sorted({B.bucket(r, h) for h in P_CHECK_HOURS for r in ("daily", "weekly", "monthly")})


RESET = """
TRUNCATE public.execution_logs, analytics.user_activity, analytics.execution_metrics_hourly,
    analytics.user_activity_hourly, analytics.credit_consumption_hourly, analytics.execution_metrics_daily,
    analytics.execution_metrics_weekly, analytics.execution_metrics_monthly, analytics.dirty_log,
    analytics.aggregation_runs, analytics.bucket_state;
INSERT INTO analytics.aggregation_runs OVERRIDING SYSTEM VALUE SELECT * FROM public.baseline_runs;
INSERT INTO analytics.bucket_state SELECT * FROM public.baseline_state;
"""


@pytest.fixture(scope="module")
def aggregated_db(admin_url, template_db):
    """A database where every bucket up to P_NOW has been aggregated once (no data yet); each
    example of the property starts from that state again (RESET: same ledger, no rows)."""
    with throwaway_db(admin_url, template_db, prefix="tally_late") as url:
        result = catch_up(url, now=P_NOW, days=P_DAYS)
        assert result.ok and result.count("monthly") == 2  # January and February
        with psycopg.connect(url, autocommit=True) as c:
            c.execute("CREATE TABLE public.baseline_runs AS SELECT * FROM analytics.aggregation_runs")
            c.execute("CREATE TABLE public.baseline_state AS SELECT * FROM analytics.bucket_state")
        yield url


@st.composite
def operations(draw):
    """Rounds of source changes, each ended by a catch-up. The first round inserts executions and
    events; later rounds update, move, delete and insert rows of hours that are aggregated by then."""
    def insert(tag):
        rows = draw(S.execution_rows(P_BASE, hours=P_HOURS, max_size=8).filter(bool))
        for j, row in enumerate(rows):
            row["execution_id"] = f"x{tag}-{j}"
        return ("insert", rows)

    ops = [insert(0), ("events", draw(S.activity_events(P_BASE, hours=P_HOURS, max_sessions=2, max_stray=4))),
           ("catch_up",)]
    for r in range(1, draw(st.integers(min_value=2, max_value=3))):
        for i in range(draw(st.integers(min_value=1, max_value=3))):
            kind = draw(st.sampled_from(["insert", "update", "move", "move", "delete", "move_events",
                                         "delete_events"]))
            if kind == "insert":
                ops.append(insert(f"{r}-{i}"))
                continue
            picks = draw(st.lists(st.integers(min_value=0, max_value=10**6), min_size=1, max_size=3))
            if kind == "update":  # e.g. a running execution that completes
                ops.append((kind, picks, draw(st.sampled_from(S.STATUSES)), draw(S.durations())))
            elif kind in ("move", "move_events"):  # across hour, day, week and month boundaries
                ops.append((kind, picks, [draw(S._times(P_BASE, P_HOURS)) for _ in picks]))
            else:
                ops.append((kind, picks))
        ops.append(("catch_up",))
    return ops


def _pick(conn, table: str, picks: list[int]) -> list[int]:
    ids = [r[0] for r in conn.execute(f"SELECT id FROM {table} ORDER BY id")]
    return sorted({ids[p % len(ids)] for p in picks}) if ids else []


def _apply(conn, op) -> None:
    kind = op[0]
    if kind == "insert":
        S.insert_executions(conn, op[1])
    elif kind == "events":
        S.insert_events(conn, op[1])
    elif kind == "update":  # e.g. a running execution that completes
        ids = _pick(conn, "public.execution_logs", op[1])
        conn.execute("UPDATE public.execution_logs SET status = %s, duration = %s WHERE id = ANY(%s)",
                     (op[2], op[3], ids))
    elif kind in ("move", "move_events"):  # started_at / created_at corrected, across hour boundaries
        table, col = (("public.execution_logs", "started_at") if kind == "move"
                      else ("analytics.user_activity", "created_at"))
        ids = _pick(conn, table, op[1])
        conn.execute(f"UPDATE {table} AS t SET {col} = v.at FROM unnest(%s::bigint[], %s::timestamptz[]) AS v(id, at) "
                     f"WHERE t.id = v.id", (ids, op[2][:len(ids)]))
    elif kind in ("delete", "delete_events"):
        table = "public.execution_logs" if kind == "delete" else "analytics.user_activity"
        conn.execute(f"DELETE FROM {table} WHERE id = ANY(%s)", (_pick(conn, table, op[1]),))


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(ops=operations())
def test_any_interleaving_of_changes_and_catch_ups_equals_a_recomputation(aggregated_db, ops):
    url = aggregated_db
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET TIME ZONE 'UTC'")
        conn.execute(RESET)
        for op in ops:
            if op[0] != "catch_up":
                _apply(conn, op)
                continue
            result = catch_up(url, now=P_NOW, days=P_DAYS)
            assert result.ok, [str(r.bucket) for r in result.failed]
            problems = check_all(conn, P_CHECK_HOURS, P_PERIODS)
            assert not problems, "\n".join(problems[:20])
            assert dirty_hours(conn) == set()
        # a caught-up database has nothing left to do
        assert sum(len(p) for p in catch_up(url, now=P_NOW, days=P_DAYS).plans.values()) == 0
