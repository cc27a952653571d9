"""The committed OpenAPI contract (openapi/openapi.json) is what the app generates, with stable ids."""

from __future__ import annotations

import json

import pytest

from service.openapi import OPENAPI_PATH, build_openapi, main, render_openapi

OPERATIONS = {
    ("post", "/segment"): "segment",
    ("get", "/v1/model"): "get_model",
    ("get", "/health/live"): "health_live",
    ("get", "/health/ready"): "health_ready",
    ("get", "/metrics"): "metrics",
}


def test_committed_openapi_is_up_to_date() -> None:
    assert OPENAPI_PATH.is_file(), "openapi/openapi.json is missing: run `python -m service.openapi`"
    assert OPENAPI_PATH.read_text() == render_openapi(), (
        "openapi/openapi.json is out of date: run `python -m service.openapi` and commit it"
    )


def test_check_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--check"]) == 0
    stale = OPENAPI_PATH.parent / "does-not-exist.json"
    assert main(["--check", "--out", str(stale)]) == 1
    assert "out of date" in capsys.readouterr().err


def test_operation_ids_are_stable() -> None:
    spec = build_openapi()
    found = {
        (method, path): operation["operationId"]
        for path, operations in spec["paths"].items()
        for method, operation in operations.items()
    }
    assert found == OPERATIONS


def test_errors_are_declared_with_the_common_shape() -> None:
    spec = build_openapi()
    segment = spec["paths"]["/segment"]["post"]
    assert set(segment["responses"]) == {"200", "400", "401", "408", "413", "415", "422", "500", "503"}
    for status, response in segment["responses"].items():
        if status != "200":
            schema = response["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, status
    assert set(segment["responses"]["200"]["content"]) == {"application/json", "image/png"}
    body = segment["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["required"] == ["file"]
    parameters = {parameter["name"] for parameter in segment["parameters"]}
    assert parameters == {
        "threshold", "outputs", "pixel_spacing_mm", "flip_tta", "largest_component", "fill_holes", "format"
    }  # fmt: skip
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    examples = spec["components"]["schemas"]["SegmentResponse"]["examples"]
    assert examples[0]["lesion"]["found"] is True
    assert json.loads(OPENAPI_PATH.read_text())["info"]["title"] == "DermaSeg"
