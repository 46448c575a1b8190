"""Settings read from the environment (names are part of SPEC)."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidInput


def _int(name: str, default: int, minimum: int = 0) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidInput(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise InvalidInput(f"{name}={raw!r} must be >= {minimum}")
    return value


def _float(name: str, default: float, minimum: float = 0.0) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise InvalidInput(f"{name}={raw!r} is not a number") from None
    if not value >= minimum:
        raise InvalidInput(f"{name}={raw!r} must be >= {minimum}")
    return value


_STEP_TIMEOUT = "TALLY_STATEMENT_TIMEOUT_"
_KEYWORDS = re.compile(r"\s*(\w+\s*=\s*('([^'\\]|\\.)*'|[^\s']+)\s*)+")
_QUEUE = re.compile(r"[A-Za-z0-9_.:-]{1,200}")


def _database_url() -> str | None:
    """TALLY_DATABASE_URL, checked for its shape (a postgresql:// URL or key=value pairs)."""
    raw = os.environ.get("TALLY_DATABASE_URL") or None
    if raw is None:
        return None
    if "://" in raw:
        if not raw.split("://", 1)[0] in ("postgresql", "postgres"):
            raise InvalidInput("TALLY_DATABASE_URL must be a postgresql:// URL (or key=value pairs like "
                               "'host=… dbname=…'); it starts with "
                               f"{raw.split('://', 1)[0]!r}://")
    elif not _KEYWORDS.fullmatch(raw):
        raise InvalidInput("TALLY_DATABASE_URL is neither a postgresql:// URL nor key=value pairs like "
                           "'host=127.0.0.1 dbname=analytics'")
    return raw


def _home() -> Path:
    raw = os.environ.get("TALLY_HOME")
    if raw:
        return Path(raw).expanduser().absolute()
    import platformdirs  # the user's data directory: the same embedded database from any folder

    return Path(platformdirs.user_data_dir("tally"))


def _optional_int(name: str, minimum: int) -> int | None:
    raw = os.environ.get(name)
    return None if raw is None or raw == "" else _int(name, 0, minimum)


def _choice(name: str, default: str, pattern: re.Pattern, what: str) -> str:
    raw = os.environ.get(name) or default
    if not pattern.fullmatch(raw):
        raise InvalidInput(f"{name}={raw!r} is not {what}")
    return raw


@dataclass(frozen=True)
class Settings:
    database_url: str | None
    home: Path
    broker_url: str
    max_retries: int
    retry_delay: float
    alert_webhook: str | None
    flower_auth: str | None
    catchup_days: int
    lock_wait: float  # seconds a run waits for a bucket lock held by another run
    statement_timeout: float  # seconds per step statement, 0 = none
    max_range_days: int  # longest range backfill/verify/status accept
    step_timeouts: dict[str, float]  # TALLY_STATEMENT_TIMEOUT_<STEP>: step name -> seconds
    queue: str  # the Celery queue tally's tasks go to and its worker consumes
    task_time_limit: float  # soft time limit of a task (s); the hard one is a minute later
    visibility_timeout: float  # Redis hands an unacknowledged task to another worker after this (s)
    broker_prefix: str | None  # prefix of every Redis key of tally's Celery
    seal_after_days: int  # a bucket ok this long after it ended is sealed: final history
    raw_retention_days: int | None  # retention deletes source rows of sealed hours older than this (None: never)
    hourly_retention_days: int | None  # ... and hourly output rows whose day, week and month are sealed
    ledger_retention_days: int  # ... and ledger history older than this (never a bucket's current state)
    web_auth: str | None = None  # TALLY_WEB_AUTH: user:password of the console (tally serve)

    def statement_timeout_of(self, step: str) -> float:
        """The statement timeout of ``step`` (its own, else TALLY_STATEMENT_TIMEOUT), 0 = none."""
        return self.step_timeouts.get(step, self.statement_timeout)

    @classmethod
    def from_env(cls) -> "Settings":
        return cls(
            database_url=_database_url(),
            home=_home(),
            broker_url=os.environ.get("TALLY_BROKER_URL") or "redis://127.0.0.1:6379/0",
            max_retries=_int("TALLY_MAX_RETRIES", 3),
            retry_delay=_float("TALLY_RETRY_DELAY", 300.0),
            alert_webhook=os.environ.get("TALLY_ALERT_WEBHOOK") or None,
            flower_auth=os.environ.get("TALLY_FLOWER_AUTH") or None,
            catchup_days=_int("TALLY_CATCHUP_DAYS", 7),
            lock_wait=_float("TALLY_LOCK_WAIT", 30.0),
            statement_timeout=_float("TALLY_STATEMENT_TIMEOUT", 0.0),
            max_range_days=_int("TALLY_MAX_RANGE_DAYS", 400, minimum=1),
            step_timeouts={name[len(_STEP_TIMEOUT):].lower(): _float(name, 0.0)
                           for name in sorted(os.environ) if name.startswith(_STEP_TIMEOUT) and os.environ[name]},
            queue=_choice("TALLY_QUEUE", "tally", _QUEUE, "a queue name (letters, digits, _ . : -)"),
            task_time_limit=_float("TALLY_TASK_TIME_LIMIT", 3000.0, minimum=1),
            visibility_timeout=_float("TALLY_VISIBILITY_TIMEOUT", 3600.0, minimum=1),
            broker_prefix=os.environ.get("TALLY_BROKER_PREFIX") or None,
            seal_after_days=_int("TALLY_SEAL_AFTER_DAYS", 30, minimum=1),
            raw_retention_days=_optional_int("TALLY_RAW_RETENTION_DAYS", 1),
            hourly_retention_days=_optional_int("TALLY_HOURLY_RETENTION_DAYS", 1),
            ledger_retention_days=_int("TALLY_LEDGER_RETENTION_DAYS", 90, minimum=1),
            web_auth=os.environ.get("TALLY_WEB_AUTH") or None,
        ).checked()

    def checked(self) -> "Settings":
        """The rules between settings (one line naming them, exit 2)."""
        if self.seal_after_days < self.catchup_days:
            raise InvalidInput(f"TALLY_SEAL_AFTER_DAYS={self.seal_after_days} is below TALLY_CATCHUP_DAYS="
                               f"{self.catchup_days}: catch-up would look for work in sealed history")
        if self.raw_retention_days is not None and self.raw_retention_days < self.seal_after_days:
            raise InvalidInput(f"TALLY_RAW_RETENTION_DAYS={self.raw_retention_days} is below TALLY_SEAL_AFTER_DAYS="
                               f"{self.seal_after_days}: source rows must outlive the hours that may still change")
        return self


_cached: tuple[tuple, Settings] | None = None


def settings() -> Settings:
    """The settings of the current environment (read again whenever it changed)."""
    global _cached
    key = tuple(getattr(os.environ, "_data", os.environ).items())  # raw bytes: no decoding per call
    if _cached is None or _cached[0] != key:
        _cached = (key, Settings.from_env())
    return _cached[1]
