"""Security: parameterised SQL only, no leaked passwords, least-privilege roles, Flower's bind.

- Every statement tally sends is static text (a named query, a literal, or a composition
  whose identifiers come from a fixed registry); input only ever travels as a bound
  parameter. Proved on the source (AST) and by feeding SQL-injection strings through every
  CLI argument and every source text column.
- A password-bearing database URL never shows in anything a command writes: stdout,
  stderr, logs, the ledger, exception messages (a real role with a password on the server).
- ``tally db roles``: a worker role that can run rollups and cannot write the source; a
  dashboard role that can read outputs and write nothing.
"""
from __future__ import annotations

import ast
import datetime as dt
import os
import random
import re
import subprocess
import sys
import threading
import urllib.parse
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

import reference as ref
from celery_support import Worker, client, free_port, wait_for
from outputs import source_rows
from strategies import insert_events, insert_executions
from support import check_hour, check_period, copy_executions, heavy_rows, with_db
from test_fuzz_cli import assert_rejected, fingerprint, invoke
import tally
from tally import buckets as B
from tally import queries, tasks
from tally.errors import InvalidInput, Unreachable
from tally.rollups import Runner
from tally.steps import STEPS

pytest_plugins = ["celery_support"]

UTC = dt.timezone.utc
HOUR = dt.timedelta(hours=1)
H = dt.datetime(2026, 11, 25, 1, tzinfo=UTC)
TALLY = str(Path(sys.executable).with_name("tally"))
SRC = Path(tally.__file__).parent

INJECTIONS = [
    "'; DROP TABLE public.execution_logs; --",
    "2026-11-25T01:00Z'; DELETE FROM analytics.aggregation_runs; --",
    "1; TRUNCATE analytics.execution_metrics_hourly",
    "\" OR 1=1 --",
    "execution_metrics' OR '1'='1",
    "hourly,daily); DROP SCHEMA analytics CASCADE; --",
    "$$; DROP TABLE analytics.dirty_log; $$",
    "%(start)s", "{table}", "\\'; SELECT pg_sleep(10); --",
    "x\x00'; DROP TABLE t; --",
]


# ---- only parameterised SQL (static proof) ------------------------------------------------------

def _module_constants(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) for t in node.targets):
            if _static(node.value, {}, names):
                names.update(t.id for t in node.targets)
    return names


def _static(node, local: dict, consts: set[str]) -> bool:
    """Whether an expression can only be SQL text fixed in the source (never input)."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, ast.JoinedStr):  # f-strings may only splice module constants
        return all(isinstance(v, ast.Constant) or (isinstance(v, ast.FormattedValue) and isinstance(v.value, ast.Name)
                                                   and v.value.id in consts) for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _static(node.left, local, consts) and _static(node.right, local, consts)
    if isinstance(node, ast.Name):
        if node.id in consts:
            return True
        values = local.get(node.id)
        return bool(values) and all(_static(v, local, consts) for v in values)
    if isinstance(node, ast.Call):
        f = node.func
        if isinstance(f, ast.Name) and f.id in ("query", "_for", "_temporary"):  # named queries from sql/*.sql
            return True
        if isinstance(f, ast.Attribute) and f.attr in ("statement", "read_statement", "materialize_statement") and all(
                isinstance(a, (ast.Name, ast.Constant)) for a in node.args):
            # Step.statement([first_run]) / read_statement() / materialize_statement(): the registry's SQL files (a flag
            # only picks a variant of the file's text)
            return True
        if isinstance(f, ast.Attribute) and f.attr == "SQL":  # sql.SQL(<static>)
            return all(_static(a, local, consts) for a in node.args)
        if isinstance(f, ast.Attribute) and f.attr == "format":
            # sql.SQL(..).format(x=sql.Identifier(..)) or "<constant>".format(<constants>)
            def ok(arg) -> bool:
                if isinstance(arg, ast.Call) and isinstance(arg.func, ast.Attribute) and arg.func.attr == "Identifier":
                    return True
                return isinstance(arg, ast.Constant)
            return _static(f.value, local, consts) and all(ok(a) for a in node.args) and all(
                ok(k.value) for k in node.keywords)
    return False


def _sql_calls():
    """(file, line, first argument, its function's local assignments, module constants) of every SQL call."""
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        consts = _module_constants(tree)
        for fn in [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))]:
            local: dict[str, list] = {}
            for n in ast.walk(fn):
                if isinstance(n, ast.Assign):
                    for t in n.targets:
                        if isinstance(t, ast.Name):
                            local.setdefault(t.id, []).append(n.value)
            for n in ast.walk(fn):
                if (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                        and n.func.attr in ("execute", "executemany", "copy") and n.args):
                    yield path.relative_to(SRC), n.lineno, n.args[0], local, consts


