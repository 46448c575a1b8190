"""Least-privilege database roles: a worker and a read-only dashboard (``tally db roles``).

* the **worker** role reads the source tables (``public.execution_logs``,
  ``analytics.user_activity``) and writes only what tally owns in ``analytics``:
  the output tables, the run ledger (insert and finish, never delete) and the
  change log (claim and clear marks);
* the **dashboard** role reads the output tables, the ledger and the change log,
  and can write nothing;
* the change-capture trigger function becomes SECURITY DEFINER, so the
  platform's own writer roles need no privilege on ``analytics``.

The grants are in ``sql/roles.sql``; role names are the only input, checked
here and quoted by :class:`psycopg.sql.Identifier`. Running it again converges
to exactly these privileges on tally's objects. See docs/SECURITY.md.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from psycopg import sql

from .db import connect
from .errors import InvalidInput
from .queries import query

DEFAULT_WORKER = "tally_worker"
DEFAULT_DASHBOARD = "tally_dashboard"

# PostgreSQL silently truncates longer names (NAMEDATALEN 64) and reserves pg_*; a plain
# name is also what a DBA types in pg_hba.conf. Quoting stays in place all the same.
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_$-]*")


def check_name(name: str, what: str) -> str:
    """``name`` if it is a usable role name, else InvalidInput (exit 2) naming it."""
    if not _NAME.fullmatch(name or "") or len(name.encode()) > 63:
        raise InvalidInput(f"invalid {what} role name {name!r}: use letters, digits, _ $ - "
                           "(not starting with a digit), at most 63 bytes")
    if name.lower().startswith("pg_"):
        raise InvalidInput(f"invalid {what} role name {name!r}: names starting with pg_ are reserved")
    if name.lower() in ("public", "current_user", "current_role", "session_user", "none"):
        raise InvalidInput(f"invalid {what} role name {name!r}: a reserved word")
    return name


@dataclass
class RolesPlan:
    """A worker and a dashboard role, and optionally a retention role: which named grants apply
    to which role."""

    worker: str
    dashboard: str
    retention: str | None = None

    @property
    def roles(self) -> list[tuple[str, str]]:
        """(role, what it is) in order."""
        return [(self.worker, "worker"), (self.dashboard, "dashboard")] + (
            [(self.retention, "retention")] if self.retention else [])

    @property
    def grants(self) -> list[tuple[str, str]]:
        """(role, query name) in order."""
        return [(self.worker, "roles_worker"), (self.dashboard, "roles_dashboard")] + (
            [(self.retention, "roles_retention")] if self.retention else [])


def plan(worker: str = DEFAULT_WORKER, dashboard: str = DEFAULT_DASHBOARD, retention: str | None = None) -> RolesPlan:
    """Check the names (no database needed)."""
    check_name(worker, "--worker")
    check_name(dashboard, "--dashboard")
    if retention is not None:
        check_name(retention, "--retention")
    names = [n for n in (worker, dashboard, retention) if n is not None]
    if len(set(names)) != len(names):
        raise InvalidInput(f"--worker, --dashboard and --retention must differ ({', '.join(names)})")
    return RolesPlan(worker, dashboard, retention)


def _for(role: str, name: str, worker: str | None = None) -> sql.Composed:
    """A named statement of sql/roles.sql with {role} (and {worker}) quoted as identifiers."""
    ids = {"role": sql.Identifier(role)}
    if "{worker}" in query(name):
        ids["worker"] = sql.Identifier(worker or DEFAULT_WORKER)
    return sql.SQL(query(name)).format(**ids)  # type: ignore[arg-type]


def _temporary(role: str, database: sql.Composable) -> sql.Composed:
    """GRANT TEMPORARY ON DATABASE to the worker role (sql/roles.sql)."""
    return sql.SQL(query("roles_worker_temporary")).format(database=database, role=sql.Identifier(role))  # type: ignore[arg-type]


def render(p: RolesPlan) -> str:
    """The SQL of a plan, as a DBA would review it."""
    parts = [f"-- if absent:\n{_for(role, 'roles_create').as_string(None)}" for role, _ in p.roles]
    parts += [_for(role, name, p.worker).as_string(None) for role, name in p.grants]
    parts.append(_temporary(p.worker, sql.SQL("<the database tally uses>")).as_string(None))  # type: ignore[arg-type]
    parts.append(query("roles_source_writers"))
    return "\n\n".join(parts)


def apply(url: str, p: RolesPlan) -> list[str]:
    """Create the roles that are missing and grant, in one transaction; return what was done."""
    done: list[str] = []
    with connect(url) as conn:
        with conn.transaction():
            for role, what in p.roles:
                if conn.execute(query("roles_exists"), dict(name=role)).fetchone()[0]:
                    done.append(f"{what} role {role}: exists, privileges on tally's objects reset")
                else:
                    conn.execute(_for(role, "roles_create"))
                    done.append(f"{what} role {role}: created (NOLOGIN; log in as a member of it)")
            for role, name in p.grants:
                conn.execute(_for(role, name, p.worker))
            conn.execute(_temporary(p.worker, sql.Identifier(conn.info.dbname)))
            conn.execute(query("roles_source_writers"))
    done.append(f"{p.worker}: reads public.execution_logs, analytics.user_activity; writes the output tables, "
                "analytics.aggregation_runs and analytics.bucket_state (insert, update) and analytics.dirty_log "
                "(update, delete)")
    done.append(f"{p.worker}: TEMPORARY on this database (the hourly steps' temporary tables)")
    done.append(f"{p.dashboard}: reads the output tables, analytics.aggregation_runs, analytics.bucket_state and "
                "analytics.dirty_log; "
                "writes nothing")
    if p.retention:
        done.append(f"{p.retention}: what {p.worker} may, and deletes source rows, hourly output rows and old ledger "
                    "rows, recording them in analytics.purged (to drop partitions it must own the source tables)")
    done.append("analytics.tally_mark_dirty(): SECURITY DEFINER, so source writers need no rights on analytics")
    return done
