#!/usr/bin/env python3
"""Peers benchmark: tally, SQLMesh and dbt (microbatch) run the same hourly + daily
backfill on identical generated data, each in a fresh clone of one source database,
timed from spawn to exit and verified against an independent SQL recomputation
(expected.sql) with SPEC's tolerances.

    bash bench/peers/run.sh [ADMIN_URL] --days 1 --rows-per-day 20000 --with-credit

Standard library only (PostgreSQL through the `psql` client); tally is the `tally`
executable of the project's venv (next to this interpreter, or --tally). See the
"Peers" section of bench/README.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import urllib.parse
from decimal import Decimal
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
VENV_SQLMESH = Path(os.environ.get("BENCH_VENV_SQLMESH", "/tmp/venv-sqlmesh"))
VENV_DBT = Path(os.environ.get("BENCH_VENV_DBT", "/tmp/venv-dbt"))

# ----------------------------------------------------------------------------
# The output contract (SPEC's names) and its tolerances, the same for every tool.
EXACT = None          # counts, sums, ids: equal as numbers
REL = 1e-9            # means and exact percentiles: relative error
SKETCH = 0.01         # period percentiles: SPEC allows 1 % relative error (tally merges sketches)


@dataclasses.dataclass(frozen=True)
class Output:
    label: str
    relation: str
    expected: str
    keys: tuple[str, ...]
    columns: tuple[tuple[str, float | None], ...]  # (column, relative tolerance or EXACT)


_EXEC = (("total_executions", EXACT), ("successful_executions", EXACT), ("failed_executions", EXACT),
         ("avg_runtime", REL))
_MONEY = (("total_credits", EXACT), ("avg_credits_per_run", REL))
OUTPUTS = {
    "hourly": Output("hourly", "analytics.execution_metrics_hourly", "bench_verify.expected_hourly",
                     ("workspace_id", "hour"),
                     _EXEC + (("p50_runtime", REL), ("p95_runtime", REL), ("p99_runtime", REL)) + _MONEY),
    "daily": Output("daily", "analytics.execution_metrics_daily", "bench_verify.expected_daily",
                    ("workspace_id", "date"),
                    _EXEC + (("p50_runtime", SKETCH), ("p95_runtime", SKETCH), ("p99_runtime", SKETCH)) + _MONEY
                    + (("unique_users", EXACT), ("unique_agents", EXACT), ("health_score", REL))),
    "credit": Output("credit", "analytics.credit_consumption_hourly", "bench_verify.expected_credit_hourly",
                     ("workspace_id", "user_id", "agent_id", "hour"),
                     (("total_credits", EXACT), ("avg_credits_per_execution", REL),
                      ("peak_credits_per_execution", EXACT), ("executions_count", EXACT),
                      ("successful_executions", EXACT), ("credits_per_success", REL))),
}
EXPECTED_TABLES = 3  # bench_verify.* tables of a ready source


def _first_row(out: str, where: str = "TRUE", alias: str = "") -> str:
    """SQL: the key of output ``out``'s first row (in key order) matching ``where``; by key, not
    ctid, since SQLMesh's outputs are views over its versioned tables."""
    o = OUTPUTS[out]
    keys = ", ".join(o.keys)
    mine = ", ".join(alias + k for k in o.keys)
    return f"({mine}) = (SELECT {keys} FROM {o.relation} WHERE {where} ORDER BY {keys} LIMIT 1)"


def _scale_to_expected(out: str, column: str, factor: str) -> str:
    """SQL: set ``column`` of one row of output ``out`` to ``factor`` x its expected value."""
    o = OUTPUTS[out]
    on = " AND ".join(f"t.{k} = e.{k}" for k in o.keys)
    return (f"UPDATE {o.relation} AS t SET {column} = e.{column} * {factor} FROM {o.expected} e "
            f"WHERE {on} AND {_first_row(out, f'{column} > 0', 't.')}")


# Deliberate edits of one output row, for --perturb and tests/test_bench_peers.py: each names
# the output it touches, whether the verification must still pass, and its SQL.
PERTURBATIONS = {
    # a daily percentile 2 % off the exact value: beyond SPEC's 1 %
    "daily_p95_2pct": ("daily", False, _scale_to_expected("daily", "p95_runtime", "1.02")),
    # 0.5 % off: within the sketch tolerance, still correct
    "daily_p95_half_pct": ("daily", True, _scale_to_expected("daily", "p95_runtime", "1.005")),
    # an hourly percentile 1e-6 off: hourly percentiles are exact
    "hourly_p50_1e-6": ("hourly", False, _scale_to_expected("hourly", "p50_runtime", "1.000001")),
    "hourly_row_missing": ("hourly", False,
                           f"DELETE FROM {OUTPUTS['hourly'].relation} WHERE {_first_row('hourly')}"),
    "daily_users_plus_1": ("daily", False, f"UPDATE {OUTPUTS['daily'].relation} SET unique_users = unique_users + 1 "
                           f"WHERE {_first_row('daily')}"),
    "credit_total_plus": ("credit", False, f"UPDATE {OUTPUTS['credit'].relation} "
                          f"SET total_credits = total_credits + 0.0001 WHERE {_first_row('credit')}"),
}


