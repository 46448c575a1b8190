"""The console in a real browser: Debian's Chromium driven by Playwright, on a real database, a real
broker and a real worker.

The history (tests/console_support.py, ``populate``): 30 hours ending at the current hour, one
step that failed for real (a trigger raising on its first attempt), one hour made dirty by a late
row. The tests run in this file's order on that one history: the pages show the failure, the
retry action fixes it through the worker, verify shows the dirty hour's drift, a backfill from
the grid's form fixes the rest. Screenshots go to tests/artifacts/console/ (docs/CONSOLE.md
shows some of them). Without Chromium the module is skipped, naming the install command.
"""
from __future__ import annotations

import re

import psycopg
import pytest

from celery_support import Worker, wait_for  # noqa: E402
from console_support import (ARTIFACTS, AUTH, CHROMIUM_ARGS, HOUR, Server, chromium_or_skip,  # noqa: E402
                             current_hour, populate)
from support import throwaway_db  # noqa: E402
from tally import buckets as B  # noqa: E402
from tally.web.charts import fmt  # noqa: E402

pytest_plugins = ["celery_support", "console_support"]

TIMEOUT = 120


@pytest.fixture(scope="module")
def browser():
    executable = chromium_or_skip()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def site(browser, admin_url, template_db, broker, tmp_path_factory):
    """The history, a worker on it, and the console with credentials (actions enabled)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with throwaway_db(admin_url, template_db, prefix="tally_ui") as url:
        h = populate(url, current_hour())
        env = {**broker, "TALLY_DATABASE_URL": url}
        w = Worker(env, tmp_path_factory.mktemp("worker") / "worker.log")
        s = Server({**env, "TALLY_WEB_AUTH": ":".join(AUTH)}, tmp_path_factory.mktemp("serve") / "serve.log")
        try:
            yield {**h, "url": url, "server": s}
        finally:
            s.stop()
            w.stop()


@pytest.fixture
def page(browser, site):
    """A page logged in with the console's credentials; fails the test on any browser console error."""
    context = browser.new_context(http_credentials={"username": AUTH[0], "password": AUTH[1]},
                                  viewport={"width": 1440, "height": 900}, base_url=site["server"].base)
    p = context.new_page()
    errors: list[str] = []
    p.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    p.on("pageerror", lambda e: errors.append(str(e)))
    yield p
    context.close()
    assert not errors, errors  # no CSP violation, no missing asset


def label(t) -> str:
    return B.HOUR.label(t)


def shot(p, name: str) -> None:
    p.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def until(p, path: str, selector: str, what: str):
    """Load ``path`` until ``selector`` is on it (a worker is doing something meanwhile)."""
    def look():
        p.goto(path)
        return p.locator(selector).count() > 0
    wait_for(look, TIMEOUT, what, interval=0.5)


def test_the_overview_loads_and_reads_without_javascript(browser, site):
    context = browser.new_context(http_credentials={"username": AUTH[0], "password": AUTH[1]},
                                  viewport={"width": 1440, "height": 900}, java_script_enabled=False)
    p = context.new_page()
    try:
        r = p.goto(site["server"].base + "/")
        assert r.status == 200
        assert p.locator("h1").inner_text() == "Rollup health"
        assert p.locator("#tile-failing").inner_text() == "1"
        row = p.locator("#health-hourly-user_activity")
        assert row.locator(f'a.cell[data-state="failed"][data-bucket="{label(site["failing"])}"]').count() == 1
        assert p.locator("#health-hourly-execution_metrics a.cell[data-state=dirty]").count() == 1
        fresh = p.locator("#health-hourly-execution_metrics td").first.inner_text()
        assert fresh == f"{site['end']:%Y-%m-%d %H:%M}Z"  # the newest ok hour ends at the current hour
        shot(p, "overview")
    finally:
        context.close()


def test_a_bucket_that_failed_for_real_shows_on_the_grid_and_its_error_on_its_page(page, site):
    failing = label(site["failing"])
    page.goto(f"/grid?by=day&from={label(B.DAY.floor(site['start']))}&to={label(B.DAY.advance(B.DAY.floor(site['end'])))}")
    cell = page.locator(f'a.cell[data-state="failed"][data-step="user_activity"][data-bucket="{failing}"]')
    assert cell.count() == 1
    assert page.locator('a.cell[data-state="dirty"][data-step="execution_metrics"]').count() == 1
    shot(page, "grid-days")
    page.goto(f"/grid?by=hour&from={label(site['failing'] - 12 * HOUR)}&to={label(site['failing'] + 4 * HOUR)}")
    assert page.locator(f'a.cell[data-state="failed"][data-bucket="{failing}"]').inner_text().startswith("failed")
    shot(page, "grid-hours")
    page.locator(f'a.cell[data-state="failed"][data-bucket="{failing}"]').click()
    page.wait_for_url(re.compile(rf"/bucket/hourly/{re.escape(failing)}$"))
    assert page.locator("#step-user_activity").get_attribute("data-state") == "failed"
    error = page.locator("#error-user_activity").inner_text()
    assert "injected fault in user_activity_hourly" in error
    assert page.locator("#attempts tr[data-status=failed]").count() == 1
    shot(page, "bucket-failed")


