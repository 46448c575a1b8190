"""Realistic, deterministic synthetic source data for tally.

``seed()`` writes rows into ``public.execution_logs`` and
``analytics.user_activity`` for the hours ``[start, start + hours)``:

* many workspaces (``ws-0001`` …) whose workload is Zipf-skewed, each with its
  own Zipf-popular users (5–50) and agents (2–20);
* a status mix of ~85 % success variants in mixed case (``Completed``,
  ``SUCCESS``, ``succeeded`` …), ~8 % failures (``failed``, ``error``,
  ``timeout``, ``timed_out`` …) and ~7 % other states (``running``,
  ``pending``, ``queued`` with no ``completed_at``/``duration``; ``cancelled``
  ones stopped after a while);
* heavy-tailed durations (lognormal, median ≈ 2 s, tail up to the 1 h clamp),
  credits roughly proportional to duration, a few NULL ids and credits;
* activity sessions of 3–15 events seconds to minutes apart (some cross an
  hour boundary), with duplicates, sessionless events and NULL workspaces.

Determinism: every hour is generated from its own ``random.Random`` keyed by
the seed and the absolute hour (plus the workspace count for the static
population), so the same seed and arguments always give the same rows.
Idempotence: every row has a deterministic key — an execution its
``execution_id`` (``seed{S}-{YYYYMMDDHH}-{n}``), an event its ``id`` (a number
above 2**62, far from any identity sequence, made of the seed's arguments, the
hour and the event's place in it) — and rows already present are skipped by
whatever unique key the table has, so seeding a range again leaves both tables
as after the first time, and fills in what an interrupted seed left out.

Speed and memory: rows are rendered as COPY text in Python and streamed with
``cursor.copy`` every ``_FLUSH_ROWS`` rows (memory stays flat whatever the
range); executions go through a temporary table and one
``INSERT … SELECT … ON CONFLICT DO NOTHING`` per batch. Whole hours commit
together every ``_COMMIT_ROWS`` rows or so: a stop request (``should_stop``) or
an error rolls back only the hours not committed yet, and a later seed of the
same range writes them.
"""

from __future__ import annotations

import math
import zlib
import uuid
from bisect import bisect_right
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from itertools import accumulate
from random import Random
from typing import Callable

import psycopg

__all__ = ["SeedResult", "seed"]

_HOUR_US = 3_600_000_000
_YEAR_ONE = datetime(1, 1, 1, tzinfo=timezone.utc)
_MAX_DURATION_US = 3_600_000_000  # 1 h clamp
_MIN_DURATION_US = 1_000  # 0.001 s clamp
_FLUSH_ROWS = 100_000  # rows buffered before a COPY round-trip
_COMMIT_ROWS = 10_000  # whole hours commit once this many rows are written (small hours go together)

# --------------------------------------------------------------------------
# vocabularies

# (status, weight %, kind) — kind: 0 success, 1 failure, 2 timeout,
# 3 unfinished (no completed_at / duration), 4 cancelled (stopped early)
_STATUSES: list[tuple[str, float, int]] = [
    ("completed", 40.0, 0), ("Completed", 10.0, 0), ("COMPLETED", 3.0, 0),
    ("success", 15.0, 0), ("SUCCESS", 5.0, 0), ("Success", 2.0, 0),
    ("succeeded", 8.0, 0), ("Succeeded", 2.0, 0),
    ("failed", 3.0, 1), ("FAILED", 0.5, 1), ("Failed", 0.5, 1),
    ("error", 1.5, 1), ("ERROR", 0.3, 1), ("failure", 0.2, 1),
    ("timeout", 1.0, 2), ("TIMEOUT", 0.3, 2), ("timed_out", 0.7, 2),
    ("running", 2.5, 3), ("RUNNING", 0.3, 3), ("pending", 1.2, 3),
    ("queued", 1.2, 3), ("QUEUED", 0.2, 3),
    ("cancelled", 1.2, 4), ("Cancelled", 0.2, 4), ("canceled", 0.2, 4),
]