# ----------------------------------------------------------------------------
# connection handling
class PG:
    """Connection parameters parsed from a libpq URL; runs SQL through psql."""

    def __init__(self, url: str, psql: str):
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("postgres", "postgresql"):
            sys.exit(f"not a PostgreSQL URL: {url!r}")
        q = {k: v[-1] for k, v in urllib.parse.parse_qs(u.query).items()}
        self.host = q.get("host") or urllib.parse.unquote(u.hostname or "") or "/tmp"
        self.port = int(q.get("port") or u.port or 5432)
        self.user = q.get("user") or urllib.parse.unquote(u.username or "") or "postgres"
        self.password = q.get("password") or urllib.parse.unquote(u.password or "")
        self.admin_db = urllib.parse.unquote(u.path.lstrip("/")) or "postgres"
        self.psql = psql

    def env(self, db: str) -> dict:
        """BENCH_PG_* variables read by the tools' project configs."""
        return {
            "BENCH_PG_HOST": self.host,
            "BENCH_PG_PORT": str(self.port),
            "BENCH_PG_USER": self.user,
            "BENCH_PG_PASSWORD": self.password,
            "BENCH_PG_DB": db,
            "BENCH_DB_URL": self.url(db),
        }

    def url(self, db: str) -> str:
        auth = urllib.parse.quote(self.user, safe="")
        if self.password:
            auth += ":" + urllib.parse.quote(self.password, safe="")
        if self.host.startswith("/"):
            return f"postgresql://{auth}@/{db}?host={self.host}&port={self.port}"
        return f"postgresql://{auth}@{self.host}:{self.port}/{db}"

    def _cmd(self, db: str) -> tuple[list[str], dict]:
        conninfo = f"host='{self.host}' port={self.port} user='{self.user}' dbname='{db}'"
        # the harness's own sessions only (generation, expected rollups, verification): room to sort
        # and hash millions of rows in memory; the tools run with the server's settings
        env = dict(os.environ, PGPASSWORD=self.password, PGTZ="UTC",
                   PGOPTIONS="-c client_min_messages=warning -c work_mem=256MB")
        return [self.psql, "-X", "-v", "ON_ERROR_STOP=1", "-d", conninfo], env

    def query(self, sql: str, db: str | None = None) -> list[list[str]]:
        cmd, env = self._cmd(db or self.admin_db)
        out = subprocess.run(cmd + ["-q", "-At", "-F", "\t", "-c", sql], env=env,
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"psql failed ({db}): {out.stderr.strip()}\nSQL: {sql[:500]}")
        return [line.split("\t") for line in out.stdout.splitlines() if line != ""]

    def scalar(self, sql: str, db: str | None = None) -> str:
        rows = self.query(sql, db)
        return rows[0][0] if rows else ""

    def file(self, path: Path, db: str, variables: dict | None = None) -> None:
        cmd, env = self._cmd(db)
        for k, v in (variables or {}).items():
            cmd += ["-v", f"{k}={v}"]
        out = subprocess.run(cmd + ["-q", "-f", str(path)], env=env, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"psql -f {path.name} failed ({db}): {out.stderr.strip()}")


def find_psql() -> str:
    import glob
    cand = [os.environ.get("BENCH_PSQL"), shutil.which("psql")]
    # the pgserver wheel (a tally dependency) ships its own client
    cand += glob.glob(f"{sys.prefix}/lib/python3*/site-packages/pgserver/pginstall/bin/psql")
    cand += glob.glob("/tmp/*/lib/python3*/site-packages/pgserver/pginstall/bin/psql")
    for c in cand:
        if c and os.access(c, os.X_OK):
            return c
    sys.exit("psql not found: install postgresql-client or set BENCH_PSQL")


# ----------------------------------------------------------------------------
# data
def source_db_name(a) -> str:
    shape = "" if a.shape == "independent" else f"_{a.shape}"
    return f"{a.db_prefix}src_d{a.days}_r{a.rows_per_day}_s{a.seed}_{a.start_date.replace('-', '')}{shape}"


def generate(pg: PG, db: str, days: int, rows_per_day: int, start_date: str, seed: int, shape: str) -> dict:
    """(Re)create ``db`` with gen.sql's execution_logs and expected.sql's bench_verify tables."""
    pg.query(f'DROP DATABASE IF EXISTS "{db}"')
    pg.query(f'CREATE DATABASE "{db}"')
    t0 = time.perf_counter()
    pg.file(HERE / "gen.sql", db, {"days": days, "rows_per_day": rows_per_day, "start_date": start_date,
                                   "seed": seed, "shape": shape})
    t1 = time.perf_counter()
    pg.file(HERE / "expected.sql", db)
    t2 = time.perf_counter()
    pg.query("VACUUM ANALYZE", db)
    return {"generate_s": round(t1 - t0, 2), "expected_s": round(t2 - t1, 2)}


def prepare_source(pg: PG, a) -> dict:
    src = source_db_name(a)
    exists = pg.scalar(f"SELECT 1 FROM pg_database WHERE datname = '{src}'") == "1"
    ready = exists and pg.scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'bench_verify'", src) \
        == str(EXPECTED_TABLES)
    if a.reuse_source and ready:
        log(f"source: reusing database {src}")
    else:
        t = generate(pg, src, a.days, a.rows_per_day, a.start_date, a.seed, a.shape)
        log(f"source: generated {src} in {t['generate_s']}s, expected rollups in {t['expected_s']}s")
    return {"db": src, **fingerprint(pg, src)}


def fingerprint(pg: PG, db: str) -> dict:
    """An order-independent hash of every column the rollups read, and the expected row counts."""
    fp = pg.query(
        "SELECT count(*), min(started_at), max(started_at), "
        "sum(coalesce(credits_used,0)), count(DISTINCT workspace_id), "
        "sum(hashtext(concat_ws('|', id, execution_id, workspace_id, user_id, agent_id, status, "
        "started_at AT TIME ZONE 'UTC', duration, credits_used))::numeric), "
        "(SELECT count(*) FROM bench_verify.expected_hourly), (SELECT count(*) FROM bench_verify.expected_daily), "
        "(SELECT count(*) FROM bench_verify.expected_credit_hourly), "
        f"pg_database_size('{db}') "
        "FROM public.execution_logs", db)[0]
    return {"rows": int(fp[0]), "min_started_at": fp[1], "max_started_at": fp[2],
            "sum_credits": fp[3], "workspaces": int(fp[4]), "fingerprint": fp[5],
            "expected_rows": {"hourly": int(fp[6]), "daily": int(fp[7]), "credit": int(fp[8])},
            "size_bytes": int(fp[9])}


