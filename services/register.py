"""``hermes-media register``: create or refresh both services on Ouro from their OpenAPI specs.

Ouro makes one route per operation of a service's spec. Registering is idempotent: a service
whose name is already in the account is updated (its spec is fetched again and its routes
synced), any other is created. With a secret, the service uses Ouro authentication and the
secret is stored on Ouro, which then sends ``Authorization: Basic <secret>`` on every call.

This module needs the official SDK, ``ouro-py`` (the ``ouro`` extra). It authenticates with
``OURO_API_KEY`` and talks to ``OURO_BACKEND_URL`` (Ouro's public API when unset).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import httpx
from ouro import OuroError
from ouro.client import PERSONAL_ORG_ID, Ouro
from ouro.models import Route, Service

CLIENT_NAME = "hermes-media"


@dataclass(frozen=True)
class Target:
    """One of our services as it should be on Ouro."""

    name: str
    description: str
    base_url: str

    @property
    def spec_url(self) -> str:
        return f"{self.base_url}/ouro/openapi.json"


@dataclass(frozen=True)
class Registered:
    target: Target
    service: Service
    created: bool
    routes: list[Route]


class RegisterError(Exception):
    """Registration cannot go on; the message says why in one line."""


def targets(clip_url: str, compress_url: str) -> list[Target]:
    """Both services, at their public URLs (without a trailing slash)."""
    return [
        Target(
            name="hermes-media clip",
            description="Download a specific time range from a YouTube video as an MP4 clip.",
            base_url=clip_url,
        ),
        Target(
            name="hermes-media compress",
            description="Compress an image while maintaining its current format.",
            base_url=compress_url,
        ),
    ]


def connect() -> Ouro:
    """A client authenticated with ``OURO_API_KEY``.

    ``OURO_BACKEND_URL`` is read here rather than left to the SDK, which reads it once, when
    it is first imported.
    """
    return Ouro(base_url=os.environ.get("OURO_BACKEND_URL") or None, client=CLIENT_NAME)


def register(ouro: Ouro, wanted: Sequence[Target], auth_secret: str | None) -> list[Registered]:
    """Create or update each service, set its secret when given, and read its routes back."""
    existing = ouro.services.list()
    done: list[Registered] = []
    for target in wanted:
        same_name = [s for s in existing if s.name == target.name]
        if len(same_name) > 1:
            ids = ", ".join(str(s.id) for s in same_name)
            raise RegisterError(f"{len(same_name)} services are named {target.name!r} ({ids}).")
        authentication = "Ouro" if auth_secret else None
        if same_name:
            service = ouro.services.update(
                str(same_name[0].id),
                name=target.name,
                description=target.description,
                base_url=target.base_url,
                spec_url=target.spec_url,
                authentication=authentication,
            )
        else:
            service = ouro.services.create(
                name=target.name,
                description=target.description,
                base_url=target.base_url,
                spec_url=target.spec_url,
                authentication=authentication or "None",
            )
        if auth_secret:
            ouro.services.set_authentication(str(service.id), auth_secret, method="Ouro")
        routes = ouro.services.read_routes(str(service.id))
        done.append(Registered(target, service, created=not same_name, routes=routes))
    return done


def route_ref(route: Route) -> str:
    """``owner/slug``, the name a route is called by on Ouro (its id when the owner is unknown).

    The slug is the route's name (its operation's summary) in kebab case; the owner is the
    organization the route is in, or its user in the personal context.
    """
    slug = re.sub(r"[^a-z0-9]+", "-", (route.name or "").lower()).strip("-")
    organization = route.organization
    if organization is not None and str(route.org_id) != PERSONAL_ORG_ID:
        owner: str | None = organization.name
    else:
        owner = route.user.username if route.user is not None else None
    return f"{owner}/{slug}" if owner and slug else str(route.id)


def describe(registered: Registered) -> list[str]:
    """What was done to one service, then one line per route."""
    service, target = registered.service, registered.target
    verb = "created" if registered.created else "refreshed"
    auth = service.metadata.authentication if service.metadata is not None else "unknown"
    lines = [
        f"{verb} service {target.name!r} (id {service.id}) from {target.spec_url}, "
        f"authentication {auth}"
    ]
    for route in registered.routes:
        where = f"{route.route.method.upper()} {route.route.path}" if route.route else ""
        lines.append(f"  {route_ref(route)}  id {route.id}  {where}".rstrip())
    return lines


def run(wanted: Sequence[Target], auth_secret: str | None) -> list[Registered]:
    """Connect and register, with every SDK or HTTP failure as one ``RegisterError`` line."""
    try:
        return register(connect(), wanted, auth_secret)
    except (OuroError, httpx.HTTPError) as exc:
        lines = str(exc).strip().splitlines()
        raise RegisterError(f"Ouro: {lines[0] if lines else type(exc).__name__}") from exc
