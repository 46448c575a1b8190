"""Shared fixtures: a real PostgreSQL, one throwaway database per test.

Where the suite finds PostgreSQL: ``TALLY_TEST_ADMIN_URL`` if set, else the
machine's server at 127.0.0.1:5432 (user postgres); if none answers, an
embedded PostgreSQL (pgserver) under the system temp dir. A migrated template
database is built once per session; each test gets a copy (CREATE DATABASE ...
TEMPLATE) and it is dropped afterwards.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import psycopg
import pytest

# The shared fixture modules get pytest's assertion messages; registered here, before any test
# module (or tests/faults) imports them.
pytest.register_assert_rewrite("celery_support", "console_support", "support")

from hypothesis import settings  # noqa: E402

from support import throwaway_db  # noqa: E402
from tally import migrate  # noqa: E402

# Most tests use fixed dates, months in the past: sealing history (TALLY_SEAL_AFTER_DAYS, 30 by
# default) would freeze them. The lifecycle tests set it themselves; subprocesses inherit this.
os.environ.setdefault("TALLY_SEAL_AFTER_DAYS", "36500")

# Property tests run the same examples on every run (CI included); TALLY_HYPOTHESIS=random
# searches afresh (with the example database) for a longer hunt.
settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("random", derandomize=False)
settings.load_profile(os.environ.get("TALLY_HYPOTHESIS", "ci"))


def _admin_url() -> str:
    url = os.environ.get("TALLY_TEST_ADMIN_URL")
    if url:
        return url
    local = "postgresql://postgres@127.0.0.1:5432/postgres"
    try:
        psycopg.connect(local, connect_timeout=3).close()
        return local
    except psycopg.OperationalError:
        import pgserver

        server = pgserver.get_server(Path(tempfile.gettempdir()) / "tally-test-pg", cleanup_mode=None)
        return server.get_uri("postgres")


@pytest.fixture(scope="session")
def admin_url() -> str:
    return _admin_url()


@pytest.fixture(scope="session")
def template_db(admin_url):
    """The name of a database migrated to head, copied for every test."""
    with throwaway_db(admin_url, prefix="tally_tpl") as url:
        migrate.upgrade(url)
        yield url.rsplit("/", 1)[1].split("?")[0]


@pytest.fixture
def make_db(admin_url, template_db):
    """Factory of throwaway migrated databases (all dropped at teardown)."""
    with contextlib.ExitStack() as stack:
        yield lambda: stack.enter_context(throwaway_db(admin_url, template_db))


@pytest.fixture
def db_url(make_db, monkeypatch) -> str:
    """A fresh migrated database; TALLY_DATABASE_URL points at it for the test."""
    url = make_db()
    monkeypatch.setenv("TALLY_DATABASE_URL", url)
    return url


@pytest.fixture
def conn(db_url):
    with psycopg.connect(db_url, autocommit=True) as c:
        c.execute("SET TIME ZONE 'UTC'")
        yield c


@pytest.fixture
def empty_db(admin_url, monkeypatch):
    """A fresh database with no schema at all."""
    with throwaway_db(admin_url, prefix="tally_e") as url:
        monkeypatch.setenv("TALLY_DATABASE_URL", url)
        yield url