def clone_db(pg: PG, src: str, dst: str) -> None:
    pg.query(f'DROP DATABASE IF EXISTS "{dst}"')
    strategy = " STRATEGY FILE_COPY" if int(pg.scalar("SHOW server_version_num")) >= 150000 else ""
    pg.query(f'CREATE DATABASE "{dst}" TEMPLATE "{src}"{strategy}')


# ----------------------------------------------------------------------------
# tools
def pkg_versions(python: Path, pkgs: list[str]) -> str:
    code = "import importlib.metadata as m,sys;print(' '.join(p+'=='+m.version(p) for p in sys.argv[1:]))"
    try:
        return subprocess.run([str(python), "-c", code, *pkgs],
                              capture_output=True, text=True, check=True).stdout.strip()
    except Exception as e:  # noqa: BLE001
        return f"? ({e})"


class Tool:
    """One tool of the run: its project, its commands, and the outputs it must leave."""

    name = "?"
    outputs: tuple[str, ...] = ("hourly", "daily")  # verified always
    optional_outputs: tuple[str, ...] = ()          # verified when the relation exists
    builds = "execution_metrics hourly + daily"

    def version(self) -> str:
        return ""

    def prepare(self, workdir: Path) -> None:
        pass

    def setup(self, a, workdir: Path) -> list[list[str]]:
        """Commands run before the timed one, timed apart (tally: db upgrade)."""
        return []

    def command(self, a, workdir: Path) -> list[str]:
        raise NotImplementedError

    def extra_env(self, a, workdir: Path, env: dict) -> dict:
        return {}


class Peer(Tool):
    """A peer's project; ``credit`` adds extra/<tool>/credit_consumption_hourly.sql to it."""

    project = "?"

    def __init__(self, credit: bool):
        self.credit = credit
        if credit:
            self.name += "+credit"
            self.outputs = ("hourly", "daily", "credit")
            self.builds = "execution_metrics hourly + daily, credit_consumption hourly"

    def prepare(self, workdir):
        shutil.copytree(HERE / self.project, workdir / "project")
        if self.credit:
            shutil.copy(HERE / f"extra/{self.project}/credit_consumption_hourly.sql", workdir / "project/models/")


class SQLMesh(Peer):
    name = "sqlmesh"
    project = "sqlmesh"

    def version(self):
        return pkg_versions(VENV_SQLMESH / "bin/python", ["sqlmesh", "sqlglot", "psycopg2-binary"])

    def command(self, a, workdir):
        # prod plan: backfills every model from model_defaults.start (BENCH_START)
        # up to --execution-time (exclusive end); prod plans take no --start/--end.
        return [str(VENV_SQLMESH / "bin/sqlmesh"), "plan", "--auto-apply", "--no-prompts", "--skip-tests",
                "--skip-linter", "--execution-time", a.end_ts]


class SQLMeshPerInterval(SQLMesh):
    """Optional variant: `batch_size 1` on every model, so SQLMesh evaluates (delete + insert)
    one hour / one day per statement, like dbt microbatch. Not in the default --tools."""
    name = "sqlmesh_b1"

    def prepare(self, workdir):
        super().prepare(workdir)
        for f in (workdir / "project/models").glob("*.sql"):
            s = f.read_text()
            for col in ("hour", "date"):
                s = s.replace(f"time_column {col}\n", f"time_column {col},\n    batch_size 1\n")
            f.write_text(s)


class Dbt(Peer):
    name = "dbt"
    project = "dbt"

    def version(self):
        return pkg_versions(VENV_DBT / "bin/python", ["dbt-core", "dbt-postgres"])

    def extra_env(self, a, workdir, env):
        # dbt runs at most max(1, threads // 2) microbatch models at a time
        # (dbt/graph/thread_pool.py) and dbt-postgres runs one model's batches
        # sequentially, so threads = 2 x N gives the same N concurrent model
        # queries that SQLMesh gets from concurrent_tasks = N.
        return {"BENCH_THREADS": str(a.dbt_threads)}

    def command(self, a, workdir):
        p = workdir / "project"
        return [str(VENV_DBT / "bin/dbt"), "--no-version-check", "--no-send-anonymous-usage-stats",
                "run", "--project-dir", str(p), "--profiles-dir", str(p),
                "--event-time-start", a.start_ts, "--event-time-end", a.end_ts]


