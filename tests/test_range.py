"""Range execution: consecutive hours of a step in one set-based statement and one transaction,
with outputs identical, bit for bit, to hour-by-hour runs, one ledger row and state per hour,
and a failing chunk falling back to hour by hour."""
from __future__ import annotations

import datetime as dt
import random

import psycopg

from outputs import snapshot
from strategies import insert_events
from support import cli, copy_executions, heavy_rows
from tally import buckets as B
from tally import hourly_rollup
from tally import state as S
from tally.rollups import Runner

UTC = dt.timezone.utc
HOUR = dt.timedelta(hours=1)
START = dt.datetime(2026, 11, 24, 20, tzinfo=UTC)  # crosses midnight
HOURS = 8


def ugly(conn) -> None:
    """Executions with NULL ids, NaN/±inf/negative/None durations, huge credits, rows on the hour
    boundaries; events with sessions across hours, sessionless ones, NULL workspaces."""
    rng = random.Random(41)
    rows = heavy_rows(4_000, START, HOURS, workspaces=["w1", "w2", None, "w3", "w" * 500], rng=rng)
    rows += [{**rows[0], "execution_id": f"edge{k}", "started_at": START + k * HOUR} for k in range(HOURS + 1)]
    copy_executions(conn, rows)
    events = []
    for i in range(3_000):
        t = START + dt.timedelta(seconds=rng.randrange(HOURS * 3600))
        events.append({"workspace_id": rng.choice(["w1", "w2", None]), "user_id": f"u{rng.randrange(30)}",
                       "session_id": rng.choice([f"s{rng.randrange(200)}", None]),
                       "event_type": rng.choice(["page_view", "click", "login"]), "event_name": None,
                       "page_path": None, "metadata": None, "created_at": t})
    insert_events(conn, events)


def test_a_range_writes_exactly_what_hour_by_hour_writes(make_db):
    ranged, hourly = make_db(), make_db()
    for url in (ranged, hourly):
        with psycopg.connect(url, autocommit=True) as c:
            ugly(c)
    with Runner(ranged, trigger="backfill") as runner:
        results = runner.run_hours([(B.HOUR.bucket(START + k * HOUR), ["execution_metrics", "user_activity",
                                                                        "credit_consumption"]) for k in range(HOURS)])
    assert all(r.ok for r in results) and len(results) == HOURS
    for k in range(HOURS):
        assert hourly_rollup(START + k * HOUR, url=hourly).ok
    with psycopg.connect(ranged) as a, psycopg.connect(hourly) as b:
        assert snapshot(a) == snapshot(b)  # every column, floats exactly
        runs = a.execute("SELECT step, bucket_start, status, started_at, rows_written FROM analytics.aggregation_runs "
                         "ORDER BY step, bucket_start").fetchall()
        assert len(runs) == 3 * HOURS and {r[2] for r in runs} == {"succeeded"}
        for step in ("execution_metrics", "user_activity", "credit_consumption"):
            started = {r[3] for r in runs if r[0] == step}
            assert len(started) == 1  # one transaction: the chunk's attempts began together
        expected_rows = b.execute("SELECT step, bucket_start, rows_written FROM analytics.aggregation_runs "
                                  "ORDER BY step, bucket_start").fetchall()
        assert [(r[0], r[1], r[4]) for r in runs] == expected_rows  # rows per hour, as hour by hour
        states = S.read(a, "hourly", [B.HOUR.bucket(START + k * HOUR) for k in range(HOURS)])
        assert all(bs.done for bs in states.values())
        assert a.execute("SELECT count(*) FROM analytics.dirty_log WHERE hour < %s",
                         (START + HOURS * HOUR,)).fetchone()[0] == 0  # the range's marks: read and cleared


