"""The settings every service shares; each service subclasses it once with its own fields."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class CommonSettings(BaseSettings):
    """Read from ``HERMES_*`` environment variables; tests build instances directly."""

    model_config = SettingsConfigDict(env_prefix="HERMES_", extra="ignore")

    allow_private_networks: bool = Field(
        default=False,
        description=(
            "Let the services fetch from loopback, private and other non-global addresses. "
            "Off in production; local development and tests turn it on."
        ),
    )
    fetch_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        description="Whole-request time limit when fetching a user-given URL.",
    )
    max_request_bytes: int = Field(
        default=64 * 1024 * 1024,
        gt=0,
        description="Largest request body accepted (413 past it).",
    )
    max_redirects: int = Field(
        default=5,
        ge=0,
        description="Redirects followed when fetching a user-given URL (each hop re-checked).",
    )
    ouro_service_secret: str | None = Field(
        default=None,
        description=(
            "With Ouro authentication on, the secret set on Ouro: routes then require "
            "'Authorization: Basic <secret>' (401 otherwise)."
        ),
    )
