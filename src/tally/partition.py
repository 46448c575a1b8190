"""Partitioned sources: ``tally db partition`` and the helpers retention uses to drop whole partitions.

tally reads its sources only through ``WHERE <time> >= start AND <time> < end`` and writes them
only in ``tally seed`` (``ON CONFLICT DO NOTHING`` with no conflict target), so it works the same
on ``public.execution_logs`` and ``analytics.user_activity`` range-partitioned on their time
columns, however they were made (pg_partman, a DBA, or this module).

**Converting tally's own tables** (:func:`plan`, :func:`convert`). Only tables exactly as
migration 0001 creates them are converted (:func:`check`): the same columns (names, types,
NOT NULL, identity, defaults, in order), the same three indexes (primary key on ``id``,
``UNIQUE (execution_id)``, the time index), no CHECK or foreign keys (in or out), no views or
rules over them, no row security, no publication, no inheritance, and no trigger but tally's
(named ``tally_*``, calling a function in ``analytics``). Anything else means someone else
shaped the table, and what they added could not be carried over faithfully: refused (exit 2).

The conversion, for both tables:

1. ``<name>_partitioned`` is created with the same columns, defaults and identity, partitioned
   by range on ``started_at`` / ``created_at``, with one partition per UTC day from the first
   row's day to ``ahead`` days past the later of the last row's day and today (named
   ``<name>_pYYYYMMDD``, as pg_partman names them). A staging table left by an interrupted
   run (marked by its comment) is dropped first: the copy starts over.
2. The rows are copied one day per transaction (writers go on meanwhile), ids kept.
3. The keys are built on every partition at once: ``PRIMARY KEY (id, <time>)``,
   ``UNIQUE (execution_id, started_at)``, the time index.
4. One transaction: writers are locked out (readers are not); each day's row count and
   checksum (the sum of a 64-bit hash of each row's text) in the plain table is compared with
   its partition's (read back when the day was copied), a day that changed during the copy is
   copied again (and read back), and the totals must then be equal, else nothing is swapped. The identity continues above the old table's; the plain
   table becomes ``<name>_unpartitioned`` and the copy takes the name, its keys' and its
   sequence's names; the triggers (change capture), the owner and every table privilege
   move to the new table. Commit.
5. ``ANALYZE``; with ``drop_old`` the ``_unpartitioned`` tables are dropped, else kept (the
   command says how to drop them).

Every statement is a named query of ``sql/partition.sql``; identifiers are quoted by
:class:`psycopg.sql.Identifier` and come from this module's fixed table of sources, never
from input; dates are bound client-side.
"""
from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import psycopg
from psycopg import sql

from .errors import InvalidInput
from .queries import query
from .steps import SOURCES as STEP_SOURCES

UTC = dt.timezone.utc
DAY = dt.timedelta(days=1)
MAX_PARTITIONS = 1100  # daily partitions one conversion may create per table (three years)
MAX_AHEAD = 366


@dataclass(frozen=True)
class Source:
    schema: str
    name: str
    time: str  # the partition key
    columns: tuple[tuple[str, str, bool, str, str | None], ...]  # name, type, NOT NULL, identity, default
    indexes: tuple[str, ...]  # pg_get_indexdef of each, sorted

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def staging(self) -> str:
        return f"{self.name}_partitioned"

    @property
    def staging_name(self) -> str:
        return f"{self.schema}.{self.name}_partitioned"

    @property
    def old_name(self) -> str:
        return f"{self.schema}.{self.name}_unpartitioned"

    def partition(self, day: dt.date) -> str:
        return f"{self.name}_p{day:%Y%m%d}"