# (model, credits per second, tokens per second, base credits)
_MODELS: list[tuple[str, float, float, float]] = [
    ("gpt-4o", 0.0120, 55.0, 0.0100),
    ("gpt-4o-mini", 0.0015, 90.0, 0.0010),
    ("claude-3-5-sonnet", 0.0110, 60.0, 0.0090),
    ("claude-3-haiku", 0.0012, 110.0, 0.0010),
    ("llama-3.1-70b", 0.0040, 70.0, 0.0030),
    ("mistral-large", 0.0060, 65.0, 0.0050),
]
_MODEL_WEIGHTS = [30, 25, 20, 10, 8, 7]

_TRIGGERS = ["api", "api", "api", "schedule", "schedule", "ui", "webhook"]
_ERRORS = ["RateLimitError", "ToolExecutionError", "ContextLengthExceeded",
           "UpstreamError", "InvalidToolOutput", "OutOfMemory"]
_TIMEOUT_LIMITS_S = [30, 60, 120, 300, 300, 600, 900, 1800, 3600]

_AGENT_NAMES = ["support-triage", "sql-analyst", "code-reviewer", "web-researcher",
                "invoice-extractor", "email-drafter", "lead-scorer", "doc-summarizer",
                "ticket-router", "data-cleaner", "qa-bot", "meeting-notes",
                "release-notes", "churn-predictor", "translator", "onboarding-guide",
                "log-inspector", "pricing-assistant", "kb-writer", "scheduler"]

_PAGES = ["/dashboard", "/agents", "/agents/{agent}", "/agents/{agent}/edit",
          "/runs", "/runs/{run}", "/usage", "/billing", "/settings",
          "/settings/api-keys", "/integrations", "/team", "/docs/getting-started",
          "/docs/api"]
_PAGE_WEIGHTS = [22, 14, 16, 4, 12, 10, 5, 3, 4, 2, 3, 2, 2, 1]
_CLICKS = ["click_run_agent", "click_new_agent", "click_save", "click_export_csv",
           "click_filter", "click_view_logs", "click_copy_api_key", "click_invite_member",
           "click_upgrade_plan", "click_retry_run"]
_API_CALLS = ["POST /v1/agents/{agent}/runs", "GET /v1/runs", "GET /v1/runs/{run}",
              "GET /v1/agents", "PATCH /v1/agents/{agent}", "GET /v1/usage"]
_LOGIN_METHODS = ["password", "google", "sso", "github"]
_BROWSERS = ["chrome", "chrome", "chrome", "firefox", "safari", "safari", "edge"]

# event types after the first event of a session
_EVENT_TYPES = ["page_view", "click", "run_agent", "api_call", "login"]
_EVENT_WEIGHTS = [45, 28, 10, 14, 3]

_P_NULL_ID = 0.01  # each of workspace_id / user_id / agent_id on executions
_P_NULL_CREDITS = 0.005
_P_NULL_SESSION = 0.05
_P_NULL_EVENT_WS = 0.01
_P_DUPLICATE = 0.04


# --------------------------------------------------------------------------
# public API

# Bounds of one seed, so a typo cannot fill the disk or the memory (exit 2 names them).
MAX_PER_HOUR = 1_000_000
MAX_WORKSPACES = 100_000


@dataclass
class SeedResult:
    executions: int  # execution rows inserted (conflicting execution_ids skipped)
    events: int  # activity rows inserted
    start: datetime
    end: datetime
    executions_skipped: int = 0  # already present (same seed, same hour)
    events_skipped: int = 0  # already present
    hours_seeded: int = 0  # hours written (and committed) by this call
    stopped: bool = False  # a stop was asked for: the hours after hours_seeded were not written


class _Stop(Exception):
    """A stop was asked for: roll back the hours not committed yet."""


