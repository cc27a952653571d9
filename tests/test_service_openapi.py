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
    ("get", "/v2"): "v2_server_metadata",
    ("get", "/v2/health/live"): "v2_health_live",
    ("get", "/v2/health/ready"): "v2_health_ready",
    ("get", "/v2/models/{model_name}"): "v2_model_metadata",
    ("get", "/v2/models/{model_name}/versions/{model_version}"): "v2_model_version_metadata",
    ("get", "/v2/models/{model_name}/ready"): "v2_model_ready",
    ("get", "/v2/models/{model_name}/versions/{model_version}/ready"): "v2_model_version_ready",
    ("post", "/v2/models/{model_name}/infer"): "v2_infer",
    ("post", "/v2/models/{model_name}/versions/{model_version}/infer"): "v2_model_version_infer",
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


def test_v2_errors_have_the_protocol_shape() -> None:
    spec = build_openapi()
    infer = spec["paths"]["/v2/models/{model_name}/infer"]["post"]
    assert set(infer["responses"]) == {"200", "400", "401", "404", "408", "413", "503"}
    for status, response in infer["responses"].items():
        if status != "200":
            schema = response["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/V2Error"}, status
    assert set(infer["responses"]["200"]["content"]) == {"application/json", "application/octet-stream"}
    assert "Inference-Header-Content-Length" in infer["responses"]["200"]["headers"]
    assert spec["components"]["schemas"]["V2Error"]["required"] == ["error", "code"]
