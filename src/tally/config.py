"""Settings read from the environment (names are part of SPEC)."""
from __future__ import annotations

import os
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
    web_auth: str | None = None  # TALLY_WEB_AUTH: user:password of the console (tally serve)

    def statement_timeout_of(self, step: str) -> float:
        """The statement timeout of ``step`` (its own, else TALLY_STATEMENT_TIMEOUT), 0 = none."""
        return self.step_timeouts.get(step, self.statement_timeout)

    @classmethod
    def from_env(cls) -> "Settings":
        return cls(
            database_url=os.environ.get("TALLY_DATABASE_URL") or None,
            home=Path(os.environ.get("TALLY_HOME") or ".tally").absolute(),
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
            web_auth=os.environ.get("TALLY_WEB_AUTH") or None,
        )


def settings() -> Settings:
    return Settings.from_env()
