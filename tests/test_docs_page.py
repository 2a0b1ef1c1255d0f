"""The Swagger UI at /docs renders in a real browser with no internet, Ouro auth on or off.

Headless Chromium (Debian's ``chromium`` package) is driven over the Chrome DevTools Protocol
on a pipe: it loads each service's /docs, every request it makes is recorded, and any host but
127.0.0.1 is made unresolvable, so a page that still leans on a CDN fails here.

``UPDATE_DOCS_SCREENSHOT=1`` also writes the compress page's screenshot to docs/docs-page.png.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi import FastAPI
from PIL import Image

from services.clip.app import create_app as create_clip_app
from services.clip.settings import ClipSettings
from services.compress.app import create_app as create_compress_app
from services.compress.settings import CompressSettings
from tests.support.apps import serve
from tests.support.chromium import VIEWPORT, chromium, open_page

ROOT = Path(__file__).resolve().parent.parent
SECRET = "docs-page-secret"


@dataclass(frozen=True)
class Service:
    name: str
    make: Callable[[Path], FastAPI]
    operation: str  # the operationId that /docs opens by its deep link
    summary: str
    example: str  # a value from the request model's json_schema_extra example


SERVICES = {
    "compress": Service(
        "compress",
        lambda _: create_compress_app(
            CompressSettings(compress_workers=1, ouro_service_secret=SECRET)
        ),
        "compress_an_image_compress_an_image_post",
        "Compress an image",
        "https://example.com/cat.png",
    ),
    "clip": Service(
        "clip",
        lambda work: create_clip_app(ClipSettings(clip_work_dir=work, ouro_service_secret=SECRET)),
        "download_a_clip_download_a_clip_from_youtube_post",
        "Download a clip from YouTube",
        "https://www.youtube.com/watch?v=dQw4w9WgXcQ",
    ),
}


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_docs_page_renders_offline_with_examples(name: str, tmp_path: Path) -> None:
    service = SERVICES[name]
    with serve(service.make(tmp_path)) as base:
        html = httpx.get(f"{base}/docs").text
        assert "/docs/static/swagger-ui-bundle.js" in html
        assert "cdn." not in html
        assert "https://" not in html
        assert "http://" not in html

        log = tmp_path / "chromium.log"
        with chromium(tmp_path / "profile", log) as devtools:
            # The deep link opens the operation, which shows its request body's Example Value.
            page = open_page(devtools, f"{base}/docs#/default/{service.operation}")
            try:
                text = page.wait_for_text(
                    lambda text: service.summary in text and service.example in text
                )
            except AssertionError as exc:
                raise AssertionError(f"{exc}\nchromium log:\n{log.read_text()[-4000:]}") from None
            page.call("Runtime.evaluate", {"expression": "window.scrollTo(0, 0)"})
            screenshot = page.screenshot()
            page.call("Runtime.evaluate", {"expression": "1"})  # collect the last events

    assert "Example Value" in text
    assert "Liveness" in text  # the other operations are listed too
    (tmp_path / f"docs-{name}.png").write_bytes(screenshot)
    with Image.open(tmp_path / f"docs-{name}.png") as image:
        assert image.size == (VIEWPORT["width"], VIEWPORT["height"])
    if name == "compress" and os.environ.get("UPDATE_DOCS_SCREENSHOT") == "1":
        with Image.open(tmp_path / f"docs-{name}.png") as image:
            image.convert("RGB").quantize(colors=256).save(
                ROOT / "docs" / "docs-page.png", optimize=True
            )

    fetched = {urlsplit(url).path for url in page.requests}
    assert {"/docs", "/openapi.json", "/docs/static/swagger-ui-bundle.js"} <= fetched
    assert "/docs/static/swagger-ui.css" in fetched
    elsewhere = [
        url
        for url in page.requests
        if urlsplit(url).scheme not in {"data", "blob"} and urlsplit(url).hostname != "127.0.0.1"
    ]
    assert elsewhere == [], f"/docs reached beyond this machine: {elsewhere}"
    assert page.failures == [], f"requests failed: {page.failures}"


def test_docs_assets_are_open_and_nothing_else_is(tmp_path: Path) -> None:
    app = SERVICES["compress"].make(tmp_path)
    with serve(app) as base, httpx.Client(base_url=base) as http:
        for path in (
            "/docs",
            "/docs/oauth2-redirect",
            "/redoc",
            "/openapi.json",
            "/docs/static/swagger-ui-bundle.js",
            "/docs/static/swagger-ui.css",
            "/docs/static/favicon.png",
            "/docs/static/redoc.standalone.js",
        ):
            assert http.get(path).status_code == 200, path
        assert http.get("/docs/static/missing.js").status_code == 404
        # The static prefix only ever reaches the static files, never a route behind auth.
        assert http.get("/docs/static/%2e%2e/compress-an-image").status_code == 404
        assert http.post("/compress-an-image", json={}).status_code == 401
        redoc = http.get("/redoc").text
        assert "/docs/static/redoc.standalone.js" in redoc
        assert "https://" not in redoc
        assert "http://" not in redoc
        spec = http.get("/openapi.json").json()
    assert not [path for path in spec["paths"] if path.startswith(("/docs", "/redoc"))]
