"""The Open Inference Protocol routes driven by the official client, ``tritonclient[http]``, over loopback.

Two live servers (``python -m service.main``, tiny darkness model): one without API keys and with small
byte and pixel limits, one with an API key. Every infer is compared with what ``POST /segment`` answers
for the same photo and options: the same core must give the same mask, to the pixel.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from bench.http_load import ServiceConfig, ServiceProcess
from tests.bad_inputs import encode, lesion, mask_of
from tests.conftest import metric_value
from tests.onnx_models import write_darkness_model

httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is in the dev extra")
from tritonclient.utils import InferenceServerException  # noqa: E402

MODEL = "dermaseg"
API_KEY = "oip-test-key"
#: The open server's limits: small, so that refusing over them is cheap to provoke.
MAX_UPLOAD_BYTES = 400_000
MAX_PIXELS = 1_000_000
OPTIONS: dict[str, Any] = {"threshold": 0.45, "fill_holes": True, "largest_component": True}


def _start(tmp_path: Path, name: str, *settings: tuple[str, str]) -> Iterator[ServiceProcess]:
    model = write_darkness_model(tmp_path / "darkness.onnx")
    config = ServiceConfig(name, (("max_concurrency", "2"), *settings))
    with ServiceProcess(model, config, tmp_path / f"{name}.log") as service:
        yield service


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    yield from _start(
        tmp_path_factory.mktemp("oip-open"),
        "oip-open",
        ("max_upload_bytes", str(MAX_UPLOAD_BYTES)),
        ("max_pixels", str(MAX_PIXELS)),
    )


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    yield from _start(tmp_path_factory.mktemp("oip-keyed"), "oip-keyed", ("api_keys", API_KEY))


def triton(service: ServiceProcess) -> Any:
    return httpclient.InferenceServerClient(url=f"127.0.0.1:{service.port}", network_timeout=60.0)


def photo_input(photo: bytes, *, binary: bool) -> Any:
    """Input ``image``: the photo raw (binary extension) or base64 (JSON cannot carry raw bytes)."""
    image = httpclient.InferInput("image", [1], "BYTES")
    element = photo if binary else base64.b64encode(photo)
    image.set_data_from_numpy(np.array([element], dtype=np.object_), binary_data=binary)
    return image


def segment(service: ServiceProcess, photo: bytes, **options: Any) -> dict[str, Any]:
    """``POST /segment``'s JSON answer for the same photo and options."""
    query = {
        name: str(value).lower() if isinstance(value, bool) else str(value) for name, value in options.items()
    }
    answer = httpx.post(
        f"{service.url}/segment", params=query, files={"file": ("a.png", photo, "image/png")}, timeout=60
    )
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def png_pixels(b64: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as image:
        return np.asarray(image)


def refused(call: Any) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value


# --- health and metadata ------------------------------------------------------------------------------------


def test_health_and_readiness(open_server: ServiceProcess) -> None:
    client = triton(open_server)
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(MODEL)
    version = client.get_model_metadata(MODEL)["versions"][0]
    assert client.is_model_ready(MODEL, model_version=version)
    assert not client.is_model_ready("another-model")
    assert not client.is_model_ready(MODEL, model_version="no-such-version")


def test_server_and_model_metadata(open_server: ServiceProcess) -> None:
    client = triton(open_server)
    server = client.get_server_metadata()
    assert server["name"] == "dermaseg"
    assert "binary_tensor_data" in server["extensions"]
    metadata = client.get_model_metadata(MODEL)
    assert metadata["name"] == MODEL
    assert metadata["versions"] == [httpx.get(f"{open_server.url}/v1/model").json()["version"]]
    assert metadata["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [1]}]
    outputs = {output["name"]: (output["datatype"], output["shape"]) for output in metadata["outputs"]}
    assert outputs == {
        "mask": ("UINT8", [1, -1, -1]),
        "probability": ("UINT8", [1, -1, -1]),
        "area_px": ("INT64", [1]),
    }
    assert client.get_model_metadata(MODEL, model_version=metadata["versions"][0]) == metadata
    error = refused(lambda: client.get_model_metadata("another-model"))
    assert error.status() == "404"


# --- infer --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_infer_equals_segment(open_server: ServiceProcess, binary: bool, fmt: str) -> None:
    photo = encode(lesion((150, 200), seed=3), fmt)
    client = triton(open_server)
    outputs = [
        httpclient.InferRequestedOutput(name, binary_data=binary)
        for name in ("mask", "probability", "area_px")
    ]
    result = client.infer(MODEL, [photo_input(photo, binary=binary)], outputs=outputs, parameters=OPTIONS)
    reference = segment(open_server, photo, **OPTIONS)

    mask = result.as_numpy("mask")
    assert mask.dtype == np.uint8 and mask.shape == (1, 150, 200)
    assert set(np.unique(mask)) <= {0, 1}
    np.testing.assert_array_equal(mask[0] == 1, mask_of(reference) > 0)
    probability = result.as_numpy("probability")
    assert probability.dtype == np.uint8
    np.testing.assert_array_equal(probability[0], png_pixels(reference["probability_png"]))
    area = result.as_numpy("area_px")
    assert area.dtype == np.int64 and area.tolist() == [reference["lesion"]["area_px"]] == [int(mask.sum())]
    response = result.get_response()
    assert response["model_name"] == MODEL
    assert response["parameters"]["threshold"] == OPTIONS["threshold"]
    assert response["parameters"]["lesion_found"] is True
    encodings = {output["name"]: "data" in output for output in response["outputs"]}
    assert encodings == dict.fromkeys(("mask", "probability", "area_px"), not binary)


def test_default_outputs_come_all_and_binary(open_server: ServiceProcess) -> None:
    photo = encode(lesion(seed=4), "PNG")
    result = triton(open_server).infer(MODEL, [photo_input(photo, binary=True)], request_id="req-7")
    response = result.get_response()
    assert response["id"] == "req-7"
    assert [output["name"] for output in response["outputs"]] == ["mask", "probability", "area_px"]
    assert all("binary_data_size" in output["parameters"] for output in response["outputs"])
    np.testing.assert_array_equal(result.as_numpy("mask")[0] == 1, mask_of(segment(open_server, photo)) > 0)


@pytest.mark.parametrize(
    "names", [["area_px"], ["mask"], ["probability", "mask"]], ids=["area", "mask", "probability+mask"]
)
def test_output_subset(open_server: ServiceProcess, names: list[str]) -> None:
    photo = encode(lesion(seed=5), "PNG")
    outputs = [httpclient.InferRequestedOutput(name, binary_data=True) for name in names]
    result = triton(open_server).infer(MODEL, [photo_input(photo, binary=True)], outputs=outputs)
    assert [output["name"] for output in result.get_response()["outputs"]] == names
    for name in {"mask", "probability", "area_px"} - set(names):
        assert result.as_numpy(name) is None


def test_pixel_spacing_gives_the_area_in_mm2(open_server: ServiceProcess) -> None:
    photo = encode(lesion(seed=6), "PNG")
    result = triton(open_server).infer(
        MODEL, [photo_input(photo, binary=True)], parameters={"pixel_spacing_mm": 0.1}
    )
    area_px = int(result.as_numpy("area_px")[0])
    assert result.get_response()["parameters"]["area_mm2"] == pytest.approx(area_px * 0.01)


# --- errors -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_non_image_is_400(open_server: ServiceProcess, binary: bool) -> None:
    client = triton(open_server)
    error = refused(lambda: client.infer(MODEL, [photo_input(b"%PDF-1.4 not a photo", binary=binary)]))
    assert error.status() == "400"
    assert "not" in error.message().lower()


def test_wrong_datatype_is_400(open_server: ServiceProcess) -> None:
    wrong = httpclient.InferInput("image", [1, 4], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 4), dtype=np.float32))
    error = refused(lambda: triton(open_server).infer(MODEL, [wrong]))
    assert error.status() == "400"
    assert "datatype must be BYTES" in error.message()


