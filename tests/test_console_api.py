"""The console over HTTP: every page and its JSON, /metrics against the state, auth, cross-site
refusals, the read-only dashboard role, actions through a real worker.

``tally serve`` runs as a subprocess on a real database with real history: hours aggregated by
the Runner, a step that failed for real (a trigger raising P0001), a late row that makes an
hour dirty, and a sealed hour (as the data lifecycle leaves one).
"""
from __future__ import annotations

import datetime as dt
import os
import re
import subprocess
import sys
import time
import uuid

import psycopg
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families


from celery_support import TALLY, Worker, free_port, wait_for  # noqa: E402
from console_support import AUTH, HOUR, Server, current_hour, populate, url_as  # noqa: E402
from support import cli, throwaway_db  # noqa: E402
from tally import buckets as B  # noqa: E402
from tally import ledger as L  # noqa: E402
from tally.errors import InvalidInput  # noqa: E402
from tally.steps import ROLLUP_STEPS  # noqa: E402

pytest_plugins = ["celery_support", "console_support"]

TIMEOUT = 120


@pytest.fixture(scope="module")
def history(admin_url, template_db):
    """A database with 30 hours of real history ending at the current hour (see populate), and its
    oldest hour sealed with 3 ignored changes (what the data lifecycle leaves)."""
    with throwaway_db(admin_url, template_db, prefix="tally_web") as url:
        h = populate(url, current_hour())
        h["sealed"] = h["start"]
        with psycopg.connect(url, autocommit=True) as c:
            c.execute("UPDATE analytics.bucket_state SET state = 'sealed', sealed_at = now(), ignored_changes = 3 "
                      "WHERE rollup = 'hourly' AND bucket_start = %s", (h["sealed"],))
        h["url"] = url
        yield h


@pytest.fixture(scope="module")
def server(history, broker, tmp_path_factory):
    """The console without credentials (read-only: actions disabled), on 127.0.0.1."""
    s = Server({**broker, "TALLY_DATABASE_URL": history["url"], "TALLY_WEB_AUTH": ""},
               tmp_path_factory.mktemp("serve") / "serve.log")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def guarded(history, broker, tmp_path_factory):
    """The console with TALLY_WEB_AUTH (actions enabled) on a broker prefix of its own: the tasks it
    sends here reach no worker."""
    prefix = f"tally-test-{uuid.uuid4().hex[:10]}:"
    env = {**broker, "TALLY_BROKER_PREFIX": prefix, "TALLY_DATABASE_URL": history["url"],
           "TALLY_WEB_AUTH": ":".join(AUTH)}
    s = Server(env, tmp_path_factory.mktemp("guarded") / "serve.log")
    yield s
    s.stop()
    r = redis.Redis.from_url(broker["TALLY_BROKER_URL"])
    for k in r.scan_iter(match=f"{prefix}*", count=1000):  # the tasks no worker was there to take
        r.delete(k)


def label(t: dt.datetime) -> str:
    return B.HOUR.label(t)


def token_of(html: str) -> str:
    return re.search(r'name="csrf" value="([0-9a-f]+)"', html).group(1)


# ---- pages and their JSON -------------------------------------------------------------------------

def test_every_page_and_its_json_answer(server, history):
    failing, start, end = label(history["failing"]), label(history["start"]), label(history["end"])
    day = B.DAY.label(history["failing"])
    pages = ["/", "/grid", f"/grid?by=hour&from={start}&to={end}", "/grid?by=day", "/grid?by=week", "/grid?by=month",
             f"/bucket/hourly/{failing}", f"/bucket/daily/{day}", f"/bucket/weekly/{B.WEEK.label(B.WEEK.floor(history['failing']))}",
             f"/bucket/monthly/{B.MONTH.label(history['failing'])}", "/runs", "/runs?status=failed&rollup=hourly",
             "/runs?page=2", "/output", f"/output?grain=day&from={start}&to={end}", "/output?grain=week",
             "/output?grain=month&top=2", f"/output?workspace=ws-0001&from={start}&to={end}"]
    for path in pages:
        r = server.get(path)
        assert r.status_code == 200, (path, r.text[-2000:])
        assert r.headers["content-type"].startswith("text/html")
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
        assert "<script" not in r.text  # readable with JavaScript off: there is none
        api = server.get("/api" + (path if path != "/" else "/overview"))
        assert api.status_code == 200, (path, api.text[-2000:])
        data = api.json()
        times = re.findall(r'"(\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}[^"]*)"', api.text)
        assert times and all("T" in t for t in times), (path, times[:3])
        assert data
    for asset in ("/static/console.css", "/static/favicon.svg"):
        assert server.get(asset).status_code == 200