def seed(
    conn: psycopg.Connection,
    *,
    start: datetime,
    hours: int,
    workspaces: int = 20,
    executions_per_hour: int = 500,
    events_per_hour: int = 1500,
    seed: int = 42,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> SeedResult:
    """Write synthetic executions and activity events for ``[start, start+hours)``.

    Hours already seeded with the same arguments are skipped. Whole hours commit
    together; on an error (or ``should_stop()``) the hours not committed yet are rolled
    back. ``progress(done_hours, hours)`` is called after each committed batch.
    """
    start = _validate(start, hours, workspaces, executions_per_hour,
                      events_per_hour, seed)
    end = start + timedelta(hours=hours)
    world = _World(seed, workspaces)
    writer = _Writer(conn, should_stop or (lambda: False))
    # "YYYY-MM-DD HH:" of every hour of the window, for fast timestamp text (strftime's %Y
    # drops the zero padding of years before 1000, which PostgreSQL then misreads)
    prefixes = [f"{t.year:04d}-{t:%m-%d %H}:" for t in (start + timedelta(hours=h) for h in range(hours))]
    end_us = hours * _HOUR_US
    # the event ids' high bits: this seed's arguments (a different seed or population, other ids)
    id_key = (1 << 62) | (zlib.crc32(f"{seed}:{workspaces}".encode()) & 0x7FFF) << 47
    result = SeedResult(0, 0, start, end)
    try:
        writer.begin()
        pending = 0
        for h in range(hours):
            hour_dt = start + timedelta(hours=h)
            tag = f"{hour_dt.year:04d}{hour_dt:%m%d%H}"
            if executions_per_hour:
                _gen_executions(world, writer, seed, tag, prefixes[h], executions_per_hour)
            if events_per_hour:
                hour_number = (hour_dt - _YEAR_ONE) // timedelta(hours=1)
                _gen_events(world, writer, seed, tag, h, prefixes, end_us, events_per_hour,
                            id_key | hour_number << 20)
            pending += 1
            writer.check()
            if writer.pending_rows() + writer.sent_since_commit >= _COMMIT_ROWS or h == hours - 1:
                writer.flush()
                conn.commit()
                writer.committed()
                result.hours_seeded += pending
                pending = 0
                if progress is not None:
                    progress(result.hours_seeded, hours)
    except _Stop:
        conn.rollback()
        writer.rolled_back()
        result.stopped = True
    except BaseException:
        try:
            conn.rollback()
        except Exception:  # pragma: no cover - connection already broken
            pass
        raise
    result.executions = writer.exec_inserted
    result.events = writer.events_inserted
    result.executions_skipped = writer.exec_sent - writer.exec_inserted
    result.events_skipped = writer.events_sent - writer.events_inserted
    return result


# --------------------------------------------------------------------------
# validation

def _validate(start, hours, workspaces, executions_per_hour, events_per_hour,
              seed_value) -> datetime:
    def _int(name, value, minimum):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")

    _int("hours", hours, 1)
    _int("workspaces", workspaces, 1)
    _int("executions_per_hour", executions_per_hour, 0)
    _int("events_per_hour", events_per_hour, 0)
    for name, value, limit in (("executions_per_hour", executions_per_hour, MAX_PER_HOUR),
                               ("events_per_hour", events_per_hour, MAX_PER_HOUR),
                               ("workspaces", workspaces, MAX_WORKSPACES)):
        if value > limit:
            raise ValueError(f"{name}={value:,} is above the limit of {limit:,}")
    if isinstance(seed_value, bool) or not isinstance(seed_value, int):
        raise ValueError(f"seed must be an integer, got {seed_value!r}")
    if not isinstance(start, datetime):
        raise ValueError(f"start must be a datetime, got {start!r}")
    if start.tzinfo is None or start.utcoffset() is None:
        raise ValueError(f"start must be timezone-aware (UTC), got {start.isoformat()}")
    start_utc = start.astimezone(timezone.utc)
    if start_utc.minute or start_utc.second or start_utc.microsecond:
        raise ValueError(f"start must be on the hour (UTC), got {start.isoformat()}")
    try:
        start_utc + timedelta(hours=hours)
    except OverflowError:
        raise ValueError(f"hours={hours} runs past the year 9999 from "
                         f"{start_utc.isoformat()}") from None
    return start_utc


# --------------------------------------------------------------------------
# the static population: workspaces, users, agents

def _zipf_cum(n: int, s: float, rng: Random, jitter: float = 0.15) -> list[float]:
    weights = [rng.lognormvariate(0.0, jitter) / (k ** s) for k in range(1, n + 1)]
    return list(accumulate(weights))


class _Agent:
    __slots__ = ("agent_id", "model", "credit_rate", "tok_rate", "base",
                 "mu", "long_p")

    def __init__(self, agent_id, rng: Random):
        self.agent_id = agent_id
        model = rng.choices(_MODELS, weights=_MODEL_WEIGHTS)[0]
        self.model = model[0]
        self.credit_rate = model[1] * rng.uniform(0.7, 1.4)
        self.tok_rate = model[2] * rng.uniform(0.6, 1.5)
        self.base = model[3]
        # per-agent median duration around 2 s
        self.mu = math.log(2.0) + rng.gauss(0.0, 0.45)
        # share of long-running (minutes-scale) jobs
        self.long_p = rng.choice([0.005, 0.01, 0.02, 0.03, 0.06])


class _Workspace:
    __slots__ = ("ws_id", "users", "user_cum", "user_tot", "agents",
                 "agent_cum", "agent_tot")


class _World:
    def __init__(self, seed_value: int, workspaces: int):
        rng = Random(f"tally-seed:{seed_value}:world:{workspaces}")
        self.workspaces: list[_Workspace] = []
        user_counter = 0
        agent_counter = 0
        for i in range(1, workspaces + 1):
            ws = _Workspace()
            ws.ws_id = f"ws-{i:04d}"
            n_users = min(50, max(5, int(rng.paretovariate(1.1) * 5)))
            n_agents = min(20, max(2, int(rng.paretovariate(1.2) * 2.5)))
            ws.users = []
            for _ in range(n_users):
                user_counter += 1
                ws.users.append(f"user-{user_counter:05d}")
            ws.agents = []
            for _ in range(n_agents):
                agent_counter += 1
                name = rng.choice(_AGENT_NAMES)
                ws.agents.append(_Agent(f"agt-{agent_counter:05d}-{name}", rng))
            ws.user_cum = _zipf_cum(n_users, 1.1, rng)
            ws.user_tot = ws.user_cum[-1]
            ws.agent_cum = _zipf_cum(n_agents, 1.3, rng)
            ws.agent_tot = ws.agent_cum[-1]
            self.workspaces.append(ws)
        # workload skew across workspaces: Zipf over a shuffled ranking
        order = list(range(workspaces))
        rng.shuffle(order)
        weights = [0.0] * workspaces
        for rank, idx in enumerate(order, start=1):
            weights[idx] = rng.lognormvariate(0.0, 0.3) / (rank ** 1.05)
        self.ws_cum = list(accumulate(weights))
        self.ws_tot = self.ws_cum[-1]
        self.status_cum = list(accumulate(w for _, w, _ in _STATUSES))
        self.status_tot = self.status_cum[-1]
        self.page_cum = list(accumulate(_PAGE_WEIGHTS))
        self.event_cum = list(accumulate(_EVENT_WEIGHTS))


# --------------------------------------------------------------------------
# COPY plumbing

_TMP = "_tally_seed_exec"
_TMP_EVENTS = "_tally_seed_events"
_EXEC_COLS = ("execution_id, workspace_id, user_id, agent_id, status, "
              "started_at, dur_us, credits_used, metadata")
_EVENT_COLS_TYPED = ("workspace_id text, user_id text, session_id text, event_type text, event_name text,"
                     " page_path text, metadata jsonb, created_at timestamptz")
_EVENT_COLS = ("workspace_id, user_id, session_id, event_type, event_name, "
               "page_path, metadata, created_at")


class _Writer:
    def __init__(self, conn: psycopg.Connection, should_stop: Callable[[], bool]):
        self.conn = conn
        self.should_stop = should_stop
        self.exec_lines: list[str] = []
        self.event_lines: list[str] = []
        self.exec_sent = 0
        self.exec_inserted = 0
        self.events_sent = 0
        self.events_inserted = 0
        self.sent_since_commit = 0  # rows sent since the last commit
        self._committed = (0, 0, 0, 0)  # the counts as of the last commit

    def begin(self) -> None:
        with self.conn.cursor() as cur:
            cur.execute(
                f"CREATE TEMP TABLE IF NOT EXISTS {_TMP} ("
                " execution_id text, workspace_id text, user_id text,"
                " agent_id text, status text, started_at timestamptz,"
                " dur_us bigint, credits_used numeric(18,4), metadata jsonb"
                ")"
            )
            cur.execute(f"CREATE TEMP TABLE IF NOT EXISTS {_TMP_EVENTS} (id bigint, {_EVENT_COLS_TYPED})")

    def pending_rows(self) -> int:
        return len(self.exec_lines) + len(self.event_lines)

    def check(self) -> None:
        if self.should_stop():
            raise _Stop

    def maybe_flush(self) -> None:
        """Called from the generators' loops: bounded memory, and a prompt stop."""
        self.check()
        if self.pending_rows() >= _FLUSH_ROWS:
            self.flush()

    def committed(self) -> None:
        self.sent_since_commit = 0
        self._committed = (self.exec_sent, self.exec_inserted, self.events_sent, self.events_inserted)

    def rolled_back(self) -> None:
        self.exec_lines.clear()
        self.event_lines.clear()
        self.exec_sent, self.exec_inserted, self.events_sent, self.events_inserted = self._committed

    def flush(self) -> None:
        self.sent_since_commit += self.pending_rows()
        with self.conn.cursor() as cur:
            if self.exec_lines:
                with cur.copy(f"COPY {_TMP} ({_EXEC_COLS}) FROM STDIN") as cp:
                    cp.write("".join(self.exec_lines))
                self.exec_sent += len(self.exec_lines)
                self.exec_lines.clear()  # in place: generators hold a reference
                # no conflict target: whatever unique key the table has (execution_id alone, or with
                # started_at in a partitioned table) skips what is already there
                cur.execute(
                    "INSERT INTO public.execution_logs (execution_id,"
                    " workspace_id, user_id, agent_id, status, started_at,"
                    " completed_at, duration, credits_used, metadata, created_at)"
                    " SELECT execution_id, workspace_id, user_id, agent_id, status,"
                    " started_at, started_at + dur_us * interval '1 microsecond',"
                    " dur_us::double precision / 1000000, credits_used, metadata,"
                    " started_at"
                    f" FROM {_TMP}"
                    " ON CONFLICT DO NOTHING"
                )
                self.exec_inserted += max(cur.rowcount, 0)
                cur.execute(f"TRUNCATE {_TMP}")
            if self.event_lines:
                with cur.copy(f"COPY {_TMP_EVENTS} (id, {_EVENT_COLS}) FROM STDIN") as cp:
                    cp.write("".join(self.event_lines))
                self.events_sent += len(self.event_lines)
                self.event_lines.clear()
                # explicit ids, whether the column is GENERATED BY DEFAULT or ALWAYS
                cur.execute(f"INSERT INTO analytics.user_activity (id, {_EVENT_COLS}) OVERRIDING SYSTEM VALUE"
                            f" SELECT id, {_EVENT_COLS} FROM {_TMP_EVENTS} ON CONFLICT DO NOTHING")
                self.events_inserted += max(cur.rowcount, 0)
                cur.execute(f"TRUNCATE {_TMP_EVENTS}")


# --------------------------------------------------------------------------
# generators (hot loops: locals bound for speed)

def _gen_executions(world: _World, writer: _Writer, seed_value: int, tag: str,
                    prefix: str, n: int) -> None:
    rng = Random(f"tally-seed:{seed_value}:exec:{tag}:{len(world.workspaces)}")
    rand = rng.random
    lognorm = rng.lognormvariate
    choice = rng.choice
    randint = rng.randint
    bis = bisect_right
    ws_list, ws_cum, ws_tot = world.workspaces, world.ws_cum, world.ws_tot
    st_cum, st_tot = world.status_cum, world.status_tot
    statuses = _STATUSES
    out = writer.exec_lines
    append = out.append
    id_prefix = f"seed{seed_value}-{tag}-"
    width = max(6, len(str(n - 1)))
    p_null = _P_NULL_ID
    # chronological order within the hour: ids follow start times
    offsets = sorted(int(rand() * _HOUR_US) for _ in range(n))
    for i, off in enumerate(offsets):
        ws = ws_list[bis(ws_cum, rand() * ws_tot)]
        user = ws.users[bis(ws.user_cum, rand() * ws.user_tot)]
        agent = ws.agents[bis(ws.agent_cum, rand() * ws.agent_tot)]
        status, _, kind = statuses[bis(st_cum, rand() * st_tot)]

        if kind == 3:  # running / pending / queued: not finished
            dur_txt = "\\N"
            credits = 0.0
            tokens = 0
            extra = ""
        else:
            if kind == 0 or kind == 4:
                if rand() < agent.long_p:
                    d = lognorm(math.log(90.0), 1.1)  # minutes-scale jobs
                else:
                    d = lognorm(agent.mu, 1.15)
                if kind == 4:
                    d *= rand()  # cancelled part-way
                extra = ""
            elif kind == 1:
                d = lognorm(agent.mu - 0.4, 1.3)
                extra = f', "error": "{choice(_ERRORS)}"'
            else:  # timeout: stopped at a configured limit
                d = choice(_TIMEOUT_LIMITS_S) + rand() * 0.5
                extra = ', "error": "Timeout"'
            dur_us = int(d * 1_000_000)
            if dur_us < _MIN_DURATION_US:
                dur_us = _MIN_DURATION_US
            elif dur_us > _MAX_DURATION_US:
                dur_us = _MAX_DURATION_US
            dur_txt = str(dur_us)
            secs = dur_us / 1_000_000
            noise = lognorm(0.0, 0.25)
            credits = (agent.base + agent.credit_rate * secs) * noise
            tokens = int(agent.tok_rate * secs * noise) + randint(50, 400)
        credits_txt = "\\N" if rand() < _P_NULL_CREDITS else f"{credits:.4f}"
        ws_txt = "\\N" if rand() < p_null else ws.ws_id
        user_txt = "\\N" if rand() < p_null else user
        agent_txt = "\\N" if rand() < p_null else agent.agent_id
        m, rem = divmod(off, 60_000_000)
        s, us = divmod(rem, 1_000_000)
        trig = _TRIGGERS[int(rand() * 7)]
        append(
            f"{id_prefix}{i:0{width}d}\t{ws_txt}\t{user_txt}\t{agent_txt}\t"
            f"{status}\t{prefix}{m:02d}:{s:02d}.{us:06d}+00\t{dur_txt}\t"
            f"{credits_txt}\t"
            f'{{"model": "{agent.model}", "tokens": {tokens}, '
            f'"trigger": "{trig}"{extra}}}\n'
        )
        if (i & 0x3FFF) == 0x3FFF:
            writer.maybe_flush()


def _gen_events(world: _World, writer: _Writer, seed_value: int, tag: str,
                h: int, prefixes: list[str], end_us: int, quota: int, id_base: int) -> None:
    rng = Random(f"tally-seed:{seed_value}:events:{tag}:{len(world.workspaces)}")
    rand = rng.random
    lognorm = rng.lognormvariate
    choice = rng.choice
    randint = rng.randint
    getrandbits = rng.getrandbits
    bis = bisect_right
    ws_list, ws_cum, ws_tot = world.workspaces, world.ws_cum, world.ws_tot
    page_cum, page_tot = world.page_cum, world.page_cum[-1]
    ev_cum, ev_tot = world.event_cum, world.event_cum[-1]
    out = writer.event_lines
    append = out.append
    hour_base = h * _HOUR_US
    emitted = 0
    next_check = 16384
    while emitted < quota:
        ws = ws_list[bis(ws_cum, rand() * ws_tot)]
        user = ws.users[bis(ws.user_cum, rand() * ws.user_tot)]
        session = str(uuid.UUID(int=getrandbits(128), version=4))
        browser = choice(_BROWSERS)
        t = hour_base + int(rand() * _HOUR_US)
        n_events = randint(3, 15)
        page = "/dashboard"
        agent = ws.agents[bis(ws.agent_cum, rand() * ws.agent_tot)].agent_id
        for k in range(n_events):
            if k:
                gap = lognorm(math.log(20.0), 1.2)  # seconds to minutes
                if gap < 0.2:
                    gap = 0.2
                elif gap > 900.0:
                    gap = 900.0
                t += int(gap * 1_000_000)
            if t >= end_us:
                break  # the session runs past the seeded window
            if k == 0:
                etype = "login" if rand() < 0.35 else "page_view"
            else:
                etype = _EVENT_TYPES[bis(ev_cum, rand() * ev_tot)]
            if etype == "page_view":
                page = _PAGES[bis(page_cum, rand() * page_tot)]
                if rand() < 0.3:  # moves on to another agent of the workspace
                    agent = ws.agents[bis(ws.agent_cum, rand() * ws.agent_tot)].agent_id
                if "{" in page:
                    page = page.format(agent=agent, run=f"{getrandbits(32):08x}")
                name = "page_view"
                path = page
                meta = (f'{{"browser": "{browser}", '
                        f'"load_ms": {int(lognorm(5.5, 0.6))}}}')
            elif etype == "click":
                name = choice(_CLICKS)
                path = page
                meta = f'{{"browser": "{browser}"}}'
            elif etype == "run_agent":
                name = "run_agent"
                path = page
                meta = f'{{"agent_id": "{agent}", "source": "ui"}}'
            elif etype == "api_call":
                name = choice(_API_CALLS).format(agent=agent,
                                                 run=f"{getrandbits(32):08x}")
                path = "\\N"
                code = 200 if rand() < 0.95 else choice((400, 401, 429, 500))
                meta = (f'{{"status_code": {code}, '
                        f'"latency_ms": {int(lognorm(4.5, 0.8))}}}')
            else:  # login
                name = "login"
                path = "/login"
                page = "/dashboard"
                meta = f'{{"method": "{choice(_LOGIN_METHODS)}"}}'
            if rand() < _P_NULL_EVENT_WS or (etype == "login" and rand() < 0.2):
                ws_txt = "\\N"
            else:
                ws_txt = ws.ws_id
            sess_txt = "\\N" if rand() < _P_NULL_SESSION else session
            hidx, rem = divmod(t, _HOUR_US)
            m, rem = divmod(rem, 60_000_000)
            s, us = divmod(rem, 1_000_000)
            line = (f"{ws_txt}\t{user}\t{sess_txt}\t{etype}\t{name}\t{path}\t"
                    f"{meta}\t{prefixes[hidx]}{m:02d}:{s:02d}.{us:06d}+00\n")
            append(f"{id_base | emitted}\t{line}")
            emitted += 1
            if emitted >= quota:
                break
            if rand() < _P_DUPLICATE:  # double-fired event: the same content, a row of its own
                append(f"{id_base | emitted}\t{line}")
                emitted += 1
                if emitted >= quota:
                    break
        if emitted >= next_check:  # every ~16 k events: bounded memory, a prompt stop
            next_check = emitted + 16384
            writer.maybe_flush()
