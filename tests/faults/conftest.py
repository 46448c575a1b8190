"""Fixtures of the fault suite: a database with fault triggers, a private PostgreSQL, a private Redis.

The machine's PostgreSQL (127.0.0.1:5432) and Redis (6379) are shared with other test
runs: the scenarios that stop a server use private ones on other ports/sockets.
"""
from __future__ import annotations

import psycopg
import pytest

from fault_support import Faults, PrivatePostgres, PrivateRedis, install_faults


@pytest.fixture
def faulty(make_db, monkeypatch):
    """(url, Faults): a migrated database with the fault triggers; TALLY_DATABASE_URL points at it."""
    url = make_db()
    install_faults(url)
    monkeypatch.setenv("TALLY_DATABASE_URL", url)
    faults = Faults(url)
    yield url, faults
    faults.close()


@pytest.fixture
def conn(faulty):
    """Here: a connection to the ``faulty`` database (overrides tests/conftest.py's)."""
    with psycopg.connect(faulty[0], autocommit=True) as c:
        c.execute("SET TIME ZONE 'UTC'")
        yield c


# ---- a private PostgreSQL and a private Redis that a test may stop and start ------------------------------

@pytest.fixture(scope="module")
def private_pg(tmp_path_factory):
    pg = PrivatePostgres(tmp_path_factory.mktemp("private-pg"))
    yield pg
    pg.close()


@pytest.fixture
def private_redis():
    r = PrivateRedis()
    yield r
    r.close()
