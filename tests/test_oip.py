"""The Open Inference Protocol in process: wire encoding against tritonclient's own, saturation, readiness,
and the place kept for ``estimated_jaccard``."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service import oip
from service.config import Settings
from service.errors import ServiceError
from service.inference import INPUT_NAME as ONNX_INPUT_NAME
from service.main import create_app
from service.pipeline import Segmentation
from service.routes import v2
from tests.bad_inputs import encode, lesion
from tests.conftest import serving
from tests.onnx_models import write_darkness_model

httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is in the dev extra")
from tritonclient.http._utils import _get_inference_request  # noqa: E402

INFER = "/v2/models/dermaseg/infer"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_darkness_model(tmp_path_factory.mktemp("oip") / "tiny.onnx")


@pytest.fixture
def client(model_path: Path) -> Iterator[TestClient]:
    with serving(create_app(Settings(model_path=model_path, max_concurrency=1, max_queued=0))) as client:
        yield client


def json_request(photo: bytes, **extra: Any) -> dict[str, Any]:
    image = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(photo).decode()]}
    return {"inputs": [image], **extra}


@pytest.mark.parametrize("binary", [True, False])
def test_requests_encoded_by_tritonclient_parse(binary: bool) -> None:
    photo = b"\x00\xffphoto bytes\x01"
    image = httpclient.InferInput("image", [1], "BYTES")
    element = photo if binary else base64.b64encode(photo)
    image.set_data_from_numpy(np.array([element], dtype=np.object_), binary_data=binary)
    body, json_size = _get_inference_request(
        [image], "r1", None, 0, False, False, 0, None, {"threshold": 0.3}
    )
    parsed = oip.parse_infer_request(body, None if json_size is None else str(json_size), ("image",))
    assert parsed.inputs == {"image": [photo]}
    assert parsed.id == "r1"
    assert parsed.parameters["threshold"] == 0.3
    assert parsed.parameters["binary_data_output"] is True  # the client's default when no output is named
    assert parsed.outputs is None


_IMAGE = b'{"name": "image", "datatype": "BYTES", "shape": [1], '
_BINARY_IMAGE = b'{"inputs": [' + _IMAGE + b'"parameters": {"binary_data_size": %d}}]}'


@pytest.mark.parametrize(
    ("document", "tail", "message"),
    [
        (b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1]}]}', None, "no data"),
        (b'{"inputs": [' + _IMAGE + b'"data": ["%%"]}]}', None, "base64"),
        (b'{"inputs": [' + _IMAGE + b'"data": [1]}]}', None, "base64"),
        (b'{"inputs": [' + _IMAGE + b'"data": ["", ""]}]}', None, "shape"),
        (b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": "1", "data": [""]}]}', None, "shape"),
        (b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": [1.0]}]}', None, "BYTES"),
        (b'{"inputs": {}}', None, "non-empty list"),
        (b"[1]", None, "JSON object"),
        (_BINARY_IMAGE % 9, b"\x05\x00\x00\x00abc", "binary_data_size"),
        (_BINARY_IMAGE % 7, b"\x05\x00\x00\x00abc", "fewer follow"),
        (_BINARY_IMAGE % 9, b"\x01\x00\x00\x00a\x00\x00\x00\x00", "shape says 1 element(s)"),
        (_BINARY_IMAGE % 6, b"\x01\x00\x00\x00ab", "truncated"),
        (b'{"inputs": [' + _IMAGE + b'"data": [""]}]}', b"tail", "belong to"),
    ],
)
def test_malformed_requests_are_400(document: bytes, tail: bytes | None, message: str) -> None:
    body = document + (tail or b"")
    with pytest.raises(ServiceError) as caught:
        oip.parse_infer_request(body, None if tail is None else str(len(document)), ("image",))
    assert caught.value.status_code == 400
    assert message in caught.value.message


def test_header_length_must_fit_the_body() -> None:
    with pytest.raises(ServiceError, match="no larger than the body"):
        oip.parse_infer_request(b'{"inputs": []}', "999", ("image",))


def test_responses_decode_with_tritonclient() -> None:
    mask = np.arange(12, dtype=np.uint8).reshape(1, 3, 4)
    area = np.array([7], dtype=np.int64)
    quality = np.array([0.75], dtype=np.float32)
    tensors = [oip.Tensor("mask", mask), oip.Tensor("area_px", area), oip.Tensor("q", quality)]
    for binary in ({"mask": True, "area_px": True, "q": True}, {}, {"area_px": True}):
        body, length = oip.encode_infer_response({"model_name": "m", "id": None}, tensors, binary)
        assert (length is None) == (not any(binary.values()))
        result = httpclient.InferResult.from_response_body(body, header_length=length)
        np.testing.assert_array_equal(result.as_numpy("mask"), mask)
        np.testing.assert_array_equal(result.as_numpy("area_px"), area)
        np.testing.assert_array_equal(result.as_numpy("q"), quality)
        assert "id" not in result.get_response()


def test_model_name_is_the_triton_repository_name() -> None:
    export = pytest.importorskip(
        "training.export", reason="training.export is importable with the train extra"
    )
    assert export.TRITON_MODEL_NAME == v2.MODEL_NAME
    assert ONNX_INPUT_NAME == v2.INPUT_NAME  # the Triton repository's input (the ONNX contract's)


def test_saturated_is_503_with_retry_after(client: TestClient) -> None:
    limiter = client.app.state.limiter  # type: ignore[attr-defined]
    limiter.running = limiter.max_concurrency + limiter.max_queued  # every slot taken, no room to wait
    try:
        answer = client.post(INFER, json=json_request(encode(lesion(), "PNG")))
    finally:
        limiter.running = 0
    assert answer.status_code == 503
    assert answer.headers["retry-after"] == "1"
    assert answer.json()["code"] == "overloaded"
    assert client.post(INFER, json=json_request(encode(lesion(), "PNG"))).status_code == 200


def test_not_ready_says_false_and_refuses_to_infer(model_path: Path) -> None:
    app = create_app(Settings(model_path=model_path))
    client = TestClient(app)  # no lifespan: the model is not loaded
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").status_code == 400
    assert client.get("/v2/health/ready").json() == {"ready": False}
    assert client.get("/v2/models/dermaseg/ready").json() == {"name": "dermaseg", "ready": False}
    answer = client.post(INFER, json=json_request(encode(lesion(), "PNG")))
    assert answer.status_code == 503
    assert answer.json()["code"] == "not_ready"
    assert answer.headers["retry-after"]


def test_unsupported_format_is_400_not_415(client: TestClient) -> None:
    gif = encode(lesion(), "GIF")
    answer = client.post(INFER, json=json_request(gif))
    assert answer.status_code == 400
    assert answer.json()["code"] == "unsupported_media_type"


class _Quality:
    estimated_jaccard = 0.8125


def test_estimated_jaccard_only_when_the_core_estimates_it(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    photo = encode(lesion(), "PNG")
    asked = json_request(photo, outputs=[{"name": "estimated_jaccard"}, {"name": "area_px"}])
    refused = client.post(INFER, json=asked)
    assert refused.status_code == 400
    assert "estimated_jaccard" in refused.json()["error"]

    real = v2.run_segmentation

    def with_quality(*args: Any, **kwargs: Any) -> tuple[Segmentation, dict[str, float]]:
        segmentation, timings = real(*args, **kwargs)
        segmentation.quality = _Quality()  # type: ignore[attr-defined]
        return segmentation, timings

    monkeypatch.setattr(v2, "run_segmentation", with_quality)
    answer = client.post(INFER, json=asked)
    assert answer.status_code == 200, answer.text
    outputs = {output["name"]: output for output in answer.json()["outputs"]}
    assert outputs["estimated_jaccard"]["datatype"] == "FP32"
    assert outputs["estimated_jaccard"]["data"] == [0.8125]
    assert list(outputs) == ["estimated_jaccard", "area_px"]