def test_every_statement_tally_sends_is_static_text():
    calls = list(_sql_calls())
    assert len(calls) > 20  # the walker sees tally's SQL (ledger, steps, roles, seed, migrations, ...)
    bad = [f"{path}:{line}: {ast.unparse(arg)}" for path, line, arg, local, consts in calls
           if not _static(arg, local, consts)]
    assert not bad, "SQL built from something that is not fixed text:\n" + "\n".join(bad)


def test_the_static_check_catches_sql_built_from_input():
    """The checker above is not vacuous: these shapes are refused."""
    for code in ("conn.execute(f'SELECT * FROM t WHERE x = {value}')", "conn.execute('SELECT ' + name)",
                 "conn.execute('SELECT %s' % value)", "conn.execute('SELECT {}'.format(value))",
                 "conn.execute(sql.SQL('SELECT {x}').format(x=sql.SQL(value)))"):
        call = ast.parse(code).body[0].value
        assert not _static(call.args[0], {}, set()), code


def test_named_queries_splice_only_registry_identifiers():
    """The only {placeholders} in sql/*.sql are identifiers from the step registry, a quoted role, the
    quoted name of the database tally is connected to (roles_worker_temporary), or a source table,
    its time column and its daily partitions (retention_*, partition_*: from the sources' registry)."""
    found = {name: set(re.findall(r"\{([a-z_]+)\}", text)) for name, text in queries.all_queries().items()}
    assert {p for ps in found.values() for p in ps} <= {"table", "key", "role", "database", "worker", "column",
                                                        "partition"}, found
    assert all(n.startswith(("period_metrics", "verify_period", "roles_", "retention_", "partition_"))
               for n, ps in found.items() if ps), found


def test_roles_sql_covers_every_output_table_of_the_registry():
    worker, dashboard = queries.query("roles_worker"), queries.query("roles_dashboard")
    for step in STEPS.values():
        assert f"analytics.{step.table}" in worker and f"analytics.{step.table}" in dashboard, step.table


# ---- SQL injection through every CLI argument ----------------------------------------------------

SLOTS = [  # argv with one slot (X) for the hostile string
    ["run", "hourly", "--hour", "X"], ["run", "hourly", "--hour", "2026-11-25T01:00Z", "--step", "X"],
    ["run", "daily", "--date", "X"], ["run", "daily", "--date", "2026-11-25", "--step", "X"],
    ["run", "weekly", "--week", "X"], ["run", "monthly", "--month", "X"],
    ["seed", "--from", "X", "--hours", "1"], ["seed", "--hours", "X"],
    ["backfill", "--from", "X", "--to", "2026-11-25T03:00Z"], ["backfill", "--from", "2026-11-25T00:00Z", "--to", "X"],
    ["backfill", "--from", "2026-11-25T00:00Z", "--to", "2026-11-25T03:00Z", "--rollups", "X"],
    ["retry-failed", "--since", "X"], ["status", "--from", "X", "--to", "2026-11-25T03:00Z"],
    ["status", "--to", "X"], ["status", "--rollups", "X"], ["status", "--by", "X"],
    ["verify", "--from", "X", "--to", "2026-11-25T03:00Z"], ["verify", "--from", "2026-11-25T00:00Z", "--to", "X"],
    ["runs", "--limit", "X"], ["db", "upgrade", "--revision", "X"], ["db", "downgrade", "--revision", "X"],
    ["db", "roles", "--worker", "X"], ["db", "roles", "--dashboard", "X"],
    ["flower", "--address", "X"], ["flower", "--port", "X"],
]