class Tally(Tool):
    """tally itself: `tally db upgrade` (timed apart), then the timed
    `tally backfill --rollups hourly,daily`, which runs all three hourly steps
    (execution_metrics, user_activity, credit_consumption) and the daily one."""

    outputs = ("hourly", "daily", "credit")

    def __init__(self, exe: str, jobs: int = 1, name: str = "tally"):
        self.exe, self.jobs, self.name = exe, jobs, name
        self.builds = ("execution_metrics hourly + daily, credit_consumption hourly (+ user_activity hourly, no events)"
                       f"; --jobs {jobs}")

    def version(self):
        code = ("import importlib.metadata as m, tally, os; "
                "print(m.version('tally'), os.path.dirname(tally.__file__))")
        try:
            ver, src = subprocess.run([str(Path(self.exe).parent / "python"), "-c", code],
                                      capture_output=True, text=True, check=True).stdout.split()
        except Exception as e:  # noqa: BLE001
            return f"? ({e})"
        git = ["git", "-C", src]
        commit = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        if commit.returncode != 0:
            return ver
        dirty = subprocess.run(git + ["status", "--porcelain", "--", "."], capture_output=True, text=True).stdout
        return f"{ver}, commit {commit.stdout.strip()}{' + modified src' if dirty.strip() else ''}"

    def extra_env(self, a, workdir, env):
        home = workdir / "tally_home"  # nothing of the user's own tally home is touched
        home.mkdir(exist_ok=True)
        return {"TALLY_DATABASE_URL": env["BENCH_DB_URL"], "TALLY_HOME": str(home)}

    def setup(self, a, workdir):
        return [[self.exe, "db", "upgrade"]]

    def command(self, a, workdir):
        return [self.exe, "backfill", "--from", a.start_iso, "--to", a.end_iso, "--rollups", "hourly,daily",
                "--jobs", str(self.jobs), "--json"]


class Custom(Tool):
    """--custom NAME=SHELL_CMD: runs `bash -c SHELL_CMD` in a fresh clone.
    Environment: BENCH_DB_URL, BENCH_PG_*, BENCH_START, BENCH_END (exclusive),
    BENCH_DAYS. It must leave analytics.execution_metrics_hourly/_daily;
    analytics.credit_consumption_hourly is verified when it exists."""

    optional_outputs = ("credit",)
    builds = "custom command"

    def __init__(self, spec: str):
        self.name, _, self.cmd = spec.partition("=")
        if not self.name or not self.cmd:
            sys.exit(f"--custom wants NAME=SHELL_COMMAND, got {spec!r}")

    def version(self):
        return os.environ.get(f"BENCH_VERSION_{self.name.upper()}", "") or "custom command"

    def command(self, a, workdir):
        return ["bash", "-c", self.cmd]


# ----------------------------------------------------------------------------
# verification
def _same(value: str, expected: str, tol: float | None) -> bool:
    """Aggregate of one column (text from psql): exact as numbers, or within ``tol`` relative."""
    if not (value and expected):
        return value == expected          # NULL on either side
    if tol is None:
        return Decimal(value) == Decimal(expected)
    # sums of doubles: the order of addition differs; floor at 1e-9 for that
    return abs(Decimal(value) - Decimal(expected)) <= Decimal(max(tol, REL)) * abs(Decimal(expected))


def _differs(c: str, tol: float | None) -> str:
    """SQL: row value t.c and expected e.c disagree."""
    if tol is None:
        return f"t.{c}::numeric IS DISTINCT FROM e.{c}::numeric"
    return (f"NOT ((t.{c} IS NULL AND e.{c} IS NULL) OR (t.{c} IS NOT NULL AND e.{c} IS NOT NULL "
            f"AND abs(t.{c}::float8 - e.{c}::float8) <= {tol!r} * abs(e.{c}::float8)))")


def verify_output(pg: PG, db: str, out: Output) -> dict:
    """One output against its expected table: row count, key checksum, per-column sums and
    non-null counts, then row by row on the key (missing, extra, per-column mismatches, and the
    largest relative error of every toleranced column)."""
    r: dict = {"relation": out.relation}
    try:
        pg.query(f"SELECT 1 FROM {out.relation} LIMIT 0", db)
    except RuntimeError as e:
        r["error"] = f"missing output relation {out.relation}: {str(e).splitlines()[0]}"
        return r
    try:
        return _compare(pg, db, out, r)
    except RuntimeError as e:  # e.g. a column missing or of a type that does not compare
        r["error"] = f"cannot compare {out.relation}: {str(e).splitlines()[0]}"
        return r


def _compare(pg: PG, db: str, out: Output, r: dict) -> dict:
    """The comparison of verify_output, into ``r``."""
    keys = ", ".join(f"{k}::text" for k in out.keys)
    agg = ["count(*)", f"sum(hashtextextended(concat_ws('|', {keys}), 0)::numeric)"]
    names, tols = ["rows", "checksum(key)"], [EXACT, EXACT]
    for c, tol in out.columns:
        agg += [f"sum({c}::numeric)", f"count({c})"]
        names += [f"sum({c})", f"count({c})"]
        tols += [tol, EXACT]
    sel = ", ".join(agg)
    got = pg.query(f"SELECT {sel} FROM {out.relation}", db)[0]
    want = pg.query(f"SELECT {sel} FROM {out.expected}", db)[0]
    r["rows"], r["expected_rows"] = int(got[0]), int(want[0])
    r["aggregate_mismatches"] = {n: {"tool": g, "expected": w}
                                 for n, tol, g, w in zip(names, tols, got, want) if not _same(g, w, tol)}
    on = " AND ".join(f"t.{k} = e.{k}" for k in out.keys)
    both = f"t.{out.keys[0]} IS NOT NULL AND e.{out.keys[0]} IS NOT NULL"
    checks = [f"count(*) FILTER (WHERE t.{out.keys[0]} IS NULL)", f"count(*) FILTER (WHERE e.{out.keys[0]} IS NULL)"]
    for c, tol in out.columns:
        checks.append(f"count(*) FILTER (WHERE {both} AND {_differs(c, tol)})")
    toleranced = [c for c, tol in out.columns if tol is not None]
    for c in toleranced:
        checks.append(f"max(abs(t.{c}::float8 - e.{c}::float8) / nullif(abs(e.{c}::float8), 0))")
    row = pg.query(f"SELECT {', '.join(checks)} FROM {out.relation} t FULL JOIN {out.expected} e ON {on}", db)[0]
    counts = dict(zip(["missing_rows", "extra_rows"] + [c for c, _ in out.columns], row))
    r["row_mismatches"] = {n: int(v) for n, v in counts.items() if int(v)}
    r["max_rel_error"] = {c: float(v) if v else 0.0 for c, v in zip(toleranced, row[2 + len(out.columns):])}
    r["tolerance"] = {c: tol for c, tol in out.columns if tol is not None}
    r["ok"] = not r["aggregate_mismatches"] and not r["row_mismatches"]
    return r