def test_the_retry_action_with_a_real_worker_turns_it_ok(page, site):
    failing = label(site["failing"])
    page.goto(f"/bucket/hourly/{failing}")
    assert page.locator("#retry").is_enabled()
    page.locator("#retry").click()
    page.wait_for_url(re.compile(r"\?action=retry&task=[0-9a-f-]+&since=\d+$"))
    progress = page.url
    assert page.locator("#progress").count() == 1
    until(page, progress, '#step-user_activity[data-state="ok"]', "the retry to succeed")
    until(page, progress, "#progress.good", "the task to be reported done")
    assert "user_activity" in page.locator("#progress").inner_text()
    shot(page, "bucket-retried")
    with psycopg.connect(site["url"]) as c:
        attempts = c.execute("SELECT status, attempt, trigger FROM analytics.aggregation_runs WHERE rollup = 'hourly' "
                             "AND step = 'user_activity' AND bucket_start = %s ORDER BY id", (site["failing"],)).fetchall()
        state = c.execute("SELECT state FROM analytics.bucket_state WHERE rollup = 'hourly' AND step = 'user_activity' "
                          "AND bucket_start = %s", (site["failing"],)).fetchone()[0]
    assert attempts == [("failed", 1, "schedule"), ("succeeded", 2, "retry")] and state == "ok"
    page.goto("/")
    assert page.locator("#tile-failing").inner_text() == "0"


def test_the_output_page_draws_charts_whose_numbers_match_its_tables_and_the_rows(page, site):
    start, end = label(site["start"]), label(site["end"])
    page.goto(f"/output?grain=hour&workspace=ws-0001&from={start}&to={end}")
    checked = 0
    for section in page.locator("section.measure").all():
        measure = section.get_attribute("id").removeprefix("measure-")
        points = section.locator("svg.chart circle.point")
        cells = {(c.get_attribute("data-series"), c.get_attribute("data-label")): c.inner_text()
                 for c in section.locator("td[data-series]").all()}
        drawn = {(pt.get_attribute("data-series"), pt.get_attribute("data-label")): float(pt.get_attribute("data-value"))
                 for pt in points.all()}
        assert drawn and set(drawn) == {k for k, v in cells.items() if v != "–"}, measure
        for k, v in drawn.items():
            assert fmt(v, measure) == cells[k], (measure, k)
            checked += 1
    with psycopg.connect(site["url"]) as c:
        rows = dict(c.execute("SELECT hour, total_executions FROM analytics.execution_metrics_hourly "
                              "WHERE workspace_id = 'ws-0001' AND hour >= %s AND hour < %s", (site["start"], site["end"])))
    executions = {k[1]: v for k, v in drawn_of(page, "executions").items()}
    assert executions == {label(h): float(n) for h, n in rows.items()}
    assert checked >= 6 * len(rows) - 10  # every measure of every hour (a percentile may be missing)
    page.locator("#measure-p95_runtime").scroll_into_view_if_needed()
    shot(page, "output-workspace")
    page.goto(f"/output?grain=day&top=3&from={label(B.DAY.floor(site['start']))}&to={label(B.DAY.advance(B.DAY.floor(site['end'])))}")
    assert page.locator("#measure-executions svg.chart polyline, #measure-executions svg.chart circle").count() >= 3
    assert len({pt.get_attribute("data-series") for pt in page.locator("#measure-executions circle.point").all()}) == 3
    shot(page, "output-top")


def drawn_of(page, measure: str) -> dict:
    return {(pt.get_attribute("data-series"), pt.get_attribute("data-label")): float(pt.get_attribute("data-value"))
            for pt in page.locator(f"#measure-{measure} circle.point").all()}


def test_verify_runs_on_the_worker_and_the_page_shows_the_drift(page, site):
    dirty = label(site["dirty"])
    page.goto(f"/bucket/hourly/{dirty}")
    assert page.locator("#step-execution_metrics").get_attribute("data-state") == "dirty"
    assert page.locator("#marks").count() == 1
    page.locator("#verify").click()
    page.wait_for_url(re.compile(r"\?verify=[0-9a-f-]+$"))
    until(page, page.url, "#verify-summary", "the verify task's result")
    assert "drifted value" in page.locator("#verify-summary").inner_text()
    assert "total_executions" in page.locator("#verify-columns").inner_text()
    page.locator("#verify-result").scroll_into_view_if_needed()
    shot(page, "bucket-verify")


def test_backfill_from_the_grid_form_fixes_the_range_and_shows_its_progress(page, site):
    start, end = site["dirty"] - 2 * HOUR, site["dirty"] + 2 * HOUR
    page.goto(f"/grid?by=hour&from={label(start)}&to={label(end)}")
    form = page.locator("form.action")
    for rollup in ("daily", "weekly", "monthly"):
        form.locator(f'input[name=rollups][value="{rollup}"]').uncheck()
    form.locator("button[type=submit]").click()
    page.wait_for_url(re.compile(r"/grid\?by=hour&from=.*&since=\d+&sent=1$"))
    progress = page.url
    until(page, progress, "#progress.good", "the backfill to finish")
    assert "2" in page.locator("#progress").inner_text()  # the dirty hour's two steps ran
    assert page.locator(f'#grid a.cell[data-bucket="{label(site["dirty"])}"][data-state="ok"]').count() == 3
    shot(page, "grid-backfill")
    page.goto("/runs?status=failed")
    assert page.locator("#runs tbody tr[data-status=failed]").count() == 1
    page.goto("/runs")
    shot(page, "runs")
