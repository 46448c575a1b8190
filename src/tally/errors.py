"""The kinds of failure a user can see, each mapped to one exit code, and which failures are transient."""
from __future__ import annotations


class TallyError(Exception):
    """Base class; ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class InvalidInput(TallyError, ValueError):
    """A bad argument: one line naming the value; nothing was written."""

    exit_code = 2


class Unreachable(TallyError):
    """A database or broker cannot be reached (the message never holds a password)."""

    exit_code = 3


# SQLSTATE classes (and one state) that a second try can cure (SPEC, Celery): connection
# exception, transaction rollback (serialization failure, deadlock), insufficient resources,
# operator intervention (statement timeout, admin shutdown), lock not available.
TRANSIENT_CLASSES = ("08", "40", "53", "57")
TRANSIENT_STATES = ("55P03",)


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a database error (None for anything else, or a connection lost without one)."""
    return getattr(exc, "sqlstate", None)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` may not happen on a second try: a lost or refused connection, a
    serialization failure or deadlock, a lock or statement timeout, an admin shutdown,
    exhausted resources. A data, constraint or SQL error (classes 22, 23, 42, …), invalid
    input or a bug is permanent: retrying it only delays its alert."""
    if isinstance(exc, Unreachable):
        return True
    if isinstance(exc, InvalidInput):
        return False
    state = sqlstate(exc)
    if state is None:
        import psycopg  # only a database error carries a SQLSTATE; a lost connection may not

        return isinstance(exc, psycopg.OperationalError)
    return state[:2] in TRANSIENT_CLASSES or state in TRANSIENT_STATES
