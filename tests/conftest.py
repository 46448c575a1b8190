"""Shared fixtures: a real PostgreSQL, one throwaway database per test.

Where the suite finds PostgreSQL: ``TALLY_TEST_ADMIN_URL`` if set, else the
machine's server at 127.0.0.1:5432 (user postgres); if none answers, an
embedded PostgreSQL (pgserver) under the system temp dir. A migrated template
database is built once per session; each test gets a copy (CREATE DATABASE ...
TEMPLATE) and it is dropped afterwards.
"""
from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

import psycopg
import pytest

from tally import migrate


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


def _with_db(url: str, name: str) -> str:
    base, _, query = url.partition("?")
    base = base.rsplit("/", 1)[0]
    return f"{base}/{name}" + (f"?{query}" if query else "")


@pytest.fixture(scope="session")
def admin_url() -> str:
    return _admin_url()


@pytest.fixture(scope="session")
def template_db(admin_url):
    name = f"tally_tpl_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    migrate.upgrade(_with_db(admin_url, name))
    yield name
    with psycopg.connect(admin_url, autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def make_db(admin_url, template_db):
    """Factory of throwaway migrated databases (all dropped at teardown)."""
    made: list[str] = []

    def make() -> str:
        name = f"tally_t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(admin_url, autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
        made.append(name)
        return _with_db(admin_url, name)

    yield make
    with psycopg.connect(admin_url, autocommit=True) as c:
        for name in made:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


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
    name = f"tally_e_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    url = _with_db(admin_url, name)
    monkeypatch.setenv("TALLY_DATABASE_URL", url)
    yield url
    with psycopg.connect(admin_url, autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