_TZ = "timestamp with time zone"
SOURCES = (  # tally's sources (steps.SOURCES: where and by which time) as migration 0001 makes them
    Source(*STEP_SOURCES["execution_logs"],
           (("id", "bigint", True, "d", None), ("execution_id", "text", True, "", None),
            ("workspace_id", "text", False, "", None), ("user_id", "text", False, "", None),
            ("agent_id", "text", False, "", None), ("status", "text", True, "", None),
            ("started_at", _TZ, True, "", None), ("completed_at", _TZ, False, "", None),
            ("duration", "double precision", False, "", None), ("credits_used", "numeric(18,4)", False, "", "0"),
            ("metadata", "jsonb", False, "", None), ("created_at", _TZ, False, "", "now()")),
           ("CREATE INDEX execution_logs_started_at_idx ON public.execution_logs USING btree (started_at)",
            "CREATE UNIQUE INDEX execution_logs_execution_id_key ON public.execution_logs USING btree (execution_id)",
            "CREATE UNIQUE INDEX execution_logs_pkey ON public.execution_logs USING btree (id)")),
    Source(*STEP_SOURCES["user_activity"],
           (("id", "bigint", True, "d", None), ("workspace_id", "text", False, "", None),
            ("user_id", "text", True, "", None), ("session_id", "text", False, "", None),
            ("event_type", "text", True, "", None), ("event_name", "text", False, "", None),
            ("page_path", "text", False, "", None), ("metadata", "jsonb", False, "", None),
            ("created_at", _TZ, True, "", "now()")),
           ("CREATE INDEX user_activity_created_at_idx ON analytics.user_activity USING btree (created_at)",
            "CREATE UNIQUE INDEX user_activity_pkey ON analytics.user_activity USING btree (id)")),
)


# ---- partitions of a partitioned source (retention drops whole ones) ------------------------------

class Partition(NamedTuple):
    schema: str
    name: str
    start: dt.datetime | None  # inclusive; None: MINVALUE (or a DEFAULT partition)
    end: dt.datetime | None  # exclusive; None: MAXVALUE (or a DEFAULT partition)
    is_default: bool = False

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


def source(table: str) -> Source:
    """The source of a name (``public.execution_logs``, ``analytics.user_activity`` or the bare
    names); anything else is invalid input."""
    for s in SOURCES:
        if table in (s.qualified, s.name):
            return s
    raise InvalidInput(f"unknown source table {table!r} (expected public.execution_logs or analytics.user_activity)")


def is_partitioned(conn: psycopg.Connection, table: str) -> bool:
    """Whether a source table is a partitioned table."""
    row = conn.execute(query("partition_table_kind"), dict(table=source(table).qualified)).fetchone()
    return bool(row) and row[0] == "p"


def partitions(conn: psycopg.Connection, table: str) -> list[Partition]:
    """The partitions of a source table range-partitioned on its time column, oldest first
    (a DEFAULT partition last, with no bounds); [] for a plain table. Bounds are read with
    ``pg_get_expr(relpartbound)`` from ``pg_inherits`` and parsed by PostgreSQL in this
    session. Only the first level: a partition partitioned again is listed as one."""
    rows = conn.execute(query("partitions_of"), dict(table=source(table).qualified)).fetchall()
    return [Partition(schema, name, lo, hi, bool(default)) for schema, name, lo, hi, default in rows]


def drop_partition(conn: psycopg.Connection, table: str, name: str) -> Partition:
    """Detach the partition ``name`` (``schema.name`` or the bare name) of a source table and
    drop it; return it. Its rows are gone, with no trigger fired: tally's change capture does
    not see it (retention drops only what it has decided to drop).

    Needs ownership of the partitioned table and of the partition (``tally db partition``
    gives every partition the owner of the table it replaced). On an autocommit connection
    and with no DEFAULT partition, ``DETACH ... CONCURRENTLY``: writers and readers of the
    other partitions go on while it waits for the transactions that use this one. Otherwise
    (PostgreSQL allows no concurrent detach then) ``DETACH`` and ``DROP`` in one transaction:
    an ACCESS EXCLUSIVE lock on the parent for as long as the two statements take."""
    s = source(table)
    parts = partitions(conn, s.qualified)
    match = [p for p in parts if name in (p.qualified, p.name)]
    if not match:
        raise InvalidInput(f"{name!r} is not a partition of {s.qualified}")
    p = match[0]
    if conn.autocommit and not any(q.is_default for q in parts):
        try:
            conn.execute(sql.SQL(query("partition_detach_concurrently")).format(  # type: ignore[arg-type]
                table=sql.Identifier(s.schema, s.name), partition=sql.Identifier(p.schema, p.name)))
        except psycopg.errors.ObjectNotInPrerequisiteState:  # an earlier detach was interrupted: finish it
            conn.execute(sql.SQL(query("partition_detach_finalize")).format(  # type: ignore[arg-type]
                table=sql.Identifier(s.schema, s.name), partition=sql.Identifier(p.schema, p.name)))
        conn.execute(sql.SQL(query("partition_drop")).format(partition=sql.Identifier(p.schema, p.name)))  # type: ignore[arg-type]
        return p
    with conn.transaction():
        conn.execute(sql.SQL(query("partition_detach")).format(  # type: ignore[arg-type]
            table=sql.Identifier(s.schema, s.name), partition=sql.Identifier(p.schema, p.name)))
        conn.execute(sql.SQL(query("partition_drop")).format(partition=sql.Identifier(p.schema, p.name)))  # type: ignore[arg-type]
    return p


