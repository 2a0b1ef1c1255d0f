"""What is generated stays true: the committed specs and the README's settings table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.cli import SERVICES, settings_table, write_openapi
from services.common.asgi import ouro_spec

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_committed_spec_is_current(name: str, tmp_path: Path) -> None:
    write_openapi(tmp_path)
    committed = ROOT / "openapi" / f"{name}.json"
    assert committed.exists(), "run `make openapi` and commit openapi/"
    assert json.loads(committed.read_text()) == json.loads(
        (tmp_path / f"{name}.json").read_text()
    ), "openapi/ is stale: run `make openapi` and commit it"


def test_compress_route_carries_the_ouro_annotations() -> None:
    spec = json.loads((ROOT / "openapi" / "compress.json").read_text())
    operation = spec["paths"]["/compress-an-image"]["post"]
    assert operation["summary"] == "Compress an image"
    assert operation["x-ouro-execution-mode"] == "sync"
    inputs = operation["x-ouro-input-assets"]["file"]
    assert inputs["asset_type"] == "file"
    assert inputs["input_filter"] == "image"
    assert {"jpg", "png", "webp", "gif", "avif", "tif", "bmp", "ico", "heic"} <= set(
        inputs["file_extensions"]
    )
    assert operation["x-ouro-output-assets"]["file"]["primary"] is True
    assert operation["responses"]["422"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorBody"
    }


def test_readme_configuration_table_is_current() -> None:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("<!-- settings:start -->\n") + len("<!-- settings:start -->\n")
    end = readme.index("<!-- settings:end -->")
    assert readme[start:end] == settings_table(), "run `hermes-media settings` into the README"


def test_readme_opens_with_the_two_commands() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines[2:6] == [
        "```sh",
        "make run    # start both services: clip on 127.0.0.1:8001, compress on 127.0.0.1:8002",
        "make test   # ruff, mypy and the whole test suite",
        "```",
    ]


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_ouro_spec_holds_only_the_ouro_route(name: str) -> None:
    spec = ouro_spec(SERVICES[name].create_app().openapi())
    operations = [op for item in spec["paths"].values() for op in item.values()]
    assert len(operations) == 1
    assert operations[0]["summary"] in ("Compress an image", "Download a clip from YouTube")
    assert "x-ouro-execution-mode" in operations[0]
