"""bench/peers/run.py verifies tally the way it verifies the peers, and its check can fail.

Tally only (no SQLMesh or dbt): a 1-day × 2 000-row source from the benchmark's own gen.sql
and expected.sql, tally's `db upgrade` + `backfill --rollups hourly,daily` run by the
harness on a fresh clone, its three outputs verified with SPEC's tolerances; then each
deliberate edit of one output row (PERTURBATIONS) on a copy of that result must be caught,
or (0.5 % on a daily percentile) accepted; and the whole command exits 1 on a wrong output.
"""
from __future__ import annotations

import importlib.util
import shutil
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _harness():
    """bench/peers/run.py as a module (it is a script, not part of the package)."""
    if "bench_peers_run" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_peers_run", ROOT / "bench" / "peers" / "run.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["bench_peers_run"] = mod  # dataclasses look their module up
        spec.loader.exec_module(mod)
    return sys.modules["bench_peers_run"]


@pytest.fixture(scope="module")
def peers(admin_url, tmp_path_factory):
    """The harness module, its connection, its arguments and tally's verified first run (kept)."""
    run = _harness()
    if not (shutil.which("psql") or list(Path(sys.prefix).glob("lib/python3*/site-packages/pgserver/pginstall/bin/psql"))):
        pytest.skip("no psql client: the harness talks to PostgreSQL through psql")
    work = tmp_path_factory.mktemp("peers")
    prefix = f"peers_test_{uuid.uuid4().hex[:8]}_"
    argv = ["--url", admin_url, "--days", "1", "--rows-per-day", "2000", "--tools", "tally",
            "--db-prefix", prefix, "--workdir", str(work), "--keep"]
    a = run.parse_args(argv)
    pg = run.PG(admin_url, run.find_psql())
    try:
        src = run.prepare_source(pg, a)
        tally = run.Tally(run.find_tally(None))
        first = run.run_tool(pg, a, tally, src, work / "tally-1", [])
        first["result_db"] = f"{prefix}result"  # a copy the perturbations start from, whatever runs after
        run.clone_db(pg, first["db"], first["result_db"])
        yield run, pg, a, argv, src, first
    finally:
        for (db,) in pg.query(f"SELECT datname FROM pg_database WHERE datname LIKE '{prefix}%'"):
            pg.query(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def test_tally_is_timed_and_verified_like_a_peer(peers):
    run, pg, a, argv, src, first = peers
    assert src["rows"] == 2000
    assert first["exit"] == 0 and first["wall_s"] > 0 and first["setup_s"] > 0
    v = first["verification"]
    assert v["ok"], run.summarize(v)
    assert set(v) >= {"hourly", "daily", "credit"}  # credit_consumption_hourly verified too
    for label in ("hourly", "daily", "credit"):
        assert v[label]["rows"] == v[label]["expected_rows"] == src["expected_rows"][label] > 0
    # hourly percentiles exact; daily ones from sketches, within SPEC's 1 % (documented: <= 0.5 %)
    assert max(v["hourly"]["max_rel_error"][c] for c in ("p50_runtime", "p95_runtime", "p99_runtime")) <= run.REL
    daily = max(v["daily"]["max_rel_error"][c] for c in ("p50_runtime", "p95_runtime", "p99_runtime"))
    assert 0 < daily <= run.SKETCH
    # tally's time per step, from its ledger
    steps = {(s["rollup"], s["step"]): s["attempts"] for s in first["ledger"]["steps"]}
    assert steps == {("hourly", "execution_metrics"): 24, ("hourly", "user_activity"): 24,
                     ("hourly", "credit_consumption"): 24, ("daily", "daily_metrics"): 1}
    led = first["ledger"]
    assert abs(led["steps_s"] + led["unaccounted_s"] - first["wall_s"]) < 0.01


@pytest.mark.parametrize("kind", sorted(_harness().PERTURBATIONS))
def test_a_perturbed_output_is_caught(peers, kind):
    run, pg, a, argv, src, first = peers
    label, passes, _ = run.PERTURBATIONS[kind]
    copy = f"{a.db_prefix}perturbed"
    run.clone_db(pg, first["result_db"], copy)
    try:
        run.perturb(pg, copy, kind)
        v = run.verify(pg, copy, run.Tally("tally"))
    finally:
        pg.query(f'DROP DATABASE IF EXISTS "{copy}"')
    assert v["ok"] is passes, run.summarize(v)
    assert v[label]["ok"] is passes
    assert all(v[o]["ok"] for o in ("hourly", "daily", "credit") if o != label)


def test_the_run_exits_1_on_a_wrong_output(peers, capsys):
    run, pg, a, argv, src, first = peers
    assert run.main(argv + ["--reuse-source", "--perturb", "tally=daily_p95_2pct"]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH daily: p95_runtime=1" in out