def test_the_overview_and_grid_show_the_failure_the_dirty_hour_and_the_sealed_hour(server, history):
    overview = server.get("/api/overview").json()
    steps = {(s["rollup"], s["step"]): s for s in overview["steps"]}
    assert [f["bucket"] for f in steps[("hourly", "user_activity")]["failing"]] == [label(history["failing"])]
    assert "injected fault" in steps[("hourly", "user_activity")]["failing"][0]["why"]
    assert steps[("hourly", "execution_metrics")]["window"]["dirty"] == 1
    assert steps[("hourly", "user_activity")]["window"]["dirty"] == 0  # a late execution is not an event
    assert steps[("hourly", "execution_metrics")]["fresh"]["bucket"] == label(history["end"] - HOUR)
    strip = steps[("hourly", "user_activity")]["strip"]
    assert {c["bucket"]: c["state"] for c in strip}[label(history["failing"])] == "failed"

    grid = server.get(f"/api/grid?by=day&from={label(history['start'])}&to={label(history['end'])}").json()
    cells = {(c["step"], c["bucket"]): c["state"] for row in grid["rows"] for s in row["strips"].values() for c in s}
    assert cells[("user_activity", label(history["failing"]))] == "failed"
    assert cells[("execution_metrics", label(history["dirty"]))] == "dirty"
    assert cells[("execution_metrics", label(history["sealed"]))] == "sealed"
    html = server.get(f"/grid?by=day&from={label(history['start'])}&to={label(history['end'])}").text
    assert f'data-state="failed" data-bucket="{label(history["failing"])}" data-step="user_activity"' in html
    assert f'href="/bucket/hourly/{label(history["dirty"])}"' in html  # every cell a link to its bucket

    bucket = server.get(f"/bucket/hourly/{label(history['failing'])}")
    assert "injected fault in user_activity_hourly" in bucket.text
    data = server.get(f"/api/bucket/hourly/{label(history['failing'])}").json()
    assert data["failed_steps"] == ["user_activity"]
    assert [a["status"] for a in data["attempts"] if a["step"] == "user_activity"] == ["failed"]
    dirty = server.get(f"/api/bucket/hourly/{label(history['dirty'])}").json()
    assert [m["source"] for m in dirty["marks"]] == ["execution_logs"]


def test_grid_navigation_moves_by_its_own_span(server):
    html = server.get("/grid?by=day&from=2026-03-01T00:00Z&to=2026-03-15T00:00Z").text
    assert 'href="/grid?by=day&amp;from=2026-02-15T00:00Z&amp;to=2026-03-01T00:00Z" rel="prev"' in html
    assert 'href="/grid?by=day&amp;from=2026-03-15T00:00Z&amp;to=2026-03-29T00:00Z" rel="next"' in html
    html = server.get("/grid?by=month&from=2026-01-01T00:00Z&to=2027-01-01T00:00Z").text
    assert "from=2025-01-01T00:00Z&amp;to=2026-01-01T00:00Z" in html
    data = server.get("/api/grid?by=week&from=2026-03-02T00:00Z&to=2026-03-16T00:00Z").json()
    assert [r["bucket"] for r in data["rows"]] == ["2026-03-02", "2026-03-09"]
    assert len(data["rows"][0]["strips"]["daily_metrics"]) == 7