# ---- is this tally's own table? -----------------------------------------------------------------

def check(conn: psycopg.Connection, s: Source) -> None:
    """Refuse (InvalidInput, exit 2) a source that is absent, already partitioned, or not exactly
    as tally's migration 0001 creates it (see the module's docstring)."""
    row = conn.execute(query("partition_table_kind"), dict(table=s.qualified)).fetchone()
    if row is None:
        raise InvalidInput(f"{s.qualified} does not exist: run `tally db upgrade` first")
    kind, is_child, has_children, row_security, views, constraints, publications, sequence = row
    if kind == "p":
        raise InvalidInput(f"{s.qualified} is already partitioned: tally works on it as it is; nothing to do")
    why = None
    if kind != "r":
        why = f"it is not a table (relkind {kind})"
    elif is_child or has_children:
        why = "it takes part in inheritance or partitioning"
    elif row_security:
        why = "it has row security"
    elif views:
        why = f"views or rules read it ({views})"
    elif constraints:
        why = f"it has constraints or foreign keys tally does not make ({constraints})"
    elif publications:
        why = f"it is published ({publications})"
    elif sequence != f"{s.qualified}_id_seq":
        why = f"its id is not tally's identity column (sequence {sequence})"
    if why is None:
        columns = tuple(tuple(r) for r in conn.execute(query("partition_table_columns"), dict(table=s.qualified)))
        if columns != s.columns:
            extra = [c[0] for c in columns if c not in s.columns] + [c[0] for c in s.columns if c not in columns]
            why = f"its columns differ from tally's ({', '.join(dict.fromkeys(extra)) or 'their order'})"
    if why is None:
        indexes = tuple(r[0] for r in conn.execute(query("partition_table_indexes"), dict(table=s.qualified)))
        if indexes != s.indexes:
            other = [i.split(" ON ")[0].split()[-1] for i in indexes if i not in s.indexes]
            missing = [i.split(" ON ")[0].split()[-1] for i in s.indexes if i not in indexes]
            why = "its indexes differ from tally's (" + ", ".join(
                [f"has {n}" for n in other] + [f"lacks {n}" for n in missing]) + ")"
    if why is None:
        foreign = [name for name, schema, _ in conn.execute(query("partition_table_triggers"), dict(table=s.qualified))
                   if not (name.startswith("tally_") and schema == "analytics")]
        if foreign:
            why = f"it has triggers tally does not make ({', '.join(foreign)})"
    if why:
        raise InvalidInput(f"{s.qualified} was not created by tally: {why}; `tally db partition` converts only "
                           "tally's own tables; partition it yourself (docs/OPERATIONS.md, Partitioned sources)")
    taken = conn.execute("SELECT to_regclass(%s) IS NOT NULL", [s.old_name]).fetchone()[0]
    if taken:
        raise InvalidInput(f"{s.old_name} exists: drop or rename it first (the plain table is kept under that name)")
    staging = conn.execute(query("partition_staging_kind"), dict(table=s.staging_name)).fetchone()
    if staging is not None and not (staging[0] == "p" and staging[1]):
        raise InvalidInput(f"{s.staging_name} exists and is not a staging table of `tally db partition`: "
                           "drop or rename it first")


# ---- the plan ---------------------------------------------------------------------------------------

