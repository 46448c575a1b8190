"""Helpers for the console tests: ``tally serve`` in a subprocess, a database with real failures,
dirty hours and sealed history, login roles, Chromium.

Load with ``pytest_plugins = ["celery_support", "console_support"]``.
"""
from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import psycopg
import pytest
import requests
from psycopg import sql

from celery_support import FAULTS, TALLY, free_port, wait_for
from support import seed, with_db
from tally import buckets as B
from tally.rollups import Runner

UTC = dt.timezone.utc
HOUR = dt.timedelta(hours=1)
ARTIFACTS = Path(__file__).parent / "artifacts" / "console"
CHROMIUM = "/usr/bin/chromium"
# Chromium here: no sandbox (root in a container), no GPU, and no background connections (with
# them, the machine's network refuses many connections at a time and pages stall)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
AUTH = ("ops", "c0nsole-s3cret")


class Server:
    """``tally serve`` in a subprocess on a free port, logging to a file; stopped by ``stop()``."""

    def __init__(self, env: dict, log: Path, *args: str):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc = subprocess.Popen([TALLY, "serve", "--port", str(self.port), *args],
                                     env={**os.environ, "NO_COLOR": "1", **env}, stdout=log.open("wb"),
                                     stderr=subprocess.STDOUT)
        wait_for(lambda: self.proc.poll() is not None or self._up(), 60, f"tally serve on {self.base} ({log})")
        assert self.proc.poll() is None, f"tally serve exited with {self.proc.returncode}:\n{self.text()}"

    def _up(self) -> bool:
        try:
            return requests.get(f"{self.base}/healthz", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(self.base + path, timeout=60, **kw)

    def post(self, path: str, **kw) -> requests.Response:
        return requests.post(self.base + path, timeout=60, allow_redirects=False, **kw)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def current_hour() -> dt.datetime:
    return B.HOUR.floor(dt.datetime.now(UTC))


def populate(url: str, end: dt.datetime, hours: int = 30) -> dict:
    """Real history ending at ``end``: ``hours`` hours seeded and aggregated (and their whole days),
    then a step that fails for real (a trigger raises, SQLSTATE P0001, on its first attempt only),
    a late row that makes an hour dirty. Returns the hours it chose."""
    start = end - hours * HOUR
    failing, dirty = end - 5 * HOUR, end - 8 * HOUR
    seed(url, start, hours, per_hour=40, workspaces=5, events=60)
    with psycopg.connect(url, autocommit=True) as c:
        c.execute(FAULTS)
        c.execute("INSERT INTO public.test_fault VALUES ('user_activity', %s, 1, 'P0001')", (failing,))
    with Runner(url, trigger="schedule") as runner:
        for b in [*B.within("hourly", start, end), *B.within("daily", start, end)]:
            runner.run(b)
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("""INSERT INTO public.execution_logs (execution_id, workspace_id, user_id, agent_id, status,
                                                        started_at, duration, credits_used)
                     VALUES ('late-arrival', 'ws-0001', 'u1', 'a1', 'completed', %s, 2.5, 1.25)""",
                  (dirty + dt.timedelta(minutes=20),))
    return {"start": start, "end": end, "failing": failing, "dirty": dirty}


@pytest.fixture
def login_roles(admin_url):
    """Factory of LOGIN roles with a password (members of a group), dropped afterwards with their grants."""
    made: list[str] = []
    dbs: list[str] = []

    def make(kind: str, password: str, member_of: str | None = None, options: str = "LOGIN") -> str:
        name = f"tally_{kind}_{uuid.uuid4().hex[:8]}"
        statement = sql.SQL("CREATE ROLE {} " + options).format(sql.Identifier(name))
        if options == "LOGIN":
            statement += sql.SQL(" PASSWORD {}").format(sql.Literal(password))
        if member_of:
            statement += sql.SQL(" IN ROLE {}").format(sql.Identifier(member_of))
        with psycopg.connect(admin_url, autocommit=True) as c:
            c.execute(statement)
        made.append(name)
        return name

    make.dbs = dbs
    yield make
    for url in dbs:
        try:
            with psycopg.connect(url, autocommit=True) as c:
                for name in made:
                    c.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
        except psycopg.Error:
            pass
    with psycopg.connect(admin_url, autocommit=True) as c:
        for name in reversed(made):
            c.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


def url_as(url: str, user: str, password: str) -> str:
    """``url`` logged in as ``user`` with ``password``."""
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    netloc = f"{urllib.parse.quote(user, safe='')}:{urllib.parse.quote(password, safe='')}@{host}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def chromium_or_skip() -> str:
    """The Chromium binary, or skip naming the command that installs it."""
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        why = "no Chromium: `apt-get install chromium` (Debian) to run the browser tests"
        if os.environ.get("CI"):  # .ci/run installs it: in CI a missing browser is a failure, never a skip
            pytest.fail(why)
        pytest.skip(why)
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("Playwright for Python is missing: pip install -e '.[test]'")
    return CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")


__all__ = ["ARTIFACTS", "AUTH", "CHROMIUM_ARGS", "HOUR", "Server", "chromium_or_skip", "current_hour",
           "login_roles", "populate", "url_as", "with_db"]