def test_wrong_shape_is_400(open_server: ServiceProcess) -> None:
    photo = encode(lesion(), "PNG")
    two = httpclient.InferInput("image", [2], "BYTES")
    two.set_data_from_numpy(np.array([photo, photo], dtype=np.object_))
    error = refused(lambda: triton(open_server).infer(MODEL, [two]))
    assert error.status() == "400"
    assert "shape must be [1]" in error.message()


def test_missing_or_unknown_input_is_400(open_server: ServiceProcess) -> None:
    other = httpclient.InferInput("photo", [1], "BYTES")
    other.set_data_from_numpy(np.array([encode(lesion(), "PNG")], dtype=np.object_))
    error = refused(lambda: triton(open_server).infer(MODEL, [other]))
    assert error.status() == "400"
    assert "unknown input 'photo'" in error.message()
    answer = httpx.post(f"{open_server.url}/v2/models/{MODEL}/infer", json={"inputs": []})
    assert answer.status_code == 400
    assert answer.json()["code"] == "missing_input"
    assert isinstance(answer.json()["error"], str)


def test_unknown_output_is_400(open_server: ServiceProcess) -> None:
    outputs = [httpclient.InferRequestedOutput("contour")]
    error = refused(
        lambda: triton(open_server).infer(
            MODEL, [photo_input(encode(lesion(), "PNG"), binary=True)], outputs=outputs
        )
    )
    assert error.status() == "400"
    assert "unknown output 'contour'" in error.message()


