"""Who may see the console and who may act through it.

* ``TALLY_WEB_AUTH=user:password`` set: every page, ``/api/`` and ``/metrics`` need HTTP basic
  auth with it (``/healthz`` excepted), as Flower does here; ``tally serve`` refuses a bind
  that is not loopback without it (tally/tasks.py, :func:`bind_auth`).
* Actions (POST) need that auth too, so without it they are disabled, with the reason.
* Every action form carries a token (an HMAC of the user under a secret of this process) and
  every POST must come from the console's own origin (``Origin``, else ``Referer``): a page on
  another site cannot make a browser that holds the credentials act. The JSON API takes
  actions only as ``application/json`` bodies, which no cross-site form can send.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import urllib.parse

from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

OPEN_PATHS = ("/healthz",)


class Guard:
    """The console's credentials and its form tokens."""

    def __init__(self, auth: str | None):
        self.auth = auth
        self.user, self.password = auth.split(":", 1) if auth else (None, None)
        self._secret = secrets.token_bytes(32)  # per process: a restart invalidates open forms

    @property
    def enabled(self) -> bool:
        return self.auth is not None

    def authorized(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header carries the configured credentials."""
        if not self.enabled or not header or not header.lower().startswith("basic "):
            return False
        try:
            given = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
        user, _, password = given.partition(":")
        # both compared, always, in constant time
        ok_user = hmac.compare_digest(user.encode(), (self.user or "").encode())
        ok_password = hmac.compare_digest(password.encode(), (self.password or "").encode())
        return ok_user and ok_password

    def token(self) -> str:
        """The form token of this process and user."""
        return hmac.new(self._secret, f"tally-console:{self.user}".encode(), hashlib.sha256).hexdigest()

    def token_ok(self, given: str | None) -> bool:
        return bool(given) and hmac.compare_digest(str(given), self.token())


def same_origin(request: Request) -> bool:
    """Whether a request comes from a page of this console: its ``Origin`` (else its ``Referer``)
    names the host it was sent to. Neither header: not from a browser page we can vouch for."""
    host = request.headers.get("host")
    source = request.headers.get("origin") or request.headers.get("referer")
    if not host or not source or source == "null":
        return False
    parts = urllib.parse.urlsplit(source)
    return parts.scheme in ("http", "https") and parts.netloc.lower() == host.lower()


class RequireAuth:
    """ASGI middleware: with credentials configured, every path but /healthz needs them."""

    def __init__(self, app: ASGIApp, guard: Guard):
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.guard.enabled and scope["path"] not in OPEN_PATHS:
            if not self.guard.authorized(Request(scope).headers.get("authorization")):
                response = PlainTextResponse("tally: authentication required (TALLY_WEB_AUTH)\n", status_code=401,
                                             headers={"WWW-Authenticate": 'Basic realm="tally", charset="UTF-8"'})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class SecurityHeaders:
    """ASGI middleware: no framing (the action buttons cannot be clickjacked), no sniffing, no
    scripts or styles from anywhere but the console itself, forms post only to it."""

    HEADERS = [
        (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                                     b"form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
        (b"x-frame-options", b"DENY"),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"same-origin"),
    ]

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + self.HEADERS
            await send(message)
        await self.app(scope, receive, with_headers)
