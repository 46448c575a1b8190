"""Which database tally talks to, and how it connects.

``TALLY_DATABASE_URL`` names a PostgreSQL server; without it an embedded
PostgreSQL (the ``pgserver`` wheel) is started in ``$TALLY_HOME/pg`` and left
running for the next command (``tally db stop`` stops it).
"""
from __future__ import annotations

import contextlib
import os
import re
import urllib.parse
import warnings
from typing import Iterator

import psycopg

from .config import settings
from .errors import Unreachable

# platformdirs (used by pgserver) warns when XDG_RUNTIME_DIR is unset (containers, CI); its fallback is fine
warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")

_PASSWORD_KV = re.compile(r"(password\s*=\s*)('[^']*'|\S+)", re.IGNORECASE)


def redact(url: str) -> str:
    """The URL with any password replaced by ``***`` (URL or key=value form)."""
    if "://" in url:
        parts = urllib.parse.urlsplit(url)
        if parts.password is not None:
            user = urllib.parse.quote(parts.username or "", safe="")
            host = parts.hostname or ""
            if parts.port:
                host = f"{host}:{parts.port}"
            parts = parts._replace(netloc=f"{user}:***@{host}")
        url = urllib.parse.urlunsplit(parts)
    return _PASSWORD_KV.sub(r"\1***", url)


def scrub(text: str, url: str | None) -> str:
    """Remove the password of ``url`` from any text (error messages, logs)."""
    if url:
        password = None
        if "://" in url:
            password = urllib.parse.urlsplit(url).password
        else:
            m = _PASSWORD_KV.search(url)
            password = m.group(2).strip("'") if m else None
        if password:
            text = text.replace(password, "***")
            text = text.replace(urllib.parse.quote(password, safe=""), "***")
    return text


_embedded_url: str | None = None
created_embedded = False  # this process created a new, empty embedded database


def embedded_url() -> str:
    """Start (or find running) the embedded PostgreSQL and return its URL."""
    global _embedded_url, created_embedded
    if _embedded_url is None:
        try:
            import pgserver
        except ImportError as exc:  # pragma: no cover - dependency of the package
            raise Unreachable(f"embedded PostgreSQL unavailable: {exc}") from None
        home = settings().home / "pg"
        home.parent.mkdir(parents=True, exist_ok=True)
        created_embedded = not (home / "PG_VERSION").exists()
        try:
            server = pgserver.get_server(home, cleanup_mode=None)
        except Exception as exc:  # pgserver raises CalledProcessError/AssertionError
            raise Unreachable(f"cannot start the embedded PostgreSQL in {home}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        _embedded_url = server.get_uri("postgres")
    return _embedded_url


def database_url() -> str:
    return settings().database_url or embedded_url()


def describe() -> str:
    """One line naming the database in use, password hidden."""
    s = settings()
    if s.database_url:
        return f"database: {redact(s.database_url)}"
    return f"database: embedded PostgreSQL in {s.home / 'pg'}"


def connect(url: str | None = None, *, autocommit: bool = False, **kwargs) -> psycopg.Connection:
    """Open a connection; an unreachable server raises :class:`Unreachable` (exit 3)."""
    url = url or database_url()
    kwargs.setdefault("connect_timeout", 10)
    kwargs.setdefault("application_name", "tally")
    try:
        return psycopg.connect(url, autocommit=autocommit, **kwargs)
    except psycopg.OperationalError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise Unreachable(f"cannot reach {redact(url)}: {scrub(first, url)}") from None


_pools: dict[tuple[int, str], object] = {}


def pool(url: str):
    """This process's pool of autocommit UTC connections to ``url`` (a worker keeps its
    connections across tasks; a connection found dead — a database restart — is replaced
    when lent). Made on first use in each process: a forked worker child makes its own."""
    key = (os.getpid(), url)
    if key not in _pools:
        from psycopg_pool import ConnectionPool

        def configure(conn: psycopg.Connection) -> None:
            conn.execute("SET TIME ZONE 'UTC'")

        _pools[key] = ConnectionPool(url, min_size=0, max_size=4, timeout=10, name="tally", open=True,
                                     check=_check, configure=configure,
                                     kwargs=dict(autocommit=True, connect_timeout=10, application_name="tally"))
    return _pools[key]


def _check(conn: psycopg.Connection) -> None:
    """Before a pooled connection is lent: an idle connection has nothing to read unless the
    server said something (it is shutting down, it closed the socket, a notice); only then
    does it cost a round trip to find out whether it still works (raises if not)."""
    import select

    from psycopg_pool import ConnectionPool

    if conn.closed or conn.broken:
        raise psycopg.OperationalError("connection closed")
    if select.select([conn.fileno()], [], [], 0)[0]:
        ConnectionPool.check_connection(conn)


class Session:
    """One autocommit UTC connection, opened on first use and again when found broken: its own,
    or lent by this process's pool (``pooled``) and given back on :meth:`release`."""

    def __init__(self, url: str, pooled: bool = False):
        self.url = url
        self.pooled = pooled
        self._conn: psycopg.Connection | None = None

    @property
    def conn(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self.release()
            self._conn = self._acquire()
        return self._conn

    def _acquire(self) -> psycopg.Connection:
        if not self.pooled:
            conn = connect(self.url, autocommit=True)
            conn.execute("SET TIME ZONE 'UTC'")
            return conn
        from psycopg_pool import PoolTimeout

        try:
            return pool(self.url).getconn()
        except PoolTimeout:
            raise Unreachable(f"cannot reach {redact(self.url)}: no connection within 10 s") from None

    def release(self) -> None:
        """Give the connection back (pooled) or close it; the next use opens one again."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self.pooled:
            pool(self.url).putconn(conn)  # a broken or busy one is discarded by the pool
        else:
            conn.close()


@contextlib.contextmanager
def connection(url: str | None = None, *, autocommit: bool = False) -> Iterator[psycopg.Connection]:
    conn = connect(url, autocommit=autocommit)
    try:
        yield conn
    finally:
        conn.close()


def sqlalchemy_url(url: str) -> str:
    """The same server as a SQLAlchemy URL for Alembic (psycopg 3 driver)."""
    if "://" not in url:
        raise Unreachable("Alembic needs a URL of the form postgresql://user@host/db")
    scheme, rest = url.split("://", 1)
    return f"postgresql+psycopg://{rest}"