def test_bad_option_is_400(open_server: ServiceProcess) -> None:
    error = refused(
        lambda: triton(open_server).infer(
            MODEL, [photo_input(encode(lesion(), "PNG"), binary=True)], parameters={"threshold": 1.5}
        )
    )
    assert error.status() == "400"
    assert "threshold" in error.message()


def test_over_the_byte_limit_is_413(open_server: ServiceProcess) -> None:
    noise = np.random.default_rng(0).integers(0, 256, size=(400, 400, 3), dtype=np.uint8)
    photo = encode(noise, "PNG")
    assert len(photo) > MAX_UPLOAD_BYTES
    error = refused(lambda: triton(open_server).infer(MODEL, [photo_input(photo, binary=True)]))
    assert error.status() == "413"


def test_over_the_pixel_limit_is_413(open_server: ServiceProcess) -> None:
    photo = encode(np.zeros((1100, 1000, 3), dtype=np.uint8), "PNG")
    assert len(photo) < MAX_UPLOAD_BYTES
    error = refused(lambda: triton(open_server).infer(MODEL, [photo_input(photo, binary=True)]))
    assert error.status() == "413"
    assert "pixel" in error.message()


def test_errors_have_the_protocol_shape_request_ids_and_metrics(open_server: ServiceProcess) -> None:
    url = f"{open_server.url}/v2/models/{MODEL}/infer"
    answer = httpx.post(url, content=b"{not json", headers={"X-Request-ID": "oip-bad-1"})
    assert answer.status_code == 400
    assert answer.headers["x-request-id"] == "oip-bad-1"
    assert set(answer.json()) == {"error", "code"}
    metrics = httpx.get(f"{open_server.url}/metrics").text
    route = "/v2/models/{model_name}/infer"
    assert (
        metric_value(metrics, "dermaseg_http_requests_total", route=route, method="POST", status="400") >= 1
    )
    assert (
        metric_value(metrics, "dermaseg_http_requests_total", route=route, method="POST", status="200") >= 1
    )


# --- API keys -----------------------------------------------------------------------------------------------


def test_api_key_guards_infer_and_metadata_not_health(keyed_server: ServiceProcess) -> None:
    client = triton(keyed_server)
    photo = encode(lesion(seed=8), "PNG")
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    assert client.get_server_metadata()["name"] == "dermaseg"
    error = refused(lambda: client.infer(MODEL, [photo_input(photo, binary=True)]))
    assert error.status() == "401"
    assert refused(lambda: client.get_model_metadata(MODEL)).status() == "401"
    wrong = refused(
        lambda: client.infer(MODEL, [photo_input(photo, binary=True)], headers={"X-API-Key": "no"})
    )
    assert wrong.status() == "401"
    result = client.infer(MODEL, [photo_input(photo, binary=True)], headers={"X-API-Key": API_KEY})
    assert int(result.as_numpy("area_px")[0]) > 0
    bearer = client.infer(
        MODEL, [photo_input(photo, binary=False)], headers={"Authorization": f"Bearer {API_KEY}"}
    )
    np.testing.assert_array_equal(bearer.as_numpy("mask"), result.as_numpy("mask"))


def test_binary_request_by_hand_matches_the_extension(open_server: ServiceProcess) -> None:
    """The wire format without the client: JSON header, then the photo as a length-prefixed BYTES element."""
    photo = encode(lesion(seed=9), "PNG")
    element = len(photo).to_bytes(4, "little") + photo
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "BYTES",
                    "shape": [1],
                    "parameters": {"binary_data_size": len(element)},
                }
            ],
            "outputs": [{"name": "area_px", "parameters": {"binary_data": True}}],
        }
    ).encode()
    answer = httpx.post(
        f"{open_server.url}/v2/models/{MODEL}/infer",
        content=header + element,
        headers={
            "Inference-Header-Content-Length": str(len(header)),
            "Content-Type": "application/octet-stream",
        },
    )
    assert answer.status_code == 200, answer.text
    length = int(answer.headers["inference-header-content-length"])
    described = json.loads(answer.content[:length])
    assert described["outputs"] == [
        {"name": "area_px", "datatype": "INT64", "shape": [1], "parameters": {"binary_data_size": 8}}
    ]
    area = int.from_bytes(answer.content[length:], "little")
    assert area == segment(open_server, photo)["lesion"]["area_px"]
