"""Schema migrations (Alembic), run on tally's own connection."""
from __future__ import annotations

import re
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.util import CommandError
from sqlalchemy import create_engine, pool
from sqlalchemy.exc import OperationalError

from .db import database_url, redact, scrub, sqlalchemy_url
from .errors import InvalidInput, Unreachable

MIGRATIONS = Path(__file__).parent / "migrations"
_REVISION = re.compile(r"[A-Za-z0-9_@+.-]{1,64}")  # head, base, 0002, -1, branch@head


def _run(action, url: str | None, target: str) -> None:
    if not _REVISION.fullmatch(target or ""):
        raise InvalidInput(f"invalid revision {target!r}: expected head, base, a revision id or a relative step like -1")
    url = url or database_url()
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    engine = create_engine(sqlalchemy_url(url), poolclass=pool.NullPool)
    try:
        with engine.begin() as connection:
            cfg.attributes["connection"] = connection
            action(cfg, target)
    except OperationalError as exc:
        raise _unreachable(exc, url) from None
    except CommandError as exc:  # an unknown or ambiguous revision: the user's input, not a crash
        raise InvalidInput(f"invalid revision {target!r}: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc}") from None
    finally:
        engine.dispose()


def upgrade(url: str | None = None, target: str = "head") -> None:
    """Apply migrations up to ``target`` (idempotent on a migrated database)."""
    _run(command.upgrade, url, target)


def downgrade(url: str | None = None, target: str = "base") -> None:
    """Revert tally's tables (source tables are kept: they are the platform's data)."""
    _run(command.downgrade, url, target)


def head() -> str:
    """The newest revision this version of tally ships."""
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return ScriptDirectory.from_config(cfg).get_current_head()


def current(url: str | None = None) -> str | None:
    """The schema revision of the database (None: not migrated)."""
    from alembic.runtime.migration import MigrationContext

    url = url or database_url()
    engine = create_engine(sqlalchemy_url(url), poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    except OperationalError as exc:
        raise _unreachable(exc, url) from None
    finally:
        engine.dispose()


def _unreachable(exc: OperationalError, url: str) -> Unreachable:
    first = str(exc.orig).strip().splitlines()[0] if exc.orig and str(exc.orig).strip() else type(exc).__name__
    return Unreachable(f"cannot reach {redact(url)}: {scrub(first, url)}")
