"""4. Redis is unavailable when a task is sent and when a worker starts.

A clear one-line error and exit 3, nothing written; once Redis is back, work continues,
including on a worker that was running while Redis went away. A private redis-server on
a port of its own: the machine's Redis (6379) is never stopped.
"""
from __future__ import annotations

import datetime as dt
import uuid

import pytest

from celery_support import Worker, wait_for
from fault_support import (HOUR, UTC, assert_ledger_truthful, assert_same_outputs, clean_outputs, ledger,
                           one_error_line, run_tally, seed_hours, tally_env)
from outputs import snapshot
from tally import buckets as B

pytest_plugins = ["celery_support"]

T0 = dt.datetime(2026, 3, 23, 0, tzinfo=UTC)
HOURS = 3


@pytest.mark.slow
def test_redis_unavailable_when_sending_and_when_a_worker_starts(faulty, conn, make_db, private_redis, tmp_path):
    url, _ = faulty
    seed_hours(url, T0, HOURS)
    env = tally_env(url, TALLY_BROKER_URL=private_redis.url, TALLY_BROKER_PREFIX=f"tally-fault-{uuid.uuid4().hex[:8]}:",
                    TALLY_LOCK_WAIT="60")
    end = T0 + HOURS * HOUR
    send = ["backfill", "--from", f"{T0:%Y-%m-%dT%H:00Z}", "--to", f"{end:%Y-%m-%dT%H:00Z}", "--rollups", "hourly",
            "--queue"]
    empty = snapshot(conn)

    # Redis is down: sending work and starting a worker (or the scheduler) fail at once, clearly
    for argv in (send, ["worker"], ["beat"]):
        run = run_tally(argv, env)
        assert run.returncode == 3, (argv, run.stdout, run.stderr)
        line = one_error_line(run.stderr)
        assert "cannot reach the broker" in line and f"127.0.0.1:{private_redis.port}" in line, line
    assert ledger(conn) == [] and snapshot(conn) == empty  # nothing written

    # Redis is back: a worker starts and the same command does the work
    private_redis.start()
    worker = Worker(env, tmp_path / "worker.log")
    try:
        run = run_tally(send, env)
        assert run.returncode == 0, run.stdout + run.stderr
        buckets = list(B.within("hourly", T0, end))
        clean = clean_outputs(make_db, T0, HOURS, buckets)
        assert_same_outputs(conn, clean)

        # Redis goes away under the running worker, and comes back: the worker reconnects by itself
        private_redis.stop()
        run = run_tally(send + ["--force"], env)
        assert run.returncode == 3 and "cannot reach the broker" in one_error_line(run.stderr)
        private_redis.start()
        run = run_tally(send + ["--force"], env)  # waits for the worker, which reconnects on its own
        assert run.returncode == 0, run.stdout + run.stderr
        assert worker.proc.poll() is None, "the worker died with its broker"
        wait_for(lambda: (log := worker.text()).count("Connected to redis://") >= 2
                 or "Connected to redis" in log.split("Cannot connect")[-1], 30, "the worker's reconnection line")
    finally:
        worker.stop()
    assert_same_outputs(conn, clean)
    assert_ledger_truthful(conn, buckets)
    forced = [r for r in ledger(conn) if r[5] == "backfill"]
    assert len(forced) == 2 * 3 * HOURS  # every step of every hour, once per accepted send