@pytest.fixture
def data_db(db_url, conn):
    rng = random.Random(23)
    copy_executions(conn, heavy_rows(120, H, 2, workspaces=["w1", "w2"], rng=rng))
    return conn


def _tables(conn) -> set[str]:
    return {r[0] for r in conn.execute("SELECT schemaname || '.' || tablename FROM pg_tables "
                                       "WHERE schemaname IN ('public', 'analytics')")}


def test_sql_injection_through_every_cli_argument_is_rejected_and_changes_nothing(data_db, monkeypatch):
    monkeypatch.delenv("TALLY_FLOWER_AUTH", raising=False)
    conn = data_db
    tables, before = _tables(conn), fingerprint(conn)
    for slot in SLOTS:
        for hostile in INJECTIONS:
            argv = [hostile if a == "X" else a for a in slot]
            o = invoke(*argv)
            assert_rejected(o, *argv)
    assert _tables(conn) == tables and fingerprint(conn) == before
    assert conn.execute("SELECT count(*) FROM public.execution_logs").fetchone()[0] == 120


def test_sql_injection_in_every_source_text_column_is_just_data(db_url, conn):
    rows, events = [], []
    for i, s in enumerate(INJECTIONS):
        s = s.replace("\x00", "")  # PostgreSQL text holds no NUL: the platform could not store it either
        rows.append({"execution_id": f"{s}-{i}", "workspace_id": s, "user_id": s, "agent_id": s,
                     "status": s if i % 2 else "completed", "started_at": H + dt.timedelta(minutes=i),
                     "completed_at": None, "duration": float(i), "credits_used": i, "metadata": {s: s}})
        events.append({"workspace_id": s, "user_id": s, "session_id": s, "event_type": s, "event_name": s,
                       "page_path": s, "metadata": {"q": s}, "created_at": H + dt.timedelta(minutes=i)})
    with conn.transaction():
        insert_executions(conn, rows)
        insert_events(conn, events)
    tables = _tables(conn)
    assert tally.hourly_rollup(H).ok and tally.daily_rollup(H.replace(hour=0)).ok
    executions, events = source_rows(conn)
    problems = check_hour(conn, H, executions, events)
    problems += check_period(conn, "execution_metrics_daily", H.replace(hour=0), H.replace(hour=0) + 24 * HOUR,
                             executions)
    assert not problems, problems
    assert _tables(conn) == tables and len(executions) == len(INJECTIONS)
    assert conn.execute("SELECT count(*) FROM analytics.execution_metrics_hourly").fetchone()[0] == len(
        ref.execution_hourly(executions, H))


def test_python_api_refuses_hostile_buckets(db_url, conn):
    for hostile in INJECTIONS:
        with pytest.raises(InvalidInput):
            tally.hourly_rollup(hostile)
        with pytest.raises(InvalidInput):
            tally.hourly_rollup(H, steps=[hostile])
    assert conn.execute("SELECT count(*) FROM analytics.aggregation_runs").fetchone()[0] == 0


# ---- passwords never leak ---------------------------------------------------------------------------

def _url_as(url: str, user: str, password: str, database: str | None = None) -> str:
    parts = urllib.parse.urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    netloc = f"{urllib.parse.quote(user, safe='')}:{urllib.parse.quote(password, safe='')}@{host}"
    path = f"/{database}" if database else parts.path
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, path=path))


@pytest.fixture
def roles_made(admin_url):
    """Factory of cluster roles with a unique name; dropped (with their grants in ``dbs``) afterwards."""
    made: list[str] = []
    dbs: list[str] = []

    def make(kind: str, options: str = "LOGIN", password: str | None = None, member_of: str | None = None) -> str:
        name = f"tally_{kind}_{uuid.uuid4().hex[:8]}"
        statement = sql.SQL("CREATE ROLE {} " + options).format(sql.Identifier(name))
        if password:
            statement += sql.SQL(" PASSWORD {}").format(sql.Literal(password))
        if member_of:
            statement += sql.SQL(" IN ROLE {}").format(sql.Identifier(member_of))
        with psycopg.connect(admin_url, autocommit=True) as c:
            c.execute(statement)
        made.append(name)
        return name

    make.dbs = dbs
    make.names = made
    yield make
    for url in dbs:
        with contextlib_suppress(psycopg.Error), psycopg.connect(url, autocommit=True) as c:
            for name in made:
                c.execute(f'DROP OWNED BY "{name}"')
    with psycopg.connect(admin_url, autocommit=True) as c:
        for name in reversed(made):
            c.execute(f'DROP ROLE IF EXISTS "{name}"')