def test_bad_input_is_one_line_and_no_traceback(server):
    for path, status, words in [("/grid?by=year", 400, "year"), ("/grid?from=2026-11-25T00:30Z", 400, "on the hour"),
                                ("/bucket/hourly/2026-13-01T00:00Z", 400, "2026-13-01"),
                                ("/bucket/weekly/2026-11-25", 400, "Monday"), ("/bucket/yearly/2026", 400, "yearly"),
                                ("/runs?status=lost", 400, "lost"), ("/runs?page=0", 400, "page"),
                                ("/output?grain=hour&from=2020-01-01T00:00Z&to=2026-01-01T00:00Z", 400, "days"),
                                ("/no/such/page", 404, "Not Found")]:
        for prefix in ("", "/api"):
            if prefix and path.startswith("/no/"):
                continue
            r = server.get(prefix + path)
            assert r.status_code == status, (prefix + path, r.status_code, r.text[-500:])
            text = r.json()["error"] if prefix else re.search(r'<p class="error-line">(.*?)</p>', r.text, re.S).group(1)
            assert words in text and "\n" not in text.strip() and "Traceback" not in r.text, (path, text)


def test_runs_are_filtered_and_paginated(server, history):
    failed = server.get("/api/runs?status=failed").json()
    assert [(r["step"], r["bucket"]) for r in failed["runs"]] == [("user_activity", label(history["failing"]))]
    one = server.get(f"/api/runs?rollup=hourly&step=execution_metrics&from={label(history['dirty'])}"
                     f"&to={label(history['dirty'] + HOUR)}").json()
    assert [(r["rollup"], r["step"], r["bucket"], r["trigger"]) for r in one["runs"]] == [
        ("hourly", "execution_metrics", label(history["dirty"]), "schedule")]
    first, second = server.get("/api/runs").json(), server.get("/api/runs?page=2").json()
    assert first["has_next"] and len(first["runs"]) == 50
    assert [r["id"] for r in first["runs"]] == sorted((r["id"] for r in first["runs"]), reverse=True)
    assert first["runs"][-1]["id"] > second["runs"][0]["id"]
    assert server.get("/api/runs?trigger=manual").json()["runs"] == []
    html = server.get("/runs").text
    assert 'href="/runs?page=2" rel="next"' in html


def test_find_runs_filters_each_column_and_refuses_what_names_nothing(conn, db_url):
    seed_start = dt.datetime(2026, 3, 2, tzinfo=dt.timezone.utc)
    from support import seed

    seed(db_url, seed_start, 3)
    assert cli("backfill", "--from", "2026-03-02T00:00Z", "--to", "2026-03-02T03:00Z", "--rollups", "hourly").code == 0
    assert cli("run", "hourly", "--hour", "2026-03-02T01:00Z").code == 0
    every = L.find_runs(conn, limit=100)
    assert len(every) == 12 and [r["id"] for r in every] == sorted((r["id"] for r in every), reverse=True)
    assert {r["trigger"] for r in L.find_runs(conn, trigger="manual")} == {"manual"}
    assert len(L.find_runs(conn, trigger="backfill")) == 9
    assert {r["step"] for r in L.find_runs(conn, step="user_activity")} == {"user_activity"}
    hour = L.find_runs(conn, start=seed_start + HOUR, end=seed_start + 2 * HOUR)
    assert {r["bucket"] for r in hour} == {"2026-03-02T01:00Z"} and len(hour) == 6
    assert L.find_runs(conn, since=dt.datetime.now(dt.timezone.utc) + HOUR) == []
    assert [r["id"] for r in L.find_runs(conn, limit=5, offset=5)] == [r["id"] for r in every[5:10]]
    assert L.find_runs(conn, status="failed") == []
    for bad in (dict(rollup="yearly"), dict(step="nope"), dict(status="lost"), dict(trigger="cron"),
                dict(rollup="daily", step="execution_metrics"), dict(limit=0), dict(offset=-1),
                dict(start=seed_start, end=seed_start)):
        with pytest.raises(InvalidInput):
            L.find_runs(conn, **bad)