def test_each_step_chunks_by_its_own_rows(make_db, monkeypatch):
    """Chunk width follows each step's Step.chunk_rows and its own source's rows an hour: with
    credit_consumption limited to ~2 hours' executions and user_activity to ~3 hours' events,
    the three steps run 1, 4 and 3 transactions over the 8 hours (the chunks cut on whole
    hours), in time order, and write what hour by hour writes."""
    import dataclasses

    from tally import steps as T

    ranged, hourly = make_db(), make_db()
    for url in (ranged, hourly):
        with psycopg.connect(url, autocommit=True) as c:
            ugly(c)
            c.execute("ANALYZE public.execution_logs; ANALYZE analytics.user_activity")
    with psycopg.connect(ranged) as c:
        per_hour = {t: c.execute(f"SELECT count(*) FROM {t}").fetchone()[0] / HOURS
                    for t in ("public.execution_logs", "analytics.user_activity")}
    monkeypatch.setitem(T.STEPS, "credit_consumption", dataclasses.replace(
        T.STEPS["credit_consumption"], chunk_rows=int(2.5 * per_hour["public.execution_logs"])))
    monkeypatch.setitem(T.STEPS, "user_activity", dataclasses.replace(
        T.STEPS["user_activity"], chunk_rows=int(3.5 * per_hour["analytics.user_activity"])))
    with Runner(ranged, trigger="backfill") as runner:
        work = [(B.HOUR.bucket(START + k * HOUR), ["execution_metrics", "user_activity", "credit_consumption"])
                for k in range(HOURS)]
        pieces = runner._pieces(work)
        assert [(step.name, len(run)) for step, run in pieces] == [
            ("execution_metrics", 8), ("user_activity", 3), ("credit_consumption", 2), ("credit_consumption", 2),
            ("user_activity", 3), ("credit_consumption", 2), ("user_activity", 2), ("credit_consumption", 2)]
        assert [run[0].start for _, run in pieces] == sorted(run[0].start for _, run in pieces)
        assert all(r.ok for r in runner.run_hours(work))
    for k in range(HOURS):
        assert hourly_rollup(START + k * HOUR, url=hourly).ok
    with psycopg.connect(ranged) as a, psycopg.connect(hourly) as b:
        assert snapshot(a) == snapshot(b)
        transactions = dict(a.execute("SELECT step, count(DISTINCT started_at) FROM analytics.aggregation_runs "
                                      "GROUP BY step").fetchall())
        assert transactions == {"execution_metrics": 1, "user_activity": 3, "credit_consumption": 4}


def test_a_failing_chunk_falls_back_to_hour_by_hour(db_url, conn):
    ugly(conn)
    bad = START + 3 * HOUR
    conn.execute("""CREATE FUNCTION public.bad_hour() RETURNS trigger LANGUAGE plpgsql AS $$
                    BEGIN
                        IF NEW.hour = '2026-11-24 23:00+00' THEN RAISE EXCEPTION 'bad hour' USING ERRCODE = '22000'; END IF;
                        RETURN NEW;
                    END $$;
                    CREATE TRIGGER bad_hour BEFORE INSERT ON analytics.credit_consumption_hourly
                    FOR EACH ROW EXECUTE FUNCTION public.bad_hour()""")
    got = cli("backfill", "--from", B.HOUR.label(START), "--to", B.HOUR.label(START + HOURS * HOUR),
              "--rollups", "hourly")
    assert got.code == 1
    runs = conn.execute("SELECT step, bucket_start, status FROM analytics.aggregation_runs ORDER BY id").fetchall()
    failed = [(s, b) for s, b, st in runs if st == "failed"]
    assert failed == [("credit_consumption", bad)]  # only the failing hour, once
    assert sorted((s, b) for s, b, st in runs if st == "succeeded") == sorted(
        (s, START + k * HOUR) for s in ("execution_metrics", "user_activity", "credit_consumption")
        for k in range(HOURS) if (s, START + k * HOUR) != ("credit_consumption", bad))
    conn.execute("DROP TRIGGER bad_hour ON analytics.credit_consumption_hourly")
    assert cli("retry-failed").code == 0
    with psycopg.connect(db_url) as c:
        assert all(bs.done for bs in S.read(c, "hourly", [B.HOUR.bucket(START + k * HOUR)
                                                          for k in range(HOURS)]).values())


