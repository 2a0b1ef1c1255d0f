"""Metrics in Prometheus format and logs as one JSON line per event, with the run's ids.

Every app has its own registry (so several apps can live in one process, as in tests). The
``ouro-action-id`` of a request and the job id of a clip job travel in context variables, so
every log line written while serving them carries both.
"""

from __future__ import annotations

import contextvars
import json
import logging
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

action_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("action_id", default=None)
job_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("job_id", default=None)


_plain_record = logging.getLogRecordFactory()


def _record_with_ids(*args: Any, **kwargs: Any) -> logging.LogRecord:
    """Records take the run's ids when they are made, whichever handler formats them later."""
    record = _plain_record(*args, **kwargs)
    record.ouro_action_id = action_id.get()
    record.job_id = job_id.get()
    return record


logging.setLogRecordFactory(_record_with_ids)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the run's ids when known."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if (action := getattr(record, "ouro_action_id", None)) is not None:
            line["ouro_action_id"] = action
        if (job := getattr(record, "job_id", None)) is not None:
            line["job_id"] = job
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "arq"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


class Metrics:
    """The metrics every service exports; services add their own to ``registry``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "hermes_http_requests",
            "HTTP requests by route and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "hermes_http_request_duration_seconds",
            "Time to answer an HTTP request, by route.",
            ["route"],
            registry=self.registry,
        )
        self.bytes_in = Counter(
            "hermes_http_request_bytes", "Request body bytes, by route.", ["route"],
            registry=self.registry,
        )  # fmt: skip
        self.bytes_out = Counter(
            "hermes_http_response_bytes", "Response body bytes, by route.", ["route"],
            registry=self.registry,
        )  # fmt: skip


class ObservabilityMiddleware:
    """Counts every request, and puts its ``ouro-action-id`` in the logging context."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", ()))
        token = action_id.set(headers.get(b"ouro-action-id", b"").decode() or None)
        started = time.perf_counter()
        status = 500
        received = sent = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            return message

        recorded = False

        def record() -> None:
            nonlocal recorded
            if recorded:
                return
            recorded = True
            route = getattr(scope.get("route"), "path", "unmatched")
            m = self.metrics
            m.requests.labels(route, scope["method"], str(status)).inc()
            m.duration.labels(route).observe(time.perf_counter() - started)
            m.bytes_in.labels(route).inc(received)
            m.bytes_out.labels(route).inc(sent)

        async def counting_send(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
                # Counted before the last chunk leaves, so a client never sees its answer
                # before the metrics do.
                if not message.get("more_body", False):
                    record()
            await send(message)

        try:
            await self.app(scope, counting_receive, counting_send)
        finally:
            record()
            action_id.reset(token)