# ---- /metrics ---------------------------------------------------------------------------------------

def scrape(server, **kw) -> dict[str, dict]:
    """{metric: {labels (sorted tuple): value}} parsed by prometheus_client's own parser."""
    r = server.get("/metrics", **kw)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    out: dict[str, dict] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def key(rollup: str, step: str, **more) -> tuple:
    return tuple(sorted({"rollup": rollup, "step": step, **more}.items()))


def test_metrics_agree_with_the_state(server, history):
    before = time.time()
    m = scrape(server)
    after = time.time()
    end = history["end"].timestamp()
    for step in ROLLUP_STEPS["hourly"]:
        assert m["tally_fresh_bucket_end_timestamp_seconds"][key("hourly", step)] == end
        assert before - end <= m["tally_freshness_seconds"][key("hourly", step)] <= after - end
        assert m["tally_window_buckets"][key("hourly", step, state="sealed")] == 1
        assert m["tally_sealed_buckets"][key("hourly", step)] == 1
        assert m["tally_sealed_ignored_changes"][key("hourly", step)] == 3
    assert m["tally_failing_buckets"][key("hourly", "user_activity")] == 1
    assert m["tally_failing_buckets"][key("hourly", "execution_metrics")] == 0
    assert m["tally_window_buckets"][key("hourly", "user_activity", state="failed")] == 1
    assert m["tally_window_buckets"][key("hourly", "execution_metrics", state="dirty")] == 1
    assert m["tally_window_buckets"][key("hourly", "credit_consumption", state="dirty")] == 1
    assert m["tally_window_buckets"][key("hourly", "user_activity", state="dirty")] == 0
    days = settings_days()
    for step in ROLLUP_STEPS["hourly"]:  # every hour of the window is in exactly one state
        assert sum(v for k, v in m["tally_window_buckets"].items() if dict(k)["step"] == step) == 24 * days
    assert m["tally_freshness_seconds"][key("weekly", "weekly_metrics")] == float("inf")  # never ok
    assert m["tally_attempts_24h"][key("hourly", "user_activity", status="failed")] == 1
    with psycopg.connect(history["url"]) as c:
        marks = dict(c.execute("SELECT source, count(*) FROM analytics.dirty_log GROUP BY source").fetchall())
        rows = c.execute("SELECT rows_written FROM analytics.aggregation_runs WHERE rollup = 'hourly' "
                         "AND step = 'execution_metrics' AND status = 'succeeded' ORDER BY id DESC LIMIT 1").fetchone()[0]
    assert {dict(k)["source"]: v for k, v in m["tally_dirty_log_marks"].items() if v} == marks
    assert m["tally_last_success_rows"][key("hourly", "execution_metrics")] == rows
    assert m["tally_last_attempt_succeeded"][key("hourly", "user_activity")] in (0.0, 1.0)
    assert m["tally_dirty_log_oldest_mark_age_seconds"][()] > 0


def settings_days() -> int:
    from tally.config import settings

    return settings().catchup_days


# ---- auth, cross-site requests, the bind ---------------------------------------------------------------