class contextlib_suppress:
    def __init__(self, *exc):
        self.exc = exc

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        return kind is not None and issubclass(kind, self.exc)


def _run(argv, env, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([TALLY, *argv], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_no_command_leaks_the_database_password(admin_url, roles_made, broker, tmp_path):
    password = f"S3cr3t-{uuid.uuid4().hex[:10]}-p@ss:w/rd%?"
    owner = roles_made("pw", "LOGIN CREATEROLE", password=password)
    dbname = f"tally_pw_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{dbname}" OWNER "{owner}"')
    admin_db = with_db(admin_url, dbname)
    roles_made.dbs.append(admin_db)
    url = _url_as(admin_url, owner, password, dbname)
    broker_password = f"Br0ker-{uuid.uuid4().hex[:10]}"
    secrets = {password, urllib.parse.quote(password, safe=""), urllib.parse.quote(password), url, broker_password,
               "flowerpw"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    env.update(TALLY_DATABASE_URL=url, TALLY_HOME=str(tmp_path / "home"), TALLY_CATCHUP_DAYS="1",
               TALLY_BROKER_URL=broker["TALLY_BROKER_URL"], TALLY_BROKER_PREFIX=broker["TALLY_BROKER_PREFIX"])
    written: list[str] = []
    codes: dict[str, int] = {}

    def run(*argv, expect=0, extra=None, name=None):
        proc = _run(list(argv), {**env, **(extra or {})})
        written.append(f"$ tally {' '.join(argv)}\n{proc.stdout}\n{proc.stderr}")
        codes[name or " ".join(argv)] = proc.returncode
        assert proc.returncode == expect, (argv, proc.returncode, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, proc.stderr

    day, hour = "2026-11-25", "2026-11-25T01:00Z"
    try:
        run("db", "upgrade")
        run("db", "current")
        run("seed", "--from", "2026-11-25T00:00Z", "--hours", "3", "--workspaces", "2", "--executions-per-hour", "30",
            "--events-per-hour", "30")
        run("run", "hourly", "--hour", hour)
        run("run", "hourly", "--hour", hour, "--json")
        run("run", "daily", "--date", day)
        run("run", "weekly", "--week", "2026-11-23")
        run("run", "monthly", "--month", "2026-11")
        run("backfill", "--from", "2026-11-25T00:00Z", "--to", "2026-11-25T03:00Z", "--rollups", "hourly,daily")
        run("catch-up")
        run("status", "--from", "2026-11-25T00:00Z", "--to", "2026-11-26T00:00Z")
        run("status", "--json")
        run("runs")
        run("runs", "--json", "--limit", "1000")
        run("verify", "--from", "2026-11-25T00:00Z", "--to", "2026-11-26T00:00Z")
        run("db", "roles", "--worker", roles_made("pww", "NOLOGIN"), "--dashboard", roles_made("pwd", "NOLOGIN"))
        # a failing step: its error goes to the ledger, the output and the logs
        with psycopg.connect(admin_db, autocommit=True) as c:
            c.execute("""CREATE FUNCTION public.fail_loudly() RETURNS trigger LANGUAGE plpgsql AS $$
                         BEGIN
                             IF NEW.hour = '2026-11-25T02:00Z' THEN
                                 RAISE EXCEPTION 'injected fault: %', current_user;
                             END IF;
                             RETURN NEW;
                         END $$;
                         CREATE TRIGGER fail_loudly BEFORE INSERT ON analytics.user_activity_hourly
                         FOR EACH ROW EXECUTE FUNCTION public.fail_loudly();""")
        run("run", "hourly", "--hour", "2026-11-25T02:00Z", expect=1, name="run hourly (failing step)")
        run("retry-failed", expect=1)
        run("runs", "--failed")
        # a worker running a failing and a succeeding task, then beat
        w = Worker({**env, "TALLY_RETRY_DELAY": "0", "TALLY_MAX_RETRIES": "0"}, tmp_path / "worker.log")
        try:
            app = client(env)
            bad = app.send_task("tally.hourly_rollup", ["2026-11-25T02:00Z"])
            good = app.send_task("tally.hourly_rollup", ["2026-11-25T00:00Z"])
            assert good.get(timeout=120)["ok"]
            with pytest.raises(Exception) as failed:
                bad.get(timeout=120)
            written.append(f"task failure: {failed.value!r} {failed.value}")
            run("backfill", "--from", "2026-11-25T00:00Z", "--to", "2026-11-25T02:00Z", "--rollups", "hourly",
                "--queue", "--force")
        finally:
            w.stop()
        written.append(w.text())
        beat_log = tmp_path / "beat.log"
        beat = subprocess.Popen([TALLY, "beat"], env=env, stdout=beat_log.open("wb"), stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: beat.poll() is not None or "Starting..." in beat_log.read_text(), 60, "beat")
        finally:
            beat.terminate()
            beat.wait(20)
        written.append(beat_log.read_text())
        flower_log = tmp_path / "flower.log"
        flower = subprocess.Popen([TALLY, "flower", "--port", str(free_port())],
                                  env={**env, "TALLY_FLOWER_AUTH": "ops:flowerpw"}, stdout=flower_log.open("wb"),
                                  stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: flower.poll() is not None or "Visit me at" in flower_log.read_text(), 60, "flower")
        finally:
            flower.terminate()
            try:
                flower.wait(20)
            except subprocess.TimeoutExpired:  # Flower may hang in its inspector right after it started
                flower.kill()
                flower.wait(20)
        written.append(flower_log.read_text())
        codes["flower"] = 0
        # unreachable, missing database, key=value form: exit 3, one line
        gone = _url_as(admin_url, owner, password, "no_such_db_" + uuid.uuid4().hex[:6])
        for argv in (["runs"], ["run", "hourly", "--hour", hour], ["db", "upgrade"], ["seed", "--hours", "1"],
                     ["catch-up"], ["backfill", "--from", "2026-11-25T00:00Z", "--to", "2026-11-25T01:00Z"],
                     ["status"], ["verify", "--from", "2026-11-25T00:00Z", "--to", "2026-11-25T01:00Z"],
                     ["retry-failed"], ["db", "roles"]):
            run(*argv, expect=3, extra={"TALLY_DATABASE_URL": gone}, name=f"{' '.join(argv)} (no such database)")
        parts = urllib.parse.urlsplit(url)
        closed = url.replace(f":{parts.port}/", ":1/") if parts.port else url.replace("host=", "host=/nonexistent&x=")
        run("runs", expect=3, extra={"TALLY_DATABASE_URL": closed}, name="runs (closed port)")
        no_broker = {"TALLY_BROKER_URL": f"redis://:{broker_password}@127.0.0.1:1/0"}
        run("worker", expect=3, extra=no_broker, name="worker (no broker)")
        run("backfill", "--from", "2026-11-25T00:00Z", "--to", "2026-11-25T01:00Z", "--queue", expect=3, extra=no_broker,
            name="backfill --queue (no broker)")
        run("demo", "--hours", "2", "--executions-per-hour", "10", "--workspaces", "2")
        run("db", "downgrade", "--yes")
        run("db", "upgrade")
        # the Python API's exceptions
        for call in (lambda: tally.hourly_rollup(H, url=gone), lambda: Runner(gone).run(B.bucket("hourly", H))):
            with pytest.raises(Unreachable) as exc:
                call()
            written.append(f"{exc.value!r} {exc.value}")
        with psycopg.connect(admin_db) as c:
            ledger = c.execute("SELECT coalesce(string_agg(concat_ws(' ', error, worker, task_id), E'\\n'), '') "
                               "FROM analytics.aggregation_runs").fetchone()[0]
        written.append(ledger)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        roles_made.dbs.remove(admin_db)
    everything = "\n".join(written)
    assert "injected fault" in everything and "cannot reach" in everything  # the failures were exercised
    assert "***" in everything  # ... and said which database, password hidden
    leaks = [s for s in secrets if s in everything]
    assert not leaks, f"password leaked in {[l for l in everything.splitlines() if any(s in l for s in leaks)][:5]}"
    print(f"\n{len(codes)} commands, {len(everything):,} characters written, no password in any")


# ---- least-privilege roles ------------------------------------------------------------------------

WRITES = ["INSERT INTO {t} DEFAULT VALUES", "UPDATE {t} SET {c} = {c}", "DELETE FROM {t}", "TRUNCATE {t}"]
SOURCE = ["public.execution_logs", "analytics.user_activity"]
OUTPUTS = [f"analytics.{s.table}" for s in STEPS.values()]
LEDGER = ["analytics.aggregation_runs", "analytics.bucket_state", "analytics.dirty_log"]


def _denied(url: str, statement: str) -> bool:
    with psycopg.connect(url, autocommit=True) as c:
        try:
            c.execute(statement)
        except psycopg.errors.InsufficientPrivilege:
            return True
    return False


def _first_column(conn, table: str) -> str:
    schema, name = table.split(".")
    return conn.execute("SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND table_name = %s "
                        "AND is_identity = 'NO' ORDER BY ordinal_position LIMIT 1", (schema, name)).fetchone()[0]


@pytest.fixture
def roles_db(db_url, conn, roles_made, admin_url):
    """A migrated database with data, `tally db roles` applied, and a login member of each role."""
    roles_made.dbs.append(db_url)
    rng = random.Random(5)
    copy_executions(conn, heavy_rows(200, H, 2, workspaces=["w1", "w2", None], rng=rng))
    with conn.transaction():
        insert_events(conn, [{"workspace_id": "w1", "user_id": "u1", "session_id": "s", "event_type": "page_view",
                              "event_name": None, "page_path": "/", "metadata": None,
                              "created_at": H + dt.timedelta(minutes=m)} for m in range(0, 120, 7)])
    worker_group, dashboard_group = roles_made("wg", "NOLOGIN"), roles_made("dg", "NOLOGIN")
    with psycopg.connect(admin_url, autocommit=True) as c:  # the command creates missing roles itself
        c.execute(f'DROP ROLE "{worker_group}"')
    o = invoke("db", "roles", "--worker", worker_group, "--dashboard", dashboard_group)
    assert o.code == 0, o.err
    assert f"worker role {worker_group}: created" in o.out and f"dashboard role {dashboard_group}: exists" in o.out
    password = "pw-" + uuid.uuid4().hex
    worker = roles_made("w", "LOGIN", password=password, member_of=worker_group)
    worker2 = roles_made("w2", "LOGIN", password=password, member_of=worker_group)
    dashboard = roles_made("d", "LOGIN", password=password, member_of=dashboard_group)
    return dict(worker=_url_as(db_url, worker, password), worker2=_url_as(db_url, worker2, password),
                dashboard=_url_as(db_url, dashboard, password), groups=(worker_group, dashboard_group), url=db_url)


def test_worker_role_runs_every_job_and_cannot_write_the_source(roles_db, conn, monkeypatch):
    # a hardened database: PUBLIC may not create temporary tables; the worker role still may
    # (`tally db roles` grants it TEMPORARY for the hourly steps' reads)
    conn.execute(sql.SQL("REVOKE TEMPORARY ON DATABASE {} FROM PUBLIC").format(sql.Identifier(conn.info.dbname)))
    monkeypatch.setenv("TALLY_DATABASE_URL", roles_db["worker"])
    monkeypatch.setenv("TALLY_CATCHUP_DAYS", "0")
    for argv in (["run", "hourly", "--hour", "2026-11-25T01:00Z"], ["run", "daily", "--date", "2026-11-25"],
                 ["run", "weekly", "--week", "2026-11-23"], ["run", "monthly", "--month", "2026-11"],
                 ["backfill", "--from", "2026-11-25T00:00Z", "--to", "2026-11-25T04:00Z", "--rollups", "hourly"],
                 ["catch-up"], ["retry-failed"], ["runs"],
                 ["status", "--from", "2026-11-25T00:00Z", "--to", "2026-11-26T00:00Z"],
                 ["verify", "--from", "2026-11-25T00:00Z", "--to", "2026-11-26T00:00Z"]):
        o = invoke(*argv)
        assert o.code == 0, (argv, o.err)
    executions, events = source_rows(conn)
    assert not check_hour(conn, H, executions, events) and not check_hour(conn, H + HOUR, executions, events)
    url = roles_db["worker"]
    with psycopg.connect(url) as c:
        for table in SOURCE:
            col = _first_column(c, table)
            for w in WRITES:
                assert _denied(url, w.format(t=table, c=col)), (table, w)
        assert _denied(url, "DELETE FROM analytics.aggregation_runs")  # the ledger is append-and-finish only
        assert _denied(url, "TRUNCATE analytics.aggregation_runs")
        for ddl in ("CREATE TABLE analytics.x (i int)", "CREATE TABLE public.x (i int)",
                    "DROP TABLE analytics.execution_metrics_hourly", "ALTER TABLE public.execution_logs ADD COLUMN x int",
                    "SELECT analytics.tally_mark_dirty()"):
            assert _denied(url, ddl), ddl


def test_dashboard_role_reads_outputs_and_writes_nothing(roles_db, conn):
    assert tally.hourly_rollup(H).ok and tally.daily_rollup(H.replace(hour=0)).ok  # as the owner
    url = roles_db["dashboard"]
    with psycopg.connect(url) as c:
        for table in OUTPUTS + LEDGER + ["analytics.aggregation_latest"]:
            c.execute(f"SELECT count(*) FROM {table}").fetchone()
        assert c.execute("SELECT sum(total_executions) FROM analytics.execution_metrics_daily").fetchone()[0] == 200
    for table in SOURCE:
        assert _denied(url, f"SELECT count(*) FROM {table}"), table  # not even the raw rows
    columns = {t: _first_column(conn, t) for t in SOURCE + OUTPUTS + LEDGER}
    for table, col in columns.items():
        for w in WRITES:
            assert _denied(url, w.format(t=table, c=col)), (table, w)
    for ddl in ("CREATE TABLE analytics.x (i int)", "CREATE TABLE public.x (i int)", "CREATE SCHEMA x",
                "SELECT analytics.tally_mark_dirty()"):
        assert _denied(url, ddl), ddl


def test_source_writers_need_no_rights_on_analytics(roles_db, roles_made, conn):
    """The change-capture trigger runs as its owner: the platform's writer needs only its own tables."""
    password = "pw-" + uuid.uuid4().hex
    writer = roles_made("wr", "LOGIN", password=password)
    conn.execute(f'GRANT INSERT, UPDATE, DELETE, SELECT ON public.execution_logs TO "{writer}"')
    url = _url_as(roles_db["url"], writer, password)
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("INSERT INTO public.execution_logs (execution_id, status, started_at) VALUES ('late', 'completed', %s)",
                  (H,))
        c.execute("UPDATE public.execution_logs SET status = 'failed' WHERE execution_id = 'late'")
    assert conn.execute("SELECT count(*) FROM analytics.dirty_log WHERE hour = %s", (H,)).fetchone()[0] >= 2


def test_db_roles_is_idempotent_and_refuses_bad_names(roles_db, conn):
    worker_group, dashboard_group = roles_db["groups"]
    privileges = """SELECT grantee, table_schema, table_name, privilege_type FROM information_schema.role_table_grants
                    WHERE grantee IN (%s, %s) ORDER BY 1, 2, 3, 4"""
    first = conn.execute(privileges, roles_db["groups"]).fetchall()
    conn.execute(f'GRANT DELETE ON analytics.aggregation_runs TO "{worker_group}"')  # drift, undone by a re-run
    o = invoke("db", "roles", "--worker", worker_group, "--dashboard", dashboard_group)
    assert o.code == 0 and "exists" in o.out
    assert conn.execute(privileges, roles_db["groups"]).fetchall() == first
    assert {p for g, s, t, p in first if g == dashboard_group} == {"SELECT"}
    for bad in ("pg_monitor", "x; DROP ROLE postgres", "", "a" * 64, worker_group + '"'):
        assert_rejected(invoke("db", "roles", "--worker", bad), "db", "roles", "--worker", bad)
    assert_rejected(invoke("db", "roles", "--worker", "same", "--dashboard", "same"), "db", "roles")


def test_a_live_attempt_of_another_worker_login_is_never_reaped(roles_db, conn):
    """pg_stat_activity hides backend_start of other roles' sessions: that must not read as 'dead'."""
    gate = 0x7E57
    conn.execute("""CREATE FUNCTION public.gate() RETURNS trigger LANGUAGE plpgsql AS $$
                    BEGIN PERFORM pg_advisory_xact_lock_shared(32343); RETURN NULL; END $$;
                    CREATE TRIGGER gate BEFORE INSERT ON analytics.execution_metrics_hourly
                    FOR EACH STATEMENT EXECUTE FUNCTION public.gate();""")
    conn.execute("SELECT pg_advisory_lock(%s)", (gate,))
    result = {}
    thread = threading.Thread(target=lambda: result.update(r=Runner(roles_db["worker"]).run(B.bucket("hourly", H))))
    thread.start()
    try:
        wait_for(lambda: conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                                      "AND objid = %s", (gate,)).fetchone()[0], 60, "the step to wait at the gate")
        with psycopg.connect(roles_db["worker2"], autocommit=True) as other:
            assert other.execute("SELECT backend_start FROM pg_stat_activity WHERE pid = (SELECT backend_pid FROM "
                                 "analytics.aggregation_runs WHERE status = 'running')").fetchone()[0] is None
        o = invoke_as(roles_db["worker2"], "runs")  # `tally runs` reaps abandoned attempts first
        assert o.code == 0, o.err
        assert conn.execute("SELECT status FROM analytics.aggregation_runs ORDER BY id LIMIT 1").fetchone()[0] == "running"
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (gate,))
        thread.join(60)
    assert result["r"].ok
    assert [r[0] for r in conn.execute("SELECT status FROM analytics.aggregation_runs ORDER BY id")] == ["succeeded"] * 3


def invoke_as(url: str, *argv: str):
    old = os.environ.get("TALLY_DATABASE_URL")
    os.environ["TALLY_DATABASE_URL"] = url
    try:
        return invoke(*argv)
    finally:
        if old is None:
            del os.environ["TALLY_DATABASE_URL"]
        else:
            os.environ["TALLY_DATABASE_URL"] = old


# ---- Flower never binds a public address without auth ------------------------------------------------

@pytest.mark.parametrize("address", ["0.0.0.0", "::", "", "192.168.1.5", "example.com", "127.0.0.1.nip.io"])
def test_flower_refuses_a_public_bind_without_auth(monkeypatch, address):
    monkeypatch.delenv("TALLY_FLOWER_AUTH", raising=False)
    with pytest.raises(InvalidInput):
        tasks.flower_auth(address)
    monkeypatch.setenv("TALLY_FLOWER_AUTH", "ops:s3cret")
    assert tasks.flower_auth(address) == "ops:s3cret"


@pytest.mark.parametrize("address", ["127.0.0.1", "::1", "localhost", "127.1.2.3"])
def test_flower_on_loopback_may_go_without_auth(monkeypatch, address):
    monkeypatch.delenv("TALLY_FLOWER_AUTH", raising=False)
    assert tasks.flower_auth(address) is None


def test_the_flower_process_test_exists():
    """tests/test_celery.py starts a real Flower: auth enforced, public bind refused (issue 3 keeps it)."""
    text = (Path(__file__).parent / "test_celery.py").read_text()
    assert "def test_flower_lists_the_task_that_ran_and_guards_its_bind" in text
    assert '"--address", "0.0.0.0"' in text and "401" in text
