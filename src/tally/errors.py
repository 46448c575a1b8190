"""The three kinds of failure a user can see, each mapped to one exit code."""


class TallyError(Exception):
    """Base class; ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class InvalidInput(TallyError, ValueError):
    """A bad argument: one line naming the value; nothing was written."""

    exit_code = 2


class Unreachable(TallyError):
    """A database or broker cannot be reached (the message never holds a password)."""

    exit_code = 3
