"""The committed specs are exactly what the apps generate (``hermes-media openapi``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.cli import SERVICES, write_openapi

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
