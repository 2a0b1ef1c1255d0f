"""The one error base, its JSON shape, and the handlers that turn every failure into that shape.

Every error a client can see has a stable ``code`` and a one-line ``message``; Ouro's SDK reads
``error.message`` first and ``detail`` second, so both carry the same line.
"""

from __future__ import annotations

import logging
import math
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


class ErrorDetail(BaseModel):
    """The machine-readable half of an error."""

    code: str = Field(description="Stable identifier of the failure, safe to branch on.")
    message: str = Field(description="One line a person can act on.")


class ErrorBody(BaseModel):
    """Every 4xx and 5xx body."""

    detail: str = Field(description="The same line as error.message.")
    error: ErrorDetail


class HermesError(Exception):
    """A failure a caller can understand. Subclasses set ``status_code`` and ``code``.

    The constructor takes only the message so errors pickle across process pools.
    """

    status_code: ClassVar[int] = 400
    code: ClassVar[str] = "bad_request"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def body(self) -> ErrorBody:
        return ErrorBody(
            detail=self.message, error=ErrorDetail(code=self.code, message=self.message)
        )

    def headers(self) -> dict[str, str]:
        """Response headers the error carries besides its body."""
        return {}


class InvalidInput(HermesError):
    status_code = 422
    code = "invalid_input"


class PayloadTooLarge(HermesError):
    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaType(HermesError):
    status_code = 415
    code = "unsupported_media_type"


class Unauthorized(HermesError):
    status_code = 401
    code = "unauthorized"


class NotFound(HermesError):
    status_code = 404
    code = "not_found"


class FetchFailed(HermesError):
    """The input URL could not be fetched (refused address, timeout, HTTP error)."""

    status_code = 422
    code = "fetch_failed"


class AddressRefused(FetchFailed):
    code = "address_refused"


class Unavailable(HermesError):
    status_code = 503
    code = "unavailable"


class TooManyRequests(HermesError):
    """Refused for now; ``retry_after`` seconds is when asking again may succeed."""

    status_code = 429
    code = "too_many_requests"

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = max(1, math.ceil(retry_after))

    def headers(self) -> dict[str, str]:
        return {"retry-after": str(self.retry_after)}


def _response(
    status_code: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = ErrorBody(detail=message, error=ErrorDetail(code=code, message=message))
    return JSONResponse(body.model_dump(), status_code=status_code, headers=headers)


def _one_line(exc: RequestValidationError) -> str:
    """FastAPI's list of validation errors, as the single line Ouro shows to the caller."""
    parts: list[str] = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query", "header"))
        msg = str(err.get("msg", "invalid value"))
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts) or "The request is not valid."


def error_response(exc: HermesError) -> JSONResponse:
    return _response(exc.status_code, exc.code, exc.message, exc.headers())


async def _hermes_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HermesError)
    return error_response(exc)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return _response(422, "invalid_input", _one_line(exc))


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    codes = {
        400: "invalid_body",
        404: "not_found",
        405: "method_not_allowed",
        413: "payload_too_large",
    }
    code = codes.get(exc.status_code, "http_error")
    return _response(exc.status_code, code, str(exc.detail))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s", request.url.path, exc_info=exc)
    return _response(500, "internal_error", "An internal error occurred; it has been logged.")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(HermesError, _hermes_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` entry that declares the error model for the given statuses."""
    return {status: {"model": ErrorBody, "description": "Error"} for status in statuses}