def test_a_public_bind_without_credentials_exits_2_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TALLY_WEB_AUTH"}
    for address in ("0.0.0.0", "::", "192.168.1.5", "example.com"):
        r = subprocess.run([TALLY, "serve", "--address", address, "--port", str(free_port())], env=env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, (address, r.stderr)
        assert r.stderr.strip().count("\n") == 0 and "TALLY_WEB_AUTH" in r.stderr and address in r.stderr
    r = subprocess.run([TALLY, "serve", "--port", "70000"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    bad = subprocess.run([TALLY, "serve", "--address", "0.0.0.0"], env={**env, "TALLY_WEB_AUTH": "nopassword"},
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "TALLY_WEB_AUTH must be user:password" in bad.stderr


def test_a_busy_port_is_one_line(server, history):
    r = subprocess.run([TALLY, "serve", "--port", str(server.port)], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "TALLY_DATABASE_URL": history["url"]})
    assert r.returncode == 2 and "address already in use" in r.stderr.strip().splitlines()[-1]


def test_import_tally_cli_does_not_load_the_web_stack():
    code = ("import sys, tally.cli; bad = [m for m in ('tally.web', 'starlette', 'uvicorn', 'jinja2', 'prometheus_client')"
            " if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_without_credentials_actions_are_disabled_with_the_reason(server, history):
    html = server.get(f"/bucket/hourly/{label(history['failing'])}").text
    assert re.search(r'<button type="submit" id="retry" disabled title="[^"]*TALLY_WEB_AUTH', html)
    assert "set TALLY_WEB_AUTH=user:password" in html
    assert server.get("/api/actions").json()["enabled"] is False
    r = server.post("/actions/retry", data={"rollup": "hourly", "bucket": label(history["failing"])},
                    headers={"Origin": server.base})
    assert r.status_code == 403 and "TALLY_WEB_AUTH" in r.text


def test_credentials_guard_every_page_and_actions_refuse_cross_site_posts(guarded, history):
    assert guarded.get("/").status_code == 401
    assert guarded.get("/").headers["www-authenticate"].startswith("Basic")
    assert guarded.get("/metrics").status_code == 401 and guarded.get("/api/overview").status_code == 401
    assert guarded.get("/", auth=(AUTH[0], "wrong")).status_code == 401
    assert guarded.get("/healthz").status_code == 200
    page = guarded.get(f"/bucket/hourly/{label(history['failing'])}", auth=AUTH)
    assert page.status_code == 200 and 'id="retry" disabled' not in page.text
    token = token_of(page.text)
    form = {"rollup": "hourly", "bucket": label(history["failing"]), "csrf": token}
    same = {"Origin": guarded.base}

    assert guarded.post("/actions/retry", data=form, headers=same).status_code == 401  # no credentials
    for headers, data in [({}, form),  # no Origin, no Referer
                          ({"Origin": "https://evil.example"}, form),
                          ({"Origin": "null"}, form),
                          ({"Referer": "http://127.0.0.1.evil.example/x"}, form),
                          (same, {k: v for k, v in form.items() if k != "csrf"}),
                          (same, {**form, "csrf": "0" * 64})]:
        r = guarded.post("/actions/retry", data=data, headers=headers, auth=AUTH)
        assert r.status_code == 403, (headers, data, r.status_code, r.text)
        assert "refused" in r.text
    assert guarded.post("/api/actions/retry", data=form, headers=same, auth=AUTH).status_code == 415
    assert guarded.post("/api/actions/retry", json=form, headers={"Origin": "https://evil.example"},
                        auth=AUTH).status_code == 403

    sent = guarded.post("/actions/retry", data=form, headers=same, auth=AUTH)
    assert sent.status_code == 303, sent.text
    assert re.fullmatch(rf"/bucket/hourly/{re.escape(label(history['failing']))}\?action=retry&task=[0-9a-f-]{{36}}"
                        r"&since=\d+", sent.headers["location"])
    referer = guarded.post("/actions/verify", data=form, headers={"Referer": guarded.base + "/grid"}, auth=AUTH)
    assert referer.status_code == 303 and "?verify=" in referer.headers["location"]
    api = guarded.post("/api/actions/rerun", json={"rollup": "hourly", "bucket": label(history["dirty"])}, auth=AUTH)
    assert api.status_code == 202 and api.json()["task"] and api.json()["progress"].startswith("/bucket/hourly/")
    bad = guarded.post("/api/actions/rerun", json={"rollup": "hourly", "bucket": "2026-11-25T00:30Z"}, auth=AUTH)
    assert bad.status_code == 400 and "on the hour" in bad.json()["error"]


def test_actions_are_disabled_with_the_reason_when_no_broker_answers(history, broker, tmp_path):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    s = Server({**broker, "TALLY_BROKER_URL": dead, "TALLY_DATABASE_URL": history["url"],
                "TALLY_WEB_AUTH": ":".join(AUTH)}, tmp_path / "serve.log")
    try:
        page = s.get(f"/bucket/hourly/{label(history['failing'])}", auth=AUTH)
        assert page.status_code == 200
        assert re.search(r'id="retry" disabled title="no broker answers at redis://127.0.0.1:\d+/0', page.text)
        assert "Actions disabled: no broker answers" in page.text
        r = s.post("/actions/retry", auth=AUTH, headers={"Origin": s.base},
                   data={"rollup": "hourly", "bucket": label(history["failing"]), "csrf": token_of(page.text)})
        assert r.status_code == 503 and "no broker answers" in r.text
        status = s.get("/api/actions", auth=AUTH).json()
        assert status["enabled"] is False and status["reason"].startswith("no broker answers at redis://")
    finally:
        s.stop()


# ---- the read-only dashboard role; passwords ------------------------------------------------------------

def test_every_page_works_as_the_dashboard_role_and_no_page_shows_its_password(history, login_roles, admin_url,
                                                                                tmp_path, monkeypatch):
    login_roles.dbs.append(history["url"])
    group = login_roles("dg", "", options="NOLOGIN")
    monkeypatch.setenv("TALLY_DATABASE_URL", history["url"])
    assert cli("db", "roles", "--worker", login_roles("wg", "", options="NOLOGIN"), "--dashboard", group).code == 0
    password = f"Pw-{uuid.uuid4().hex[:8]}-p@ss:w/rd"
    user = login_roles("dash", password, member_of=group)
    url = url_as(history["url"], user, password)
    with psycopg.connect(url) as c:  # it is read-only indeed
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("SELECT count(*) FROM public.execution_logs")
    s = Server({"TALLY_DATABASE_URL": url, "TALLY_WEB_AUTH": ""}, tmp_path / "serve.log")
    try:
        failing = label(history["failing"])
        for path in ["/", "/grid", "/grid?by=day", "/grid?by=week", "/grid?by=month", f"/bucket/hourly/{failing}",
                     f"/bucket/daily/{B.DAY.label(history['failing'])}", "/runs", "/runs?status=failed", "/output",
                     "/output?grain=day", "/metrics", "/api/overview", "/api/grid", f"/api/bucket/hourly/{failing}",
                     "/api/runs", "/api/output", "/api/actions"]:
            r = s.get(path)
            assert r.status_code == 200, (path, r.text[-1500:])
            assert password not in r.text and urllib_quote(password) not in r.text, path
        assert user in s.get("/").text and "***" in s.get("/").text  # which database, password hidden
    finally:
        s.stop()
    assert password not in s.text() and urllib_quote(password) not in s.text()


def urllib_quote(text: str) -> str:
    import urllib.parse

    return urllib.parse.quote(text, safe="")


def test_an_unreachable_database_is_a_503_line_without_its_password(history, tmp_path):
    password = "not-the-Pa55word"
    url = url_as(history["url"], "nobody_" + uuid.uuid4().hex[:6], password)
    s = Server({"TALLY_DATABASE_URL": url, "TALLY_WEB_AUTH": ""}, tmp_path / "serve.log")
    try:
        for path in ("/", "/api/overview", "/metrics", "/grid"):
            r = s.get(path)
            assert r.status_code == 503, (path, r.status_code)
            assert password not in r.text and "***" in r.text and "Traceback" not in r.text
    finally:
        s.stop()
    assert password not in s.text()


# ---- actions through a real worker ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def acting(admin_url, template_db, broker, tmp_path_factory):
    """Its own database and history, a worker on it, and the console with credentials."""
    with throwaway_db(admin_url, template_db, prefix="tally_act") as url:
        h = populate(url, current_hour() - 48 * HOUR)
        env = {**broker, "TALLY_DATABASE_URL": url}
        w = Worker(env, tmp_path_factory.mktemp("worker") / "worker.log")
        s = Server({**env, "TALLY_WEB_AUTH": ":".join(AUTH)}, tmp_path_factory.mktemp("serve") / "serve.log")
        try:
            yield {**h, "url": url, "server": s, "worker": w}
        finally:
            s.stop()
            w.stop()


def finished(s: Server, task: str) -> dict | None:
    state = s.get(f"/api/tasks/{task}", auth=AUTH).json()
    return state if state["ready"] else None


def test_verify_runs_on_a_worker_and_reports_the_drift_per_column(acting):
    s = acting["server"]
    clean = s.post("/api/actions/verify", json={"rollup": "hourly", "bucket": label(acting["end"] - 2 * HOUR)},
                   auth=AUTH).json()
    drift = s.post("/api/actions/verify", json={"rollup": "hourly", "bucket": label(acting["dirty"])}, auth=AUTH).json()
    done = wait_for(lambda: finished(s, clean["task"]), TIMEOUT, "the clean verify")
    assert done["state"] == "SUCCESS" and done["result"]["clean"] and done["result"]["checked"] == {"hours": 1}
    done = wait_for(lambda: finished(s, drift["task"]), TIMEOUT, "the verify of the dirty hour")
    result = done["result"]
    assert not result["clean"]  # the late row is in the source, not yet in the output
    columns = {(c["table"], c["column"]) for c in result["columns"]}
    assert ("execution_metrics_hourly", "total_executions") in columns
    page = s.get(f"/bucket/hourly/{label(acting['dirty'])}?verify={drift['task']}", auth=AUTH).text
    assert 'id="verify-columns"' in page and "total_executions" in page


def test_backfill_action_sends_what_needs_work_and_the_grid_shows_its_progress(acting):
    s = acting["server"]
    start, end = acting["failing"] - 6 * HOUR, acting["failing"] + 2 * HOUR  # holds the dirty and the failed hour
    sent = s.post("/api/actions/backfill", json={"from": label(start), "to": label(end), "rollups": ["hourly"]},
                  auth=AUTH)
    assert sent.status_code == 202, sent.text
    body = sent.json()
    assert body["tasks"] == 2 and body["buckets"] == [f"hourly {label(acting['dirty'])}",
                                                      f"hourly {label(acting['failing'])}"]

    def progress():
        grid = s.get(body["progress"].replace("/grid", "/api/grid"), auth=AUTH).json()["progress"]
        return grid if grid["attempted"] >= 3 and not grid["busy"] else None
    p = wait_for(progress, TIMEOUT, "the backfill's steps")
    assert p["states"] == {"ok": 3}  # dirty: execution_metrics and credit_consumption; failed: user_activity
    assert p["tasks"] == 2
    with psycopg.connect(acting["url"]) as c:
        states = c.execute("SELECT step, state FROM analytics.bucket_state WHERE rollup = 'hourly' "
                           "AND bucket_start IN (%s, %s)", (acting["dirty"], acting["failing"])).fetchall()
    assert {st for _, st in states} == {"ok"}
    html = s.get(body["progress"], auth=AUTH).text
    assert 'id="progress"' in html and "3" in re.search(r'id="progress".*?</p>', html, re.S).group(0)


def test_rerun_action_runs_every_step_again(acting):
    s = acting["server"]
    hour = acting["end"] - 3 * HOUR
    page = s.get(f"/bucket/hourly/{label(hour)}", auth=AUTH)
    r = s.post("/actions/rerun", auth=AUTH, headers={"Origin": s.base},
               data={"rollup": "hourly", "bucket": label(hour), "csrf": token_of(page.text)})
    assert r.status_code == 303
    where = r.headers["location"]

    def done():
        data = s.get("/api" + where, auth=AUTH).json()
        return data if data["progress"]["done"] else None
    data = wait_for(done, TIMEOUT, "the re-run")
    assert sorted(x["step"] for x in data["progress"]["steps"]) == sorted(ROLLUP_STEPS["hourly"])
    assert {x["state"] for x in data["progress"]["steps"]} == {"ok"}
    assert [a["trigger"] for a in data["attempts"][:3]] == ["backfill"] * 3
