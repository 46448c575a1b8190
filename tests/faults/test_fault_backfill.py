"""Faults during backfills, through the real CLI in real processes.

3. PostgreSQL restarts (or goes down for a while) in the middle of a backfill: the
   backfill fails cleanly (one line, exit 1 or 3), and a re-run completes it.
   A private server (pgserver in a temp dir): the machine's shared one is never touched.
5. Two backfills over overlapping ranges at once.
"""
from __future__ import annotations

import datetime as dt
import uuid

import psycopg
import pytest

from celery_support import wait_for
from fault_support import (HOUR, UTC, Faults, assert_ledger_truthful, assert_no_duplicates, assert_same_outputs,
                           clean_outputs, hours_of, install_faults, ledger, one_error_line, run_tally, seed_hours,
                           start_tally, tally_env)
from tally import buckets as B
from tally import migrate

T0 = dt.datetime(2026, 3, 16, 0, tzinfo=UTC)  # a Monday


def buckets_of(start: dt.datetime, end: dt.datetime, rollups: list[str]) -> list[B.Bucket]:
    return [b for r in rollups for b in B.within(r, start, end)]


# ---- 3. PostgreSQL restarts during a backfill -----------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("outage", ["restart", "down"])
def test_postgres_restart_during_a_backfill(private_pg, make_db, tmp_path, outage):
    name = f"tally_{outage}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(private_pg.admin_url, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    url = private_pg.url(name)
    migrate.upgrade(url)
    install_faults(url)
    hours = 24
    seed_hours(url, T0, hours)
    end = T0 + hours * HOUR
    faults = Faults(url)
    gate = faults.gate("execution_metrics_hourly", T0 + 10 * HOUR)
    argv = ["backfill", "--from", f"{T0:%Y-%m-%dT%H:00Z}", "--to", f"{end:%Y-%m-%dT%H:00Z}", "--rollups", "hourly,daily"]
    env = tally_env(url)
    log = tmp_path / "backfill.log"
    proc = start_tally(argv, env, log)
    try:
        faults.wait_at(gate)  # the chunk of hours 00..23 of execution_metrics is mid-INSERT, at hour 10
        if outage == "restart":
            private_pg.restart()  # fast: every session terminated, the server back at once
            code = proc.wait(120)
        else:
            private_pg.stop()
            code = proc.wait(120)  # while the server is down: it cannot wait for ever
            assert code == 3
            private_pg.start()
    finally:
        faults.close()
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "Traceback" not in text
    # the chunk died with its session: nothing of it was committed, in the outputs or the ledger
    # (it commits whole); then the backfill went on hour by hour on a new connection (the server
    # back: exit 0 or 1), or could not (down: one line, exit 3)
    assert code in (0, 1, 3), text
    if code == 3:
        line = one_error_line(text)
        assert "cannot reach" in line or "lost the database" in line, line
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DELETE FROM public.fault")
        again = run_tally(argv, env)  # the re-run finishes the job
        assert again.returncode == 0, again.stdout + again.stderr
        buckets = buckets_of(T0, end, ["hourly", "daily"])
        assert_same_outputs(conn, clean_outputs(make_db, T0, hours, buckets))
        assert_no_duplicates(conn, hours_of(T0, hours))
        assert_ledger_truthful(conn, buckets)
        # the re-run did not redo what was finished before the outage
        assert [r[5] for r in ledger(conn, "hourly", T0)] == ["backfill"] * 3
    with psycopg.connect(private_pg.admin_url, autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# ---- 5. two backfills over overlapping ranges ------------------------------------------------------------

def test_two_backfills_over_overlapping_ranges(faulty, conn, make_db, tmp_path):
    url, faults = faulty
    hours = 48
    seed_hours(url, T0, hours)
    env = tally_env(url, TALLY_LOCK_WAIT="120")
    label = lambda t: f"{t:%Y-%m-%dT%H:00Z}"  # noqa: E731
    first = ["backfill", "--from", label(T0), "--to", label(T0 + 36 * HOUR), "--rollups", "hourly,daily"]
    second = ["backfill", "--from", label(T0), "--to", label(T0 + 48 * HOUR), "--rollups", "hourly,daily"]
    # both start on the same hour: the first holds its first step's lock at a gate until the
    # second is waiting for that same lock, then they race through the 36 hours they share
    gate = faults.gate("execution_metrics_hourly", T0)
    procs = [start_tally(first, env, tmp_path / "first.log")]
    try:
        faults.wait_at(gate)
        procs.append(start_tally(second, env, tmp_path / "second.log"))
        wait_for(lambda: faults.bucket_waiters("execution_metrics", T0), 120,
                 "the second backfill to wait for the same step")
        faults.open(gate)
        codes = [p.wait(300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = [(tmp_path / f).read_text() for f in ("first.log", "second.log")]
    assert codes == [0, 0], (logs, [r for r in ledger(conn) if r[3] not in ("succeeded", "skipped")])
    assert not any("Traceback" in t for t in logs)
    buckets = buckets_of(T0, T0 + hours * HOUR, ["hourly", "daily"])
    assert_same_outputs(conn, clean_outputs(make_db, T0, hours, buckets))
    assert_no_duplicates(conn, hours_of(T0, hours))
    assert_ledger_truthful(conn, buckets, attempts_in_order=False)
    rows = ledger(conn)
    assert {r[3] for r in rows} <= {"succeeded", "skipped"} and {r[5] for r in rows} == {"backfill"}
    # the hour both reached at once was aggregated twice, one after the other (the lock), identically
    twice = conn.execute("SELECT rows_written FROM analytics.aggregation_runs WHERE rollup = 'hourly' "
                         "AND step = 'execution_metrics' AND bucket_start = %s ORDER BY id", (T0,)).fetchall()
    assert len(twice) == 2 and twice[0] == twice[1]