@dataclass
class Statement:
    """One statement of the conversion: a named query of sql/partition.sql, its identifiers (from
    SOURCES) quoted by psycopg.sql, and its parameters, bound client-side (dates tally computed)."""

    phase: str  # prepare, copy, keys, swap, after
    source: str | None
    composed: sql.Composable
    params: dict | None = None
    day: dt.date | None = None  # a copy statement's day

    def statement(self) -> sql.Composable:
        """The statement to execute (with ``params``, through a psycopg.ClientCursor)."""
        return self.composed

    def render(self, conn: psycopg.Connection) -> str:
        with psycopg.ClientCursor(conn) as cur:
            text = cur.mogrify(self.composed, self.params) if self.params else self.composed.as_string(conn)
        lines = text.strip().splitlines()
        while lines and lines[0].startswith("--"):  # the named query's header and comment: sql/partition.sql has them
            lines.pop(0)
        return "\n".join(lines).rstrip(";") + ";"


@dataclass
class TablePlan:
    source: Source
    rows: int
    first: dt.date | None  # the first and last UTC day with rows
    last: dt.date | None
    days: list[dt.date]  # one partition each
    drop_staging: bool = False


@dataclass
class Plan:
    tables: list[TablePlan]
    ahead: int
    today: dt.date
    statements: list[Statement] = field(default_factory=list)


def _bounds(day: dt.date) -> dict:
    lo = dt.datetime(day.year, day.month, day.day, tzinfo=UTC)
    return dict(lo=lo, hi=lo + DAY)


def _day_statements(s: Source, day: dt.date) -> Statement:
    return Statement("prepare", s.qualified, sql.SQL(query("partition_create_day")).format(  # type: ignore[arg-type]
        table=sql.Identifier(s.schema, s.staging), partition=sql.Identifier(s.schema, s.partition(day))),
        _bounds(day), day)


def _copy(s: Source, day: dt.date) -> Statement:
    return Statement("copy", s.qualified, sql.SQL(query(f"partition_copy_{s.name}")), _bounds(day), day)  # type: ignore[arg-type]


def plan(conn: psycopg.Connection, *, ahead: int = 7, today: dt.date | None = None) -> Plan:
    """Check both source tables and return the statements that would partition them by UTC day
    (nothing is changed). ``ahead``: days of empty partitions past the later of the last row's
    day and ``today`` (default: the current UTC day)."""
    if not 0 <= ahead <= MAX_AHEAD:
        raise InvalidInput(f"invalid --ahead {ahead}: expected 0 to {MAX_AHEAD} days")
    today = today or dt.datetime.now(UTC).date()
    for s in SOURCES:
        check(conn, s)
    tables = []
    for s in SOURCES:
        first, last, rows, infinite = conn.execute(sql.SQL(query("partition_table_span")).format(  # type: ignore[arg-type]
            table=sql.Identifier(s.schema, s.name), key=sql.Identifier(s.time))).fetchone()
        if infinite:
            raise InvalidInput(f"{s.qualified} has {infinite} row(s) at {s.time} = ±infinity, which no daily partition "
                               "can hold: fix or delete them first")
        start = first or today
        end = max(last or today, today) + dt.timedelta(days=ahead)
        n = (end - start).days + 1
        if n > MAX_PARTITIONS:
            raise InvalidInput(f"{s.qualified} would need {n:,} daily partitions ({start} .. {end}, more than "
                               f"{MAX_PARTITIONS:,}): partition it yourself (docs/OPERATIONS.md, Partitioned sources)")
        staging = conn.execute(query("partition_staging_kind"), dict(table=s.staging_name)).fetchone()
        tables.append(TablePlan(s, rows, first, last, [start + i * DAY for i in range(n)],
                                drop_staging=staging is not None))
    p = Plan(tables, ahead, today)
    for t in tables:
        s = t.source
        if t.drop_staging:
            p.statements.append(Statement("prepare", s.qualified, sql.SQL(query("partition_drop_staging")).format(  # type: ignore[arg-type]
                table=sql.Identifier(s.schema, s.staging))))
        p.statements.append(Statement("prepare", s.qualified, sql.SQL(query(f"partition_create_{s.name}"))))  # type: ignore[arg-type]
        p.statements += [_day_statements(s, d) for d in t.days]
    for t in tables:
        if t.first is not None:
            p.statements += [_copy(t.source, d) for d in t.days if t.first <= d <= t.last]
    for t in tables:
        p.statements.append(Statement("keys", t.source.qualified, sql.SQL(query(f"partition_keys_{t.source.name}"))))  # type: ignore[arg-type]
    p.statements.append(Statement("swap", None, sql.SQL(query("partition_lock"))))  # type: ignore[arg-type]
    for t in tables:
        s = t.source
        p.statements.append(Statement("swap", s.qualified, sql.SQL(query("partition_identity")).format(  # type: ignore[arg-type]
            table=sql.Identifier(s.schema, s.name)), dict(copy=s.staging_name, plain=s.qualified)))
    for t in tables:
        p.statements.append(Statement("swap", t.source.qualified, sql.SQL(query(f"partition_swap_{t.source.name}"))))  # type: ignore[arg-type]
    p.statements.append(Statement("swap", None, sql.SQL(query("partition_carry_over"))))  # type: ignore[arg-type]
    p.statements.append(Statement("after", None, sql.SQL(query("partition_analyze"))))  # type: ignore[arg-type]
    return p