def test_backfill_jobs_run_steps_at_once_with_the_same_rows_ledger_and_failures(make_db, monkeypatch):
    """``backfill --jobs 3``: (chunk, step) pieces on three connections at once; the same outputs,
    bit for bit, as one at a time; one success per (step, hour); a failing hour still isolated
    (the trigger fails credit_consumption of 23:00 in both databases)."""
    one, three = make_db(), make_db()
    for url in (one, three):
        with psycopg.connect(url, autocommit=True) as c:
            ugly(c)
            c.execute("""CREATE FUNCTION public.bad_hour() RETURNS trigger LANGUAGE plpgsql AS $$
                         BEGIN
                             IF NEW.hour = '2026-11-24 23:00+00' THEN RAISE EXCEPTION 'bad hour' USING ERRCODE = '22000';
                             END IF;
                             RETURN NEW;
                         END $$;
                         CREATE TRIGGER bad_hour BEFORE INSERT ON analytics.credit_consumption_hourly
                         FOR EACH ROW EXECUTE FUNCTION public.bad_hour()""")
    span = ["--from", B.HOUR.label(START), "--to", B.HOUR.label(START + HOURS * HOUR), "--rollups", "hourly,daily"]
    seen = {}
    for url, jobs in ((one, "1"), (three, "3")):
        monkeypatch.setenv("TALLY_DATABASE_URL", url)
        seen[jobs] = cli("backfill", *span, "--jobs", jobs, "--json")
    assert seen["1"].code == seen["3"].code == 1  # the bad hour
    with psycopg.connect(one) as a, psycopg.connect(three) as b:
        assert snapshot(a) == snapshot(b)
        ledger = "SELECT rollup, step, bucket_start, status FROM analytics.aggregation_runs ORDER BY 1, 2, 3, 4"
        assert a.execute(ledger).fetchall() == b.execute(ledger).fetchall()
        assert b.execute("SELECT count(DISTINCT backend_pid) FROM analytics.aggregation_runs "
                         "WHERE status = 'succeeded' AND rollup = 'hourly'").fetchone()[0] > 1  # lanes ran
        failed = b.execute("SELECT step, bucket_start FROM analytics.aggregation_runs WHERE status = 'failed' "
                           "AND rollup = 'hourly'").fetchall()
        assert failed == [("credit_consumption", START + 3 * HOUR)]
    bad = cli("backfill", *span, "--jobs", "0")
    assert bad.code == 2


def test_backfill_jobs_gather_days_of_hours_then_run_the_days_side_by_side(make_db, monkeypatch):
    """``backfill --jobs 2`` over five whole days: every hour's steps run before any day (the
    hours gather, up to a week), then the days run in two lanes; ``--jobs 1`` runs each day
    right after its hours. The same rows and the same ledger either way."""
    first = dt.datetime(2026, 11, 20, tzinfo=UTC)
    one, two = make_db(), make_db()
    for url in (one, two):
        with psycopg.connect(url, autocommit=True) as c:
            copy_executions(c, heavy_rows(5_000, first, 120, workspaces=["w1", "w2", "w3"], rng=random.Random(7)))
    span = ["--from", B.HOUR.label(first), "--to", B.HOUR.label(first + 120 * HOUR), "--rollups", "hourly,daily"]
    for url, jobs in ((one, "1"), (two, "2")):
        monkeypatch.setenv("TALLY_DATABASE_URL", url)
        assert cli("backfill", *span, "--jobs", jobs).code == 0
    ledger = "SELECT rollup, step, bucket_start, status FROM analytics.aggregation_runs ORDER BY 1, 2, 3, 4"
    timing = ("SELECT (SELECT min(started_at) FROM analytics.aggregation_runs WHERE rollup = 'daily'), "
              "(SELECT max(finished_at) FROM analytics.aggregation_runs WHERE rollup = 'hourly'), "
              "(SELECT count(DISTINCT backend_pid) FROM analytics.aggregation_runs WHERE rollup = 'daily')")
    with psycopg.connect(one) as a, psycopg.connect(two) as b:
        assert snapshot(a) == snapshot(b)
        assert a.execute(ledger).fetchall() == b.execute(ledger).fetchall()
        assert len(b.execute("SELECT 1 FROM analytics.aggregation_runs WHERE rollup = 'daily'").fetchall()) == 5
        first_day, last_hour, lanes = b.execute(timing).fetchone()
        assert first_day >= last_hour and lanes == 2  # hours first, then the days in two lanes
        first_day, last_hour, lanes = a.execute(timing).fetchone()
        assert first_day < last_hour and lanes == 1  # day by day
