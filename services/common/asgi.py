"""What every service app has in common: error handlers, the body limit, health, Ouro auth."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.docs import STATIC_PREFIX, install_docs
from services.common.errors import (
    ErrorBody,
    ErrorDetail,
    HermesError,
    error_response,
    install_error_handlers,
)
from services.common.observability import Metrics, ObservabilityMiddleware
from services.common.ouro import check_service_secret
from services.common.settings import CommonSettings


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes``, declared or streamed, before a route reads them."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _message(self) -> str:
        return f"The request body is larger than the limit of {self.max_bytes} bytes."

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", ()))
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise StarletteHTTPException(413, detail=self._message())
            return message

        await self.app(scope, limited_receive, send)

    async def _refuse(self, send: Send) -> None:
        message = self._message()
        body = ErrorBody(
            detail=message, error=ErrorDetail(code="payload_too_large", message=message)
        ).model_dump_json()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
            }
        )
        await send({"type": "http.response.body", "body": body.encode()})


OPEN_PATHS = frozenset(
    {
        "/openapi.json",
        "/ouro/openapi.json",
        "/docs",
        "/docs/oauth2-redirect",
        "/redoc",
        "/healthz",
        "/readyz",
        "/metrics",
    }
)
OURO_MODE = "x-ouro-execution-mode"


def ouro_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec Ouro registers from: only the operations that are Ouro routes.

    Ouro makes one route per operation, so the job, health and upload endpoints, which serve
    direct callers and operators, stay out of it.
    """
    paths = {}
    for path, operations in spec["paths"].items():
        kept = {verb: op for verb, op in operations.items() if OURO_MODE in op}
        if kept:
            paths[path] = kept
    return {**spec, "paths": paths}


Readiness = Callable[[FastAPI], Awaitable[dict[str, bool]]]


class ReadyBody(BaseModel):
    status: str = Field(description="`ready` or `not_ready`.")
    checks: dict[str, bool] = Field(description="Each dependency and whether it answers.")
    warnings: list[str] = Field(
        default_factory=list, description="Ready, but not configured as meant for production."
    )


def create_base_app(
    settings: CommonSettings,
    *,
    title: str,
    description: str,
    lifespan: Callable[[FastAPI], Any] | None = None,
    readiness: Readiness,
    warnings: Callable[[FastAPI], list[str]] | None = None,
    refresh_metrics: Callable[[FastAPI], Awaitable[None]] | None = None,
) -> FastAPI:

    app = FastAPI(
        title=title,
        description=description,
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    install_docs(app)
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    metrics = Metrics()
    app.state.metrics = metrics

    @app.middleware("http")
    async def ouro_auth(request: Request, call_next: Callable[[Request], Awaitable[Any]]) -> Any:
        path = request.url.path
        if path not in OPEN_PATHS and not path.startswith(STATIC_PREFIX):
            try:
                check_service_secret(request, settings.ouro_service_secret)
            except HermesError as exc:
                return error_response(exc)
        return await call_next(request)

    app.add_middleware(ObservabilityMiddleware, metrics=metrics)

    @app.get("/ouro/openapi.json", include_in_schema=False)
    async def ouro_openapi() -> JSONResponse:
        return JSONResponse(ouro_spec(app.openapi()))

    @app.get("/healthz", tags=["health"], summary="Liveness")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["health"],
        summary="Readiness",
        response_model=ReadyBody,
        responses={503: {"model": ReadyBody, "description": "A dependency is missing."}},
    )
    async def readyz(request: Request) -> JSONResponse:
        checks = await readiness(request.app)
        ready = all(checks.values())
        body = ReadyBody(
            status="ready" if ready else "not_ready",
            checks=checks,
            warnings=warnings(request.app) if warnings is not None else [],
        )
        # Warnings appear only when there are some, so a plain deployment's answer stays short.
        return JSONResponse(
            body.model_dump(exclude_defaults=True), status_code=200 if ready else 503
        )

    @app.get(
        "/metrics",
        tags=["health"],
        summary="Metrics in Prometheus text format",
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}},
    )
    async def metrics_text(request: Request) -> Response:
        if refresh_metrics is not None:
            await refresh_metrics(request.app)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