def render(conn: psycopg.Connection, p: Plan, *, drop_old: bool = False) -> str:
    """The plan as a DBA would review it: every statement, in order, with its transaction."""
    out = [f"-- tally db partition: public.execution_logs and analytics.user_activity by UTC day "
           f"(--ahead {p.ahead}, today {p.today})"]
    for t in p.tables:
        span = f"{t.first} .. {t.last}" if t.first else "no rows"
        out.append(f"-- {t.source.qualified}: {t.rows:,} row(s), {span}; {len(t.days)} partition(s) "
                   f"{t.days[0]} .. {t.days[-1]}")
    titles = {
        "prepare": "-- 1. the partitioned copies and their daily partitions (one transaction)",
        "copy": "-- 2. the rows, one day per transaction (writers go on)",
        "keys": "-- 3. the keys, built on every partition at once (one transaction)",
        "swap": "-- 4. one transaction: writers wait from the LOCK to the COMMIT. Before the identity and the "
                "swap, each UTC day's count and checksum\n--    in the plain table (partition_day_sums in "
                "sql/partition.sql) is compared with its partition's, read back right after its copy in 2;\n--    "
                "a day that changed since is emptied and copied again; unequal totals roll everything back",
        "after": "-- 5. statistics",
    }
    phase = None
    for st in p.statements:
        if st.phase != phase:
            if phase in ("prepare", "keys", "swap"):
                out.append("COMMIT;")
            phase = st.phase
            out.append("")
            out.append(titles[phase])
            if phase in ("prepare", "keys", "swap"):
                out.append("BEGIN;")
        if phase == "copy":
            out.append("BEGIN; " + st.render(conn) + " COMMIT;")
        else:
            out.append(st.render(conn))
    triggers = [(s.qualified, name, d) for s in SOURCES
                for name, _, d in conn.execute(query("partition_table_triggers"), dict(table=s.qualified))]
    if triggers:
        out.append("-- (the DO block in step 4 moves these triggers to the new tables:)")
        out += [f"--   {d}" for _, _, d in triggers]
    if drop_old:
        out.append(query("partition_drop_old"))
    else:
        out.append("-- the plain tables are kept as public.execution_logs_unpartitioned and "
                   "analytics.user_activity_unpartitioned (--drop-old drops them)")
    return "\n".join(out) + "\n"


# ---- the conversion -----------------------------------------------------------------------------------

@dataclass
class Converted:
    source: str
    rows: int
    checksum: int
    partitions: int
    recopied: list[dt.date]


@dataclass
class Result:
    tables: list[Converted]
    seconds: dict[str, float]  # per phase
    dropped_old: bool


def _day_sums(conn: psycopg.Connection, schema: str, name: str, key: str) -> dict[dt.date, tuple[int, int]]:
    """Each UTC day's (rows, checksum) of a table (partition_day_sums)."""
    q = sql.SQL(query("partition_day_sums")).format(table=sql.Identifier(schema, name), key=sql.Identifier(key))  # type: ignore[arg-type]
    return {day: (n, int(checksum)) for day, n, checksum in conn.execute(q)}