def verify(pg: PG, db: str, tool: Tool) -> dict:
    res: dict = {}
    for label in tool.outputs:
        res[label] = verify_output(pg, db, OUTPUTS[label])
    for label in tool.optional_outputs:
        if pg.scalar(f"SELECT to_regclass('{OUTPUTS[label].relation}') IS NOT NULL", db) == "t":
            res[label] = verify_output(pg, db, OUTPUTS[label])
    res["ok"] = all(r.get("ok", False) for r in res.values())
    return res


def perturb(pg: PG, db: str, kind: str) -> None:
    """Apply one of PERTURBATIONS to a tool's output (the negative test of the verification)."""
    pg.query(PERTURBATIONS[kind][2], db)


def summarize(v: dict) -> str:
    labels = [k for k in ("hourly", "daily", "credit") if k in v]
    if v["ok"]:
        return "OK (" + " + ".join(f"{v[k]['rows']:,} {k}" for k in labels) + " rows)"
    parts = []
    for label in labels:
        r = v[label]
        if "error" in r:
            parts.append(f"{label}: {r['error']}")
            continue
        bad = [f"{k}={n}" for k, n in r["row_mismatches"].items()]
        if r["rows"] != r["expected_rows"]:
            bad.insert(0, f"rows {r['rows']} vs {r['expected_rows']} expected")
        if r["aggregate_mismatches"]:
            names = list(r["aggregate_mismatches"])
            bad.append("differing sums: " + ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else ""))
        if bad:
            parts.append(f"{label}: " + "; ".join(bad))
    return "MISMATCH " + " | ".join(parts)


def percentile_error(errors: dict, label: str) -> str:
    """The largest relative error of an output's percentiles (``errors``: label -> column -> error)."""
    errs = [errors.get(label, {}).get(c) for c in ("p50_runtime", "p95_runtime", "p99_runtime")]
    if any(e is None for e in errs):
        return "—"
    return f"{max(errs) * 100:.3g} %"


# ----------------------------------------------------------------------------
# tally's own account of its time: the run ledger
LEDGER_SQL = """
WITH tx AS (  -- one row per transaction: a chunk of hours of a step shares its start (range execution)
    SELECT rollup, step, started_at, max(finished_at) AS finished_at, count(*) AS n,
           count(*) FILTER (WHERE status = 'failed') AS failed, coalesce(sum(rows_written), 0) AS rows_written
    FROM analytics.aggregation_runs
    WHERE finished_at IS NOT NULL
    GROUP BY rollup, step, started_at
)
SELECT rollup, step, sum(n), sum(failed), coalesce(sum(extract(epoch FROM finished_at - started_at)), 0),
       sum(rows_written), extract(epoch FROM min(started_at)), extract(epoch FROM max(finished_at))
FROM tx
GROUP BY rollup, step
ORDER BY min(started_at)
"""


def tally_steps(pg: PG, db: str, spawned: float, exited: float) -> dict:
    """Where the time of one `tally backfill` went, from analytics.aggregation_runs: per
    (rollup, step) the sum of finished_at - started_at over its transactions (a chunk of hours
    is one; with --jobs > 1 steps overlap, so their sum may exceed the wall) (tally.rollups.Runner: the step's
    transaction takes the bucket lock, then the ledger row is begun, the statement runs and the
    row is finished, just before the commit); the rest of the wall time split into before the
    first step (interpreter start, imports, connecting, planning the first bucket), between
    steps (each bucket's planning, transaction start and lock, commit) and after the last step
    (the last commit, the report, exit). Spawn and exit are this machine's clock, the ledger's
    the server's: meant for a local server."""
    steps, total, first, last = [], 0.0, None, None
    for rollup, step, n, failed, secs, rows, t0, t1 in pg.query(LEDGER_SQL, db):
        secs = float(secs)
        steps.append({"rollup": rollup, "step": step, "attempts": int(n), "failed": int(failed),
                      "seconds": round(secs, 3), "rows_written": int(rows)})
        total += secs
        first = float(t0) if first is None else min(first, float(t0))
        last = float(t1) if last is None else max(last, float(t1))
    wall = exited - spawned
    out = {"steps": steps, "steps_s": round(total, 3), "wall_s": round(wall, 3),
           "unaccounted_s": round(wall - total, 3)}
    if first is not None:
        out["before_first_step_s"] = round(first - spawned, 3)
        out["between_steps_s"] = round((last - first) - total, 3)
        out["after_last_step_s"] = round(exited - last, 3)
    return out


