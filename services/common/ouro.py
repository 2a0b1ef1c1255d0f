"""The Ouro layer: the headers Ouro sends, an input file asset, an output file, the webhook body.

See shared/ouro-contract.md. Direct HTTP callers send none of the headers; every one is optional.
"""

from __future__ import annotations

import base64
import hmac
from typing import Any, Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field

from services.common.errors import ErrorDetail, Unauthorized


class OuroHeaders(BaseModel):
    """What Ouro tells a service about the run it is serving."""

    action_id: str | None = None
    route_id: str | None = None
    user_id: str | None = None
    webhook_url: str | None = None
    webhook_token: str | None = None

    @classmethod
    def from_request(cls, request: Request) -> OuroHeaders:
        h = request.headers
        return cls(
            action_id=h.get("ouro-action-id"),
            route_id=h.get("ouro-route-id"),
            user_id=h.get("ouro-user-id"),
            webhook_url=h.get("ouro-webhook-url"),
            webhook_token=h.get("ouro-webhook-token"),
        )


def check_service_secret(request: Request, secret: str | None) -> None:
    """With Ouro authentication on, the whole header must equal ``Basic <secret>``."""
    if not secret:
        return
    given = request.headers.get("authorization", "").encode()
    if not hmac.compare_digest(given, f"Basic {secret}".encode()):
        raise Unauthorized("Missing or wrong Authorization header for this service.")


class InputFileAsset(BaseModel):
    """A file asset as Ouro resolves it into the body: only ``url`` is certain."""

    model_config = ConfigDict(extra="ignore")

    url: str = Field(description="Signed, short-lived URL of the file; fetched at once.")
    filename: str | None = Field(default=None, description="Original file name, e.g. cat.png.")
    type: str | None = Field(default=None, description="MIME type Ouro recorded for the file.")
    id: str | None = None
    name: str | None = None
    description: str | None = None


class OutputFile(BaseModel):
    """A file returned to Ouro, which makes an asset of it in the run's org and team."""

    name: str = Field(description="Asset name shown on Ouro.")
    description: str | None = Field(default=None, description="Asset description.")
    filename: str = Field(description="File name kept by the asset.")
    type: str = Field(description="MIME type.")
    extension: str = Field(description="Lower-case extension without the dot.")
    base64: str = Field(description="The file's bytes, base64-encoded.")

    @classmethod
    def of(
        cls,
        data: bytes,
        *,
        name: str,
        filename: str,
        mime: str,
        extension: str,
        description: str | None = None,
    ) -> OutputFile:
        return cls(
            name=name,
            description=description,
            filename=filename,
            type=mime,
            extension=extension.lower(),
            base64=base64.b64encode(data).decode("ascii"),
        )


class WebhookError(BaseModel):
    error: ErrorDetail


class WebhookBody(BaseModel):
    """What an async route POSTs to ``ouro-webhook-url`` when its job ends."""

    status: str = Field(description="The success or error string (configurable).")
    ouro_action_id: str | None = None
    ouro_route_id: str | None = None
    response: dict[str, Any] = Field(
        description="On success the route's result; on failure {'error': {code, message}}."
    )


WebhookStatus = Literal["success", "error"]