def _run(conn: psycopg.Connection, st: Statement) -> None:
    with psycopg.ClientCursor(conn) as cur:
        cur.execute(st.statement(), st.params)


def convert(conn: psycopg.Connection, *, ahead: int = 7, today: dt.date | None = None, drop_old: bool = False,
            progress: Callable[[str, int, int], None] | None = None) -> Result:
    """Partition both source tables by UTC day (see the module's docstring); ``conn`` must not
    be in a transaction (each phase commits its own). A failure before the swap's commit leaves
    the plain tables in place and serving; the staging copies are dropped by the next run."""
    conn.autocommit = True
    conn.execute("SET TIME ZONE 'UTC'")  # the checksums hash rows' text: one time zone for both sides
    p = plan(conn, ahead=ahead, today=today)
    say = progress or (lambda phase, done, total: None)
    seconds: dict[str, float] = {}
    by_phase: dict[str, list[Statement]] = {}
    for st in p.statements:
        by_phase.setdefault(st.phase, []).append(st)

    t0 = time.monotonic()
    with conn.transaction():
        for st in by_phase["prepare"]:
            _run(conn, st)
    seconds["prepare"] = time.monotonic() - t0

    t0 = time.monotonic()
    copies = by_phase.get("copy", [])
    # each copied day's count and checksum, read back from its partition in the copy's own
    # transaction: nothing but this conversion writes the staging tables, so the swap below
    # scans only the plain tables while writers wait
    copied: dict[str, dict[dt.date, tuple[int, int]]] = {t.source.qualified: {} for t in p.tables}
    sources = {t.source.qualified: t.source for t in p.tables}
    for i, st in enumerate(copies):
        s = sources[st.source]
        with conn.transaction():
            _run(conn, st)
            copied[s.qualified].update(_day_sums(conn, s.schema, s.partition(st.day), s.time))
        say("copy", i + 1, len(copies))
    seconds["copy"] = time.monotonic() - t0

    t0 = time.monotonic()
    with conn.transaction():
        for st in by_phase["keys"]:
            _run(conn, st)
    seconds["keys"] = time.monotonic() - t0

    t0 = time.monotonic()
    converted = []
    with conn.transaction():
        swap = by_phase["swap"]
        _run(conn, swap[0])  # LOCK: writers wait from here
        for t in p.tables:
            s = t.source
            old = _day_sums(conn, s.schema, s.name, s.time)
            new = copied[s.qualified]
            have = set(t.days)
            recopied = []
            for day in sorted(set(old) | set(new)):
                if old.get(day) == new.get(day):
                    continue
                if day not in have:  # a row for a day past the plan came in during the copy
                    _run(conn, _day_statements(s, day))
                    have.add(day)
                _run(conn, Statement("swap", s.qualified, sql.SQL(query("partition_clear_day")).format(  # type: ignore[arg-type]
                    table=sql.Identifier(s.schema, s.staging), key=sql.Identifier(s.time)), _bounds(day)))
                _run(conn, _copy(s, day))
                new.pop(day, None)
                new.update(_day_sums(conn, s.schema, s.partition(day), s.time))
                recopied.append(day)
            total_old = (sum(n for n, _ in old.values()), sum(c for _, c in old.values()))
            total_new = (sum(n for n, _ in new.values()), sum(c for _, c in new.values()))
            if total_old != total_new or old != new:
                raise RuntimeError(f"{s.qualified}: the partitioned copy differs ({total_new[0]:,} rows, checksum "
                                   f"{total_new[1]}) from the table ({total_old[0]:,} rows, checksum {total_old[1]}): "
                                   "nothing was swapped")
            converted.append(Converted(s.qualified, total_old[0], total_old[1], len(have), recopied))
        for st in swap[1:]:
            _run(conn, st)
        say("swap", 1, 1)
    seconds["swap"] = time.monotonic() - t0

    t0 = time.monotonic()
    for st in by_phase["after"]:
        _run(conn, st)
    if drop_old:
        conn.execute(query("partition_drop_old"))
    seconds["after"] = time.monotonic() - t0
    return Result(converted, seconds, drop_old)
