"""The console's web application (Starlette): pages, ``/api/``, ``/metrics``, actions.

Pages are rendered on the server (Jinja2, templates/ and static/ ship in the package) and work
with JavaScript off. Each page and its ``/api/`` twin come from the same function of
:mod:`tally.web.views`. Database work runs in Starlette's thread pool on a few reused
connections (:class:`Connections`); the console reads only, and works as the read-only
dashboard role of ``tally db roles``.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import threading
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Iterator

import jinja2
import psycopg
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from .. import buckets as B
from ..config import settings
from ..db import connect, describe, redact, scrub
from ..errors import InvalidInput, Unreachable
from ..state import State
from ..steps import ROLLUP_STEPS, STEPS
from . import charts, metrics, views
from .actions import Actions, task_state
from .guard import Guard, RequireAuth, SecurityHeaders, same_origin

HERE = Path(__file__).parent
VERSION = "1"


# ---- connections -------------------------------------------------------------------------------

class Connections:
    """A few autocommit connections, reused across requests; a broken one is dropped."""

    def __init__(self, url: str, keep: int = 4):
        self.url = url
        self.keep = keep
        self._idle: list[psycopg.Connection] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def __call__(self) -> Iterator[psycopg.Connection]:
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None or conn.closed or conn.broken:
            conn = connect(self.url, autocommit=True, application_name="tally console")
            conn.execute("SET TIME ZONE 'UTC'")
        try:
            yield conn
        finally:
            with self._lock:
                if not conn.closed and not conn.broken and len(self._idle) < self.keep:
                    self._idle.append(conn)
                    conn = None
            if conn is not None:
                conn.close()

    def close(self) -> None:
        with self._lock:
            for conn in self._idle:
                conn.close()
            self._idle.clear()


# ---- JSON and formatting -----------------------------------------------------------------------

def _plain(value):
    if isinstance(value, dt.datetime):
        return value.astimezone(B.UTC).isoformat() if value.tzinfo else value.isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, (uuid.UUID, B.Bucket)):
        return str(value)
    if isinstance(value, State):
        return value.value
    raise TypeError(f"not JSON: {type(value).__name__}")


class JSON(JSONResponse):
    """JSON with times in ISO 8601 (with a "T", UTC), numerics as numbers, ids as strings."""

    def render(self, content) -> bytes:
        return json.dumps(content, default=_plain, ensure_ascii=False, indent=1).encode("utf-8")


def when(value: dt.datetime | None) -> str:
    """A time as pages show it: 2026-11-25 14:03:21Z."""
    if value is None:
        return "–"
    return value.astimezone(B.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def minute(value: dt.datetime | None) -> str:
    """A bucket boundary as pages show it: 2026-11-25 14:00Z."""
    return "–" if value is None else value.astimezone(B.UTC).strftime("%Y-%m-%d %H:%MZ")


def age(seconds: float | None) -> str:
    """A duration for people: 42 s, 7 min, 3 h 05 min, 2 d 4 h."""
    if seconds is None:
        return "never"
    s = int(max(0.0, seconds))
    if s < 120:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400 * 2:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 10:
        return f"{seconds:.2f} s"
    return age(seconds) if seconds >= 120 else f"{seconds:.1f} s"


def count(n) -> str:
    return "–" if n is None else f"{n:,}"


def first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0] if (text or "").strip() else ""


def _templates() -> Jinja2Templates:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(HERE / "templates")), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(nth=lambda seq, i: seq[i], when=when, minute=minute, age=age, duration=duration, count=count, first_line=first_line,
                       fmt=charts.fmt, short=charts.short)
    env.globals.update(chart=charts.line_chart, color=charts.color, STATES=views.STATES,
                       ROLLUP_STEPS=ROLLUP_STEPS, ROLLUPS=B.ROLLUPS, KIND=B.KIND, STEPS=list(STEPS),
                       version=VERSION)
    return Jinja2Templates(env=env)


# ---- request parameters ------------------------------------------------------------------------

def _param(request: Request, name: str) -> str | None:
    value = request.query_params.get(name)
    return value.strip() if value is not None and value.strip() else None


def _time(request: Request, name: str) -> dt.datetime | None:
    value = _param(request, name)
    return None if value is None else B.parse_time(value, name)


def _number(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    value = _param(request, name)
    if value is None:
        return default
    try:
        n = int(value)
    except ValueError:
        raise InvalidInput(f"invalid {name} {value!r}: expected a whole number") from None
    if not lo <= n <= hi:
        raise InvalidInput(f"invalid {name} {value!r}: expected {lo} to {hi}")
    return n


def _choice(request: Request, name: str, choices, default=None):
    value = _param(request, name)
    if value is None:
        return default
    if value not in choices:
        raise InvalidInput(f"invalid {name} {value!r}: expected one of {', '.join(choices)}")
    return value


def _range(request: Request, default: tuple[dt.datetime, dt.datetime]) -> tuple[dt.datetime, dt.datetime]:
    start, end = _time(request, "from"), _time(request, "to")
    if start is None and end is None:
        return default
    if start is None or end is None:
        span = default[1] - default[0]
        start, end = (end - span, end) if start is None else (start, start + span)
    if start >= end:
        raise InvalidInput(f"invalid range: from {start.isoformat()} is not before to {end.isoformat()}")
    if end - start > dt.timedelta(days=settings().max_range_days):
        raise InvalidInput(f"invalid range: longer than {settings().max_range_days} days (TALLY_MAX_RANGE_DAYS)")
    return start, end


def _hour_text(t: dt.datetime) -> str:
    return B.HOUR.label(t)


# ---- the console -------------------------------------------------------------------------------

class Console:
    """The pages, the API, the metrics and the actions over one database."""

    def __init__(self, url: str, auth: str | None):
        self.url = url
        self.guard = Guard(auth)
        self.actions = Actions(auth is not None)
        self.connections = Connections(url)
        self.templates = _templates()
        self.database = describe() if settings().database_url in (None, url) else f"database: {redact(url)}"

    # -- rendering ---------------------------------------------------------------------------
    def page(self, request: Request, name: str, status_code: int = 200, **context) -> Response:
        context.setdefault("refresh", None)
        context.update(path=request.url.path, database=self.database, auth=self.guard.enabled,
                       csrf=self.guard.token() if self.guard.enabled else "", now=views.now_utc(),
                       query=dict(request.query_params))
        return self.templates.TemplateResponse(request, name, context, status_code=status_code)

    def _with_actions(self) -> dict:
        return {"disabled": self.actions.disabled()}

    # -- overview ----------------------------------------------------------------------------
    def _overview(self) -> views.Health:
        with self.connections() as conn:
            return views.health(conn, strips=True)

    def overview(self, request: Request) -> Response:
        refresh = _number(request, "refresh", 0, 0, 3600)
        health = self._overview()
        return self.page(request, "overview.html", health=health, refresh=refresh or None,
                         catchup_days=settings().catchup_days)

    def api_overview(self, request: Request) -> Response:
        return JSON(self._overview().as_dict())

    # -- grid --------------------------------------------------------------------------------
    def _grid(self, request: Request) -> dict:
        by = _choice(request, "by", views.ZOOMS, "hour")
        now = views.now_utc()
        start, end = _range(request, views.default_range(by, now))
        since = _number(request, "since", -1, 0, 2**62)
        with self.connections() as conn:
            data = views.grid(conn, start, end, by, now)
        if since >= 0:
            data["progress"] = self._grid_progress(data, since)
            data["progress"]["tasks"] = _number(request, "sent", 0, 0, 10**6)
        return data

    @staticmethod
    def _grid_progress(data: dict, since: int) -> dict:
        cells = [c for row in data["rows"] for c in [*row["cells"].values(), *(x for s in row["strips"].values()
                                                                              for x in s)]]
        cells += [c for p in data["periods"] for c in p["cells"].values()]
        attempted = {}
        for c in cells:
            if c.get("attempt_id") is not None and c["attempt_id"] > since:
                attempted[(c["rollup"], c["step"], c["bucket"])] = c["state"]
        states: dict[str, int] = {}
        for st in attempted.values():
            states[st] = states.get(st, 0) + 1
        return {"since": since, "attempted": len(attempted), "states": states,
                "busy": states.get("running", 0) > 0}

    def grid(self, request: Request) -> Response:
        data = self._grid(request)
        by, start, end = data["by"], data["from"], data["to"]
        nav = {}
        for name, direction in (("earlier", -1), ("later", 1)):
            s, e = views.shift(by, start, end, direction)
            nav[name] = f"/grid?by={by}&from={_hour_text(s)}&to={_hour_text(e)}"
        anchor = end - dt.timedelta(microseconds=1)
        for zoom in views.ZOOMS:
            s, e = views.default_range(zoom, anchor)
            nav[zoom] = f"/grid?by={zoom}&from={_hour_text(s)}&to={_hour_text(e)}"
        progress = data.get("progress")
        refresh = 3 if progress and (progress["busy"] or progress["attempted"] == 0) else None
        return self.page(request, "grid.html", grid=data, nav=nav, refresh=refresh, actions=self._with_actions(),
                         range_text=(_hour_text(start), _hour_text(end)))

    def api_grid(self, request: Request) -> Response:
        return JSON(self._grid(request))

    # -- one bucket --------------------------------------------------------------------------
    def _bucket(self, request: Request) -> dict:
        b = views.parse_bucket(request.path_params["rollup"], request.path_params["label"])
        with self.connections() as conn:
            data = views.bucket(conn, b)
        since = _number(request, "since", -1, 0, 2**62)
        if since >= 0:
            data["progress"] = {
                "since": since, "action": _choice(request, "action", ("retry", "rerun"), "retry"),
                "task": task_state(_param(request, "task")),
                "steps": [{"step": s["step"], "state": s["state"]} for s in data["steps"]
                          if s["attempt_id"] is not None and s["attempt_id"] > since]}
            p, t = data["progress"], data["progress"]["task"]
            running = any(s["state"] == "running" for s in p["steps"])
            if t is not None and t["state"] != "UNKNOWN":
                p["done"] = t["ready"] and not running
            else:  # no result backend to ask: done once its attempts are concluded
                p["done"] = bool(p["steps"]) and not running
        verify = _param(request, "verify")
        if verify is not None:
            data["verify"] = task_state(verify)
        return data

    def bucket(self, request: Request) -> Response:
        data = self._bucket(request)
        busy = (data.get("progress") and not data["progress"]["done"]) or (
            data.get("verify") and not data["verify"]["ready"])
        return self.page(request, "bucket.html", b=data, actions=self._with_actions(), refresh=2 if busy else None)

    def api_bucket(self, request: Request) -> Response:
        return JSON(self._bucket(request))

    # -- runs --------------------------------------------------------------------------------
    def _runs(self, request: Request) -> dict:
        filters = dict(rollup=_choice(request, "rollup", B.ROLLUPS), step=_choice(request, "step", list(STEPS)),
                       status=_param(request, "status"), trigger=_param(request, "trigger"),
                       start=_time(request, "from"), end=_time(request, "to"), since=_time(request, "since"))
        page = _number(request, "page", 1, 1, 10**6)
        with self.connections() as conn:
            return views.runs(conn, page=page, **filters)

    def runs(self, request: Request) -> Response:
        data = self._runs(request)
        base = {k: v for k, v in request.query_params.items() if k != "page" and v}
        pages = {}
        for name, n in (("newer", data["page"] - 1), ("older", data["page"] + 1)):
            if (name == "newer" and n >= 1) or (name == "older" and data["has_next"]):
                pages[name] = "/runs?" + "&".join(f"{k}={_quote(v)}" for k, v in {**base, "page": str(n)}.items())
        return self.page(request, "runs.html", data=data, pages=pages)

    def api_runs(self, request: Request) -> Response:
        return JSON(self._runs(request))

    # -- the output ------------------------------------------------------------------------------
    def _output(self, request: Request) -> dict:
        grain = _choice(request, "grain", list(views.OUTPUT), "hour")
        now = views.now_utc()
        end_default = B.DAY.advance(B.DAY.floor(now))
        span = dt.timedelta(days=1 if grain == "hour" else 30 if grain == "day" else 180 if grain == "week" else 365)
        start, end = _range(request, (end_default - span, end_default))
        workspace = _param(request, "workspace")
        top = _number(request, "top", 5, 1, 20)
        with self.connections() as conn:
            return views.output(conn, grain, start, end, workspace=workspace, top=top)

    def output(self, request: Request) -> Response:
        data = self._output(request)
        return self.page(request, "output.html", data=data, range_text=(_hour_text(data["from"]),
                                                                          _hour_text(data["to"])))

    def api_output(self, request: Request) -> Response:
        return JSON(self._output(request))

    # -- Prometheus ------------------------------------------------------------------------------
    def metrics(self, request: Request) -> Response:
        return Response(metrics.render(self.connections), media_type="text/plain; version=0.0.4; charset=utf-8")

    def healthz(self, request: Request) -> Response:
        return PlainTextResponse("ok\n")

    # -- actions ---------------------------------------------------------------------------------
    def api_actions(self, request: Request) -> Response:
        reason = self.actions.disabled()
        return JSON({"enabled": reason is None, "reason": reason,
                     "actions": ["retry", "rerun", "backfill", "verify"]})

    def api_task(self, request: Request) -> Response:
        return JSON(task_state(request.path_params["task_id"]))

    async def _form(self, request: Request) -> dict:
        """An action's fields, once the request passed every check (else an HTTP error)."""
        api = request.url.path.startswith("/api/")
        if not self.guard.enabled:  # without credentials, no action at all
            raise HTTPException(403, "actions are disabled: set TALLY_WEB_AUTH=user:password")
        if api:
            kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                raise HTTPException(415, "the API takes actions as application/json")
            if request.headers.get("origin") and not same_origin(request):
                raise HTTPException(403, "refused: a request from another origin")
            try:
                fields = await request.json()
            except ValueError:
                raise HTTPException(400, "invalid JSON body") from None
            if not isinstance(fields, dict):
                raise HTTPException(400, "the body must be a JSON object")
            return {k: v for k, v in fields.items() if isinstance(v, (str, bool, int, list))}
        if not same_origin(request):
            raise HTTPException(403, "refused: the request does not come from this console's own pages "
                                     "(Origin/Referer)")
        form = await request.form()
        if not self.guard.token_ok(form.get("csrf")):
            raise HTTPException(403, "refused: missing or stale form token; reload the page and try again")
        return {k: form.getlist(k) if k == "rollups" else form.get(k) for k in form.keys()}

    def _send(self, action: str, fields: dict) -> tuple[str, dict]:
        """Send an action's task(s); returns where to see its progress, and what was sent."""
        reason = self.actions.disabled()
        if reason is not None:
            raise HTTPException(503, f"actions are disabled: {reason}")
        if action == "backfill":
            start = B.parse_time(str(fields.get("from") or ""), "from")
            end = B.parse_time(str(fields.get("to") or ""), "to")
            start, end = B.parse_range(_hour_text(start), _hour_text(end), settings().max_range_days)
            names = fields.get("rollups") or list(B.ROLLUPS)
            names = B.parse_rollups(",".join(names) if isinstance(names, list) else str(names))
            force = str(fields.get("force", "")).lower() in ("1", "true", "on", "yes")
            with self.connections() as conn:
                sent = self.actions.backfill(conn, start, end, names, force)
            by = "hour" if end - start <= dt.timedelta(hours=48) else "day"
            return (f"/grid?by={by}&from={_hour_text(start)}&to={_hour_text(end)}&since={sent['since']}"
                    f"&sent={sent['tasks']}"), sent
        b = views.parse_bucket(str(fields.get("rollup") or ""), str(fields.get("bucket") or ""))
        where = views.link(b)
        if action == "verify":
            sent = self.actions.verify(b)
            return f"{where}?verify={sent['task']}", sent
        with self.connections() as conn:
            sent = self.actions.retry(conn, b) if action == "retry" else self.actions.rerun(conn, b)
        return f"{where}?action={action}&task={sent['task']}&since={sent['since']}", sent

    async def act(self, request: Request) -> Response:
        action = request.path_params["action"]
        if action not in ("retry", "rerun", "backfill", "verify"):
            raise HTTPException(404, f"no action {action!r}")
        fields = await self._form(request)
        where, sent = await run_in_threadpool(self._send, action, fields)
        if request.url.path.startswith("/api/"):
            return JSON({"action": action, "progress": where, **sent}, status_code=202)
        return RedirectResponse(where, status_code=303)

    # -- errors ----------------------------------------------------------------------------------
    def error(self, request: Request, status: int, message: str) -> Response:
        message = scrub(message, self.url)
        if request.url.path.startswith("/api/") or request.url.path == "/metrics":
            return JSON({"error": message}, status_code=status) if request.url.path != "/metrics" else \
                PlainTextResponse(f"tally: {message}\n", status_code=status)
        return self.page(request, "error.html", status_code=status, status=status, message=message)

    async def on_invalid(self, request: Request, exc: Exception) -> Response:
        return self.error(request, 400, str(exc))

    async def on_unreachable(self, request: Request, exc: Exception) -> Response:
        return self.error(request, 503, str(exc))

    async def on_database(self, request: Request, exc: Exception) -> Response:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        status = 503 if isinstance(exc, psycopg.OperationalError) else 500
        return self.error(request, status, f"database error: {type(exc).__name__}: {first}")

    async def on_http(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return self.error(request, exc.status_code, exc.detail)


def _quote(value: str) -> str:
    import urllib.parse

    return urllib.parse.quote(value, safe=":-")


def create_app(url: str, auth: str | None = None) -> Starlette:
    """The console over database ``url``; ``auth`` (``user:password``) protects it and enables actions."""
    console = Console(url, auth)
    routes = [
        Route("/", console.overview),
        Route("/grid", console.grid),
        Route("/bucket/{rollup}/{label}", console.bucket),
        Route("/runs", console.runs),
        Route("/output", console.output),
        Route("/metrics", console.metrics),
        Route("/healthz", console.healthz),
        Route("/actions/{action}", console.act, methods=["POST"]),
        Route("/api/overview", console.api_overview),
        Route("/api/grid", console.api_grid),
        Route("/api/bucket/{rollup}/{label}", console.api_bucket),
        Route("/api/runs", console.api_runs),
        Route("/api/output", console.api_output),
        Route("/api/actions", console.api_actions),
        Route("/api/actions/{action}", console.act, methods=["POST"]),
        Route("/api/tasks/{task_id}", console.api_task),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(SecurityHeaders), Middleware(RequireAuth, guard=console.guard)],
        exception_handlers={InvalidInput: console.on_invalid, Unreachable: console.on_unreachable,
                            psycopg.Error: console.on_database, HTTPException: console.on_http},
    )
    app.state.console = console
    return app
