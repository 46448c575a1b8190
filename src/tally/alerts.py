"""Final-failure alerts: an ERROR log line per failed step, and a JSON POST to ``TALLY_ALERT_WEBHOOK``.

The webhook is best effort: a receiver that is down, slow or answering an error
costs a WARNING line, never the worker.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import urllib.error
import urllib.parse
import urllib.request

from .config import settings

log = logging.getLogger("tally")

TIMEOUT = 5.0  # seconds: a slow receiver must not hold a worker process


def where(url: str) -> str:
    """Scheme and host of a webhook URL: its path often carries a secret token."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or '?'}{f':{parts.port}' if parts.port else ''}/…"


def post(url: str, payload: dict, *, timeout: float = TIMEOUT) -> bool:
    """POST ``payload`` as JSON to ``url``; False (and a warning) if it did not arrive."""
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        log.warning("alert webhook %r ignored: not an http(s) URL", where(url))
        return False
    request = urllib.request.Request(
        url, data=json.dumps(payload, default=str).encode(), method="POST",
        headers={"Content-Type": "application/json", "User-Agent": "tally"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read(65536)
        return True
    except (OSError, ValueError) as exc:  # URLError, HTTPError, timeouts and resets are all OSError
        log.warning("alert webhook %s failed: %s", where(url), exc)
        return False


def task_failed(task: str, task_id: str | None, attempts: int, failures: list[dict]) -> dict:
    """Report a task that failed for good: one ERROR line per failure, then the webhook.

    Each failure names ``rollup``, ``bucket``, ``step`` (None when the task failed
    outside a step) and ``error``. Returns the payload that was (or would be) posted.
    """
    for f in failures:
        log.error("task %s failed for good after %d attempt(s): rollup=%s step=%s bucket=%s cause=%s",
                  task, attempts, f.get("rollup") or "-", f.get("step") or "-", f.get("bucket") or "-",
                  (f.get("error") or "").splitlines()[0] if f.get("error") else "-")
    first = failures[0] if failures else {}
    payload = {
        "event": "tally.task_failed",
        "text": (f"tally: {task} failed after {attempts} attempt(s): "
                 + "; ".join(f"{f.get('rollup') or '-'} {f.get('bucket') or '-'} step {f.get('step') or '-'}: "
                             f"{(f.get('error') or '').splitlines()[0] if f.get('error') else '-'}" for f in failures)),
        "task": task,
        "task_id": task_id,
        "attempts": attempts,
        "rollup": first.get("rollup"),
        "bucket": first.get("bucket"),
        "step": first.get("step"),
        "failures": failures,
        "worker": f"{socket.gethostname()}:{os.getpid()}",
        "time": dt.datetime.now(dt.timezone.utc).isoformat(),
    }
    url = settings().alert_webhook
    if url:
        post(url, payload)
    return payload