# ----------------------------------------------------------------------------
def log(msg: str) -> None:
    print(f"[{dt.datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


def run_tool(pg: PG, a, tool: Tool, src: dict, wd: Path, perturbations: list[str]) -> dict:
    """One fresh clone, the tool's setup and timed command, the verification; the clone is
    dropped unless --keep."""
    db = a.db_prefix + tool.name.replace("+", "_")
    clone_db(pg, src["db"], db)
    try:
        pg.query("CHECKPOINT")
    except RuntimeError:
        pass
    wd.mkdir(parents=True)
    tool.prepare(wd)
    env = dict(os.environ, **pg.env(db), BENCH_START=a.start_date, BENCH_END=a.end_ts,
               BENCH_DAYS=str(a.days), BENCH_THREADS=str(a.threads), TZ="UTC", PGTZ="UTC",
               DBT_SEND_ANONYMOUS_USAGE_STATS="false", DBT_VERSION_CHECK="false",
               PGPASSWORD=pg.password)
    env.update(tool.extra_env(a, wd, env))
    cwd = wd / "project" if (wd / "project").is_dir() else wd
    run: dict = {"db": db, "log": str(wd / "tool.log")}
    rc: int | str = 0
    setup = tool.setup(a, wd)
    spawned = exited = 0.0
    with open(wd / "tool.log", "w") as fh:
        setup_s = 0.0
        for cmd in setup:
            fh.write(f"$ {' '.join(cmd)}\n")
            fh.flush()
            t0 = time.perf_counter()
            try:
                rc = subprocess.run(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                    timeout=a.timeout).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
            setup_s += time.perf_counter() - t0
            if rc != 0:
                break
        run["setup_s"] = round(setup_s, 3)
        wall = 0.0
        if rc == 0:
            cmd = tool.command(a, wd)
            log(f"{tool.name}: {' '.join(cmd)}")
            fh.write(f"$ {' '.join(cmd)}\n")
            fh.flush()
            spawned, t0 = time.time(), time.perf_counter()
            try:
                rc = subprocess.run(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                    timeout=a.timeout).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
            wall = time.perf_counter() - t0
            exited = spawned + wall
    run["wall_s"], run["exit"] = round(wall, 3), rc
    extra = f" (+ setup {setup_s:.2f}s)" if setup else ""
    log(f"{tool.name}: exit {rc}, {wall:.2f}s wall{extra} (log {wd / 'tool.log'})")
    if rc != 0:
        print((wd / "tool.log").read_text()[-3000:])
        run["verification"] = {"ok": False, **{o: {"error": f"tool exit {rc}"} for o in tool.outputs}}
    else:
        if isinstance(tool, Tally):
            run["ledger"] = tally_steps(pg, db, spawned, exited)
        for kind in perturbations:
            log(f"{tool.name}: --perturb {kind}: {PERTURBATIONS[kind][2]}")
            perturb(pg, db, kind)
        run["verification"] = verify(pg, db, tool)
    log(f"{tool.name}: {summarize(run['verification'])}")
    (wd / "verify.json").write_text(json.dumps(run["verification"], indent=2))
    if not a.keep:
        pg.query(f'DROP DATABASE IF EXISTS "{db}"')
    return run


def median_run(runs: list[dict]) -> dict:
    """The run whose wall time is the median (the lower middle one for an even count)."""
    ordered = sorted(runs, key=lambda r: r["wall_s"])
    return ordered[(len(ordered) - 1) // 2]


def summarize_tool(tool: Tool, version: str, runs: list[dict], src: dict) -> dict:
    walls = [r["wall_s"] for r in runs]
    wall = statistics.median(walls)
    ok = all(r["verification"]["ok"] for r in runs)
    shown = runs[-1] if ok else next(r for r in runs if not r["verification"]["ok"])
    errs: dict = {}
    for r in runs:  # the worst relative error of every toleranced column over all runs
        for label in ("hourly", "daily", "credit"):
            for c, e in r["verification"].get(label, {}).get("max_rel_error", {}).items():
                errs.setdefault(label, {})[c] = max(errs.get(label, {}).get(c, 0.0), e)
    res = {"tool": tool.name, "version": version, "builds": tool.builds, "source_rows": src["rows"],
           "wall_s": round(wall, 3), "all_wall_s": walls,
           "rows_per_s": round(src["rows"] / wall) if wall else None,
           "ok": ok, "correctness": summarize(shown["verification"]),
           "hourly_percentile_max_rel_error": percentile_error(errs, "hourly"),
           "daily_percentile_max_rel_error": percentile_error(errs, "daily"),
           "max_rel_error": errs, "runs": runs}
    setups = [r["setup_s"] for r in runs]
    if any(setups):
        res["setup_s"] = round(statistics.median(setups), 3)
        res["all_setup_s"] = setups
        both = [r["setup_s"] + r["wall_s"] for r in runs]
        res["wall_with_setup_s"] = round(statistics.median(both), 3)
    led = [r for r in runs if "ledger" in r]
    if led:
        res["steps_of_median_run"] = median_run(led)["ledger"]
        res["steps_run_index"] = runs.index(median_run(led)) + 1
    return res


def report(meta: dict) -> str:
    """The run's tables, in Markdown."""
    p, src, results = meta["params"], meta["source"], meta["results"]
    lines = []
    peers = ("The peers build " + ("the same three outputs as tally (--with-credit)" if p["with_credit"]
                                    else "two models (execution_metrics hourly + daily)")
             + ("; each also runs its two-model project" if p.get("also_without_credit") else "") + ". "
             if any(r["tool"] != "tally" for r in results) else "")
    lines.append(f"### {p['days']} day(s) × {p['rows_per_day']:,} rows/day = {src['rows']:,} rows, "
                 f"shape {p['shape']}; median of {p['repeat']} (fresh clone per run)")
    lines.append("")
    lines.append(f"{peers}Server: {meta['server']}. Source fingerprint {src['fingerprint']}.")
    lines.append("")
    lines.append("| tool | builds | backfill wall s (runs) | rows/s | correctness "
                 "| hourly p50/p95/p99 max rel. error | daily p50/p95/p99 max rel. error |")
    lines.append("|---|---|---:|---:|---|---:|---:|")
    for r in results:
        w = f"{r['wall_s']:.2f}" + (f" ({', '.join(f'{t:.2f}' for t in r['all_wall_s'])})"
                                   if len(r["all_wall_s"]) > 1 else "")
        rps = f"{r['rows_per_s']:,}" if r["rows_per_s"] else "—"
        lines.append(f"| {r['tool']} ({r['version']}) | {r['builds']} | {w} | {rps} | {r['correctness']} "
                     f"| {r['hourly_percentile_max_rel_error']} | {r['daily_percentile_max_rel_error']} |")
    lines.append("")
    lines.append("Every tool's outputs are checked against `bench_verify.*` (expected.sql) row by row on the key: "
                 "counts, sums, distinct counts and peak credits exact; means, health score and hourly percentiles "
                 f"to {REL:g} relative; daily percentiles to {SKETCH:.0%} relative (SPEC's sketch error).")
    lines.append("")
    tally = next((r for r in results if r["tool"] == "tally"), None)
    if tally and "setup_s" in tally:
        lines.append(f"tally's wall time is `tally backfill` alone, spawn to exit; `tally db upgrade` ran before it "
                     f"on the same clone, timed apart: {tally['setup_s']:.2f} s "
                     f"(runs: {', '.join(f'{t:.2f}' for t in tally['all_setup_s'])}); "
                     f"both together {tally['wall_with_setup_s']:.2f} s.")
        lines.append("")
    if tally:
        for name in ("sqlmesh+credit", "sqlmesh"):
            sm = next((r for r in results if r["tool"] == name), None)
            if sm and sm["wall_s"]:
                same = "same outputs" if name.endswith("+credit") else "SQLMesh builds two of tally's three outputs"
                extra = (f"; with db upgrade {tally['wall_with_setup_s'] / sm['wall_s']:.2f}"
                         if "wall_with_setup_s" in tally else "")
                lines.append(f"**tally / {name}** ({same}): {tally['wall_s'] / sm['wall_s']:.2f}{extra}")
                lines.append("")
        st = tally.get("steps_of_median_run")
        if st:
            wall = st["wall_s"] or 1.0
            lines.append(f"tally's time, step by step (run {tally['steps_run_index']} of {len(tally['runs'])}, "
                         "the median; `analytics.aggregation_runs`: sum of finished_at − started_at per rollup "
                         "and step):")
            lines.append("")
            lines.append("| rollup | step | attempts | s | ms per attempt | rows written | share of wall |")
            lines.append("|---|---|---:|---:|---:|---:|---:|")
            for s in st["steps"]:
                per = 1000 * s["seconds"] / s["attempts"] if s["attempts"] else 0
                fail = f" ({s['failed']} failed)" if s["failed"] else ""
                lines.append(f"| {s['rollup']} | {s['step']} | {s['attempts']}{fail} | {s['seconds']:.2f} | "
                             f"{per:.1f} | {s['rows_written']:,} | {100 * s['seconds'] / wall:.0f} % |")
            lines.append(f"| | all steps | | {st['steps_s']:.2f} | | | {100 * st['steps_s'] / wall:.0f} % |")
            for key, what in (("before_first_step_s", "before the first step: interpreter, imports, connect, plan"),
                              ("between_steps_s", "between steps: planning each bucket, lock, commit"),
                              ("after_last_step_s", "after the last step: last commit, report, exit")):
                if key in st:
                    lines.append(f"| | {what} | | {st[key]:.2f} | | | {100 * st[key] / wall:.0f} % |")
            lines.append(f"| | wall (spawn to exit of `tally backfill`) | | {st['wall_s']:.2f} | | | 100 % |")
            lines.append("")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=os.environ.get("BENCH_PG_URL"),
                    help="admin URL, e.g. postgresql://postgres@127.0.0.1:5432/postgres")
    ap.add_argument("--days", type=int, default=2)
    ap.add_argument("--rows-per-day", type=int, default=200_000)
    ap.add_argument("--start-date", default="2024-01-01")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--shape", choices=["independent", "realistic"], default="independent",
                    help="independent: user and agent drawn independently of the workspace (almost every execution "
                         "has its own workspace/user/agent key); realistic: each user belongs to one workspace and "
                         "uses three agents")
    ap.add_argument("--with-credit", action="store_true",
                    help="the peers also build analytics.credit_consumption_hourly: the same hourly outputs as tally")
    ap.add_argument("--also-without-credit", action="store_true",
                    help="with --with-credit: each peer also runs its two-model project in the same run")
    ap.add_argument("--tools", default="tally,sqlmesh,dbt",
                    help="comma list: tally, tally_seq (tally --jobs 1), sqlmesh, dbt, sqlmesh_b1 (per-interval "
                         "batches); '' for none")
    ap.add_argument("--tally", default=None,
                    help="the tally executable (default: `tally` next to this Python, i.e. the project's venv)")
    ap.add_argument("--custom", action="append", default=[], metavar="NAME=CMD",
                    help="extra tool: shell command run in a fresh clone (see Custom)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2,
                    help="SQLMesh concurrent_tasks; dbt gets 2x this (default: nproc)")
    ap.add_argument("--tally-jobs", type=int, default=None,
                    help="tally backfill --jobs (default: --threads, as SQLMesh's concurrent_tasks); the tool "
                         "tally_seq runs with --jobs 1")
    ap.add_argument("--dbt-threads", type=int, default=None,
                    help="dbt threads (default: 2 x --threads, see Dbt.extra_env)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per tool, each on a fresh clone; median reported")
    ap.add_argument("--reuse-source", action="store_true",
                    help="reuse an existing generated source database with the same parameters")
    ap.add_argument("--drop-source", action="store_true", help="drop the source database at the end")
    ap.add_argument("--keep", action="store_true", help="keep the per-tool databases")
    ap.add_argument("--db-prefix", default="peers_",
                    help="prefix of the databases this run creates: <prefix>src_…, <prefix><tool> (default peers_)")
    ap.add_argument("--workdir", default="/tmp/peers_run")
    ap.add_argument("--json", default=None, metavar="FILE", help="also write results.json here")
    ap.add_argument("--timeout", type=int, default=7200, help="seconds per backfill")
    # negative test of the verification: TOOL=KIND edits TOOL's output before it is verified
    ap.add_argument("--perturb", action="append", default=[], help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if not a.url:
        ap.error("--url (or BENCH_PG_URL) is required")
    if a.also_without_credit and not a.with_credit:
        ap.error("--also-without-credit goes with --with-credit")
    if a.dbt_threads is None:
        a.dbt_threads = 2 * a.threads
    start = dt.datetime.fromisoformat(a.start_date).replace(tzinfo=dt.timezone.utc)
    end = start + dt.timedelta(days=a.days)
    a.start_ts, a.end_ts = start.strftime("%Y-%m-%d %H:%M:%S"), end.strftime("%Y-%m-%d %H:%M:%S")
    a.start_iso, a.end_iso = start.strftime("%Y-%m-%dT%H:%MZ"), end.strftime("%Y-%m-%dT%H:%MZ")
    return a


def find_tally(given: str | None) -> str:
    cand = [given] if given else [str(Path(sys.executable).parent / "tally"), str(ROOT / ".venv/bin/tally"),
                                  shutil.which("tally")]
    for c in cand:
        if c and os.access(c, os.X_OK):
            return c
    sys.exit(f"tally executable not found ({given or 'next to ' + sys.executable}): "
             "create the project's venv (python3 -m venv .venv && .venv/bin/pip install -e .) or pass --tally")


def build_tools(a) -> list[Tool]:
    tools: list[Tool] = []
    peers = {"sqlmesh": SQLMesh, "sqlmesh_b1": SQLMeshPerInterval, "dbt": Dbt}
    for t in filter(None, (x.strip() for x in a.tools.split(","))):
        if t == "tally":  # as many steps at once as SQLMesh runs models (--threads), unless --tally-jobs
            tools.append(Tally(find_tally(a.tally), a.tally_jobs or a.threads))
        elif t == "tally_seq":  # one step at a time
            tools.append(Tally(find_tally(a.tally), 1, "tally_seq"))
        elif t in peers:
            tools.append(peers[t](a.with_credit))
            if a.also_without_credit:
                tools.append(peers[t](False))
        else:
            sys.exit(f"unknown tool {t!r} (tally, tally_seq, sqlmesh, dbt, sqlmesh_b1)")
    tools += [Custom(s) for s in a.custom]
    return tools


def parse_perturb(specs: list[str], tools: list[Tool]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for spec in specs:
        name, _, kind = spec.partition("=")
        if kind not in PERTURBATIONS or name not in {t.name for t in tools}:
            sys.exit(f"--perturb TOOL=KIND: TOOL one of {[t.name for t in tools]}, KIND one of {list(PERTURBATIONS)}")
        out.setdefault(name, []).append(kind)
    return out


def main(argv=None) -> int:
    a = parse_args(argv)
    pg = PG(a.url, find_psql())
    tools = build_tools(a)
    perturbations = parse_perturb(a.perturb, tools)

    server = pg.scalar("SELECT version()")
    log(f"server: {server}")
    log(f"data: {a.days} days x {a.rows_per_day} rows/day from {a.start_date} (seed {a.seed}, shape {a.shape}); "
        f"window [{a.start_ts}, {a.end_ts}) UTC; threads={a.threads} (dbt {a.dbt_threads}); "
        f"tools: {', '.join(t.name for t in tools)}")
    src = prepare_source(pg, a)
    log(f"source rows: {src['rows']}  fingerprint {src['fingerprint']}  expected rows {src['expected_rows']}  "
        f"size {src['size_bytes'] / 2**20:.0f} MiB")

    run_dir = Path(a.workdir) / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    versions = {t.name: t.version() for t in tools}
    runs: dict[str, list[dict]] = {t.name: [] for t in tools}
    for i in range(a.repeat):  # interleaved, so a drift of the machine touches every tool alike
        for tool in tools:
            log(f"{tool.name} run {i + 1}/{a.repeat}")
            runs[tool.name].append(run_tool(pg, a, tool, src, run_dir / f"{tool.name}-{i + 1}",
                                            perturbations.get(tool.name, [])))
    results = [summarize_tool(t, versions[t.name], runs[t.name], src) for t in tools]
    if a.drop_source:
        pg.query(f'DROP DATABASE IF EXISTS "{src["db"]}"')

    meta = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"nproc": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "server": server,
        "params": {"days": a.days, "rows_per_day": a.rows_per_day, "start_date": a.start_date, "seed": a.seed,
                   "shape": a.shape, "with_credit": a.with_credit, "also_without_credit": a.also_without_credit,
                   "threads": a.threads, "dbt_threads": a.dbt_threads, "repeat": a.repeat,
                   "perturb": a.perturb},
        "tolerances": {"exact": "counts, sums, distinct counts, peak credits", "relative": REL,
                       "daily_percentiles_relative": SKETCH},
        "source": src, "results": results,
    }
    text = json.dumps(meta, indent=2, default=str)
    (run_dir / "results.json").write_text(text)
    if a.json:
        Path(a.json).write_text(text)
    table = report(meta)
    (run_dir / "report.md").write_text(table + "\n")
    print()
    print(table)
    print(f"results: {run_dir / 'results.json'} (report.md beside it)")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
