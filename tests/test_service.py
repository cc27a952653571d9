"""The HTTP API against a tiny real ONNX model (tests/onnx_models.py): every route and every error path."""

from __future__ import annotations

import base64
import io
import logging
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.config import Settings
from service.inference import OnnxModel
from service.main import create_app
from service.pipeline import Pipeline
from service.routes.deps import InferenceLimiter
from service.routes.segment import wants_png
from tests.conftest import make_lesion, metric_value, serving
from tests.onnx_models import TINY_CARD, TINY_NAME, TINY_VERSION, write_darkness_model

# --- helpers -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_darkness_model(tmp_path_factory.mktemp("model") / "tiny.onnx")


def make_settings(model_path: Path, **overrides: Any) -> Settings:
    """Test settings: the tiny model, no warm-up to speak of, the environment ignored."""
    return Settings.model_validate({"model_path": model_path, "warmup_runs": 1, **overrides})


@pytest.fixture
def client(model_path: Path) -> Iterator[TestClient]:
    with serving(create_app(make_settings(model_path))) as test_client:
        yield test_client


def encode(image: np.ndarray, fmt: str = "PNG", **options: Any) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def lesion_photo(size: tuple[int, int] = (150, 200), seed: int = 1, fmt: str = "JPEG") -> bytes:
    image, _ = make_lesion(size, seed)
    return encode(image, fmt, **({"quality": 95} if fmt == "JPEG" else {}))


def upload(data: bytes, name: str = "photo.jpg", content_type: str = "image/jpeg") -> dict[str, Any]:
    return {"file": (name, data, content_type)}


def png_array(b64_or_bytes: str | bytes) -> np.ndarray:
    data = base64.b64decode(b64_or_bytes) if isinstance(b64_or_bytes, str) else b64_or_bytes
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        assert image.mode == "L"
        return np.asarray(image)


def error_code(response: Any) -> str:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    return str(body["error"]["code"])


# --- health, model card, metrics ---------------------------------------------------------------------


def test_live_and_ready(client: TestClient) -> None:
    assert client.get("/health/live").json() == {"status": "alive"}
    ready = client.get("/health/ready")
    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "ready"
    assert body["model"] == {"name": TINY_NAME, "version": TINY_VERSION}
    assert body["providers"] == ["CPUExecutionProvider"]
    assert body["requested_providers"] == ["cpu"]


def test_not_ready_before_the_lifespan_ran(model_path: Path) -> None:
    client = TestClient(create_app(make_settings(model_path)))  # not entered: no start-up
    assert client.get("/health/live").status_code == 200
    ready = client.get("/health/ready")
    assert ready.status_code == 503
    assert ready.json()["status"] == "not_ready"
    response = client.post("/segment", files=upload(lesion_photo()))
    assert response.status_code == 503
    assert error_code(response) == "not_ready"
    assert client.get("/v1/model").status_code == 503


def test_model_card(client: TestClient, model_path: Path) -> None:
    import hashlib

    body = client.get("/v1/model").json()
    assert body["name"] == TINY_NAME
    assert body["version"] == TINY_VERSION
    assert body["input_size"] == {"width": 64, "height": 64}
    assert body["threshold"] == 0.5
    assert body["card"] == TINY_CARD and body["card_source"] == "embedded"
    assert body["providers"] == ["CPUExecutionProvider"]
    assert body["sha256"] == hashlib.sha256(model_path.read_bytes()).hexdigest()
    assert "dermaseg.card" not in body["metadata"]
    assert body["metadata"]["dermaseg.input_size"] == "64x64"


def test_model_card_prefers_a_sidecar_about_this_file(tmp_path: Path) -> None:
    import hashlib
    import json

    model = write_darkness_model(tmp_path / "m.onnx")
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    sidecar = tmp_path / "m.json"
    for content, source in (
        ({"sha256": digest, "evaluation": [{"label": "plain"}]}, "sidecar"),
        ({"sha256": "0" * 64, "evaluation": []}, "embedded"),  # another file's card: not trusted
        ("{not json", "embedded"),
    ):
        sidecar.write_text(content if isinstance(content, str) else json.dumps(content))
        with serving(create_app(make_settings(model))) as client:
            body = client.get("/v1/model").json()
        assert body["card_source"] == source
        assert body["card"] == (content if source == "sidecar" else TINY_CARD)


def test_metrics_move_after_requests(client: TestClient) -> None:
    before = client.get("/metrics").text
    assert metric_value(before, "dermaseg_ready") == 1.0
    assert (
        metric_value(before, "dermaseg_model_info", name=TINY_NAME, providers="CPUExecutionProvider") == 1.0
    )
    assert metric_value(before, "dermaseg_inference_duration_seconds_count") == 0.0

    assert client.post("/segment", files=upload(lesion_photo())).status_code == 200
    assert client.post("/segment", files=upload(b"garbage")).status_code == 400
    assert client.get("/nowhere").status_code == 404
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    after = response.text
    requests = "dermaseg_http_requests_total"
    assert metric_value(after, requests, route="/segment", method="POST", status="200") == 1.0
    assert metric_value(after, requests, route="/segment", method="POST", status="400") == 1.0
    assert metric_value(after, requests, route="unmatched", method="GET", status="404") == 1.0
    assert metric_value(after, requests, route="/metrics", method="GET", status="200") == 1.0
    assert metric_value(after, "dermaseg_inference_duration_seconds_count") == 1.0
    latency = "dermaseg_http_request_duration_seconds_count"
    assert metric_value(after, latency, route="/segment", method="POST") == 2.0
    assert metric_value(after, "dermaseg_http_requests_in_flight") == 1.0  # the scrape itself
    assert metric_value(after, "dermaseg_segmentations_running") == 0.0


def test_each_app_has_its_own_registry(model_path: Path) -> None:
    first, second = create_app(make_settings(model_path)), create_app(make_settings(model_path))
    assert first.state.metrics.registry is not second.state.metrics.registry


# --- POST /segment: the answer -----------------------------------------------------------------------


def test_segment_json(client: TestClient) -> None:
    response = client.post("/segment?pixel_spacing_mm=0.05", files=upload(lesion_photo((150, 200))))
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == {"name": TINY_NAME, "version": TINY_VERSION}
    assert body["image"] == {"width": 200, "height": 150}
    assert body["request_id"] == response.headers["x-request-id"]
    assert body["options"] == {
        "threshold": 0.5,
        "flip_tta": False,
        "largest_component": False,
        "fill_holes": False,
        "pixel_spacing_mm": 0.05,
    }
    mask = png_array(body["mask_png"]) > 0
    probability = png_array(body["probability_png"])
    assert mask.shape == probability.shape == (150, 200)
    lesion = body["lesion"]
    assert lesion["found"] is True
    assert lesion["area_px"] == int(mask.sum())
    assert lesion["area_fraction"] == pytest.approx(mask.mean())
    assert lesion["area_mm2"] == pytest.approx(mask.sum() * 0.05 * 0.05)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    assert lesion["bbox"] == {
        "x": cols[0],
        "y": rows[0],
        "width": cols[-1] - cols[0] + 1,
        "height": rows[-1] - rows[0] + 1,
    }
    # The confidence map and the mask agree: lesion exactly where probability ≥ 0.5 (up to 8-bit rounding).
    assert np.all(probability[mask] >= 127)
    assert np.all(probability[~mask] <= 128)
    timings = body["timings_ms"]
    assert set(timings) == {
        "receive", "queue", "decode", "preprocess", "inference", "postprocess", "encode", "total"
    }  # fmt: skip
    assert all(value >= 0 for value in timings.values())
    assert timings["total"] >= timings["decode"] + timings["inference"] + timings["encode"]
    assert "inference;dur=" in response.headers["server-timing"]


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"threshold": 0.3},
        {"flip_tta": True},
        {"largest_component": True, "fill_holes": True, "threshold": 0.7},
    ],
)
def test_mask_agrees_with_the_inference_core(
    client: TestClient, model_path: Path, options: dict[str, Any]
) -> None:
    photo = lesion_photo((181, 243), seed=3)
    query = {key: str(value).lower() for key, value in options.items()}
    body = client.post("/segment", params=query, files=upload(photo)).json()
    pipeline = OnnxModel(model_path).pipeline()
    direct = pipeline.segment([pipeline.decode(photo)], **options)[0]
    np.testing.assert_array_equal(png_array(body["mask_png"]) > 0, direct.mask)
    expected_probability = np.rint(direct.probability * 255).astype(np.uint8)
    np.testing.assert_array_equal(png_array(body["probability_png"]), expected_probability)
    assert body["lesion"]["area_px"] == direct.area_px
    assert body["options"]["threshold"] == options.get("threshold", 0.5)


@pytest.mark.parametrize(
    ("outputs", "mask", "probability"),
    [
        ("mask", True, False),
        ("probability", False, True),
        ("", False, False),
        ("probability,mask", True, True),
    ],
)
def test_outputs_subset(client: TestClient, outputs: str, mask: bool, probability: bool) -> None:
    body = client.post("/segment", params={"outputs": outputs}, files=upload(lesion_photo())).json()
    assert (body["mask_png"] is not None) is mask
    assert (body["probability_png"] is not None) is probability
    assert body["lesion"]["area_px"] > 0


def test_png_compress_level_changes_bytes_not_pixels(model_path: Path) -> None:
    photo = lesion_photo((300, 400), seed=3)
    answers = {}
    for level in (0, 9):
        with serving(create_app(make_settings(model_path, png_compress_level=level))) as client:
            answers[level] = client.post("/segment", files=upload(photo)).json()
    for field in ("mask_png", "probability_png"):
        np.testing.assert_array_equal(png_array(answers[0][field]), png_array(answers[9][field]))
        assert len(answers[9][field]) < len(answers[0][field]) / 2
    with pytest.raises(ValueError, match="png_compress_level"):
        make_settings(model_path, png_compress_level=10)


@pytest.mark.parametrize(
    ("fmt", "name", "content_type"),
    [("JPEG", "a.jpg", "image/jpeg"), ("PNG", "a.png", "image/png"), ("BMP", "a.bmp", "image/bmp"),
     ("TIFF", "a.tif", "image/tiff")],
)  # fmt: skip
def test_every_supported_format(client: TestClient, fmt: str, name: str, content_type: str) -> None:
    image, _ = make_lesion((97, 131), seed=5)
    response = client.post("/segment", files=upload(encode(image, fmt), name, content_type))
    assert response.status_code == 200, response.text
    assert png_array(response.json()["mask_png"]).shape == (97, 131)


def test_exif_orientation_is_applied(client: TestClient) -> None:
    image, _ = make_lesion((80, 120), seed=6)  # stored 120 wide, 80 high; EXIF says: rotate
    exif = Image.Exif()
    exif[0x0112] = 6
    body = client.post("/segment", files=upload(encode(image, "JPEG", exif=exif))).json()
    assert body["image"] == {"width": 80, "height": 120}
    assert png_array(body["mask_png"]).shape == (120, 80)


@pytest.mark.parametrize(
    ("query", "accept", "png"),
    [
        ({"format": "png"}, None, True),
        ({}, "image/png", True),
        ({}, "image/png, application/json;q=0.5", True),
        ({}, "application/json", False),
        ({}, "*/*", False),
        ({"format": "json"}, "image/png", False),
    ],
)
def test_png_only(client: TestClient, query: dict[str, str], accept: str | None, png: bool) -> None:
    headers = {"Accept": accept} if accept else {}
    response = client.post("/segment", params=query, headers=headers, files=upload(lesion_photo((70, 90))))
    assert response.status_code == 200
    if png:
        assert response.headers["content-type"] == "image/png"
        mask = png_array(response.content)
        assert mask.shape == (70, 90)
        assert set(np.unique(mask)) <= {0, 255}
        assert response.headers["x-lesion-area-px"] == str(int((mask > 0).sum()))
        assert response.headers["x-model"] == f"{TINY_NAME}/{TINY_VERSION}"
        assert response.headers["x-request-id"]
    else:
        assert response.headers["content-type"] == "application/json"


def test_accept_negotiation() -> None:
    assert wants_png(None, "image/*") is True
    assert wants_png(None, "application/json, image/png") is False  # a tie goes to JSON
    assert wants_png(None, "text/html") is False
    assert wants_png(None, "image/png;q=0.2, */*;q=0.1") is True
    assert wants_png(None, "image/png;q=bogus") is False
    assert wants_png(None, None) is False


def test_nothing_found_on_a_bright_photo(client: TestClient) -> None:
    white = np.full((40, 50, 3), 250, dtype=np.uint8)
    body = client.post("/segment", files=upload(encode(white), "w.png", "image/png")).json()
    assert body["lesion"] == {
        "found": False,
        "area_px": 0,
        "area_fraction": 0.0,
        "area_mm2": None,
        "bbox": None,
    }
    assert not png_array(body["mask_png"]).any()


def test_request_id_is_echoed_when_safe(client: TestClient) -> None:
    response = client.post("/segment", headers={"X-Request-ID": "clinic-42.a"}, files=upload(lesion_photo()))
    assert response.headers["x-request-id"] == "clinic-42.a"
    assert response.json()["request_id"] == "clinic-42.a"
    unsafe = client.get("/health/live", headers={"X-Request-ID": "no spaces {please}"})
    assert unsafe.headers["x-request-id"] != "no spaces {please}"
    assert len(unsafe.headers["x-request-id"]) == 32


def test_one_log_line_per_request_without_the_upload(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="dermaseg.access"):
        response = client.post(
            "/segment?pixel_spacing_mm=0.1", files=upload(lesion_photo(), "patient-jane-doe.jpg")
        )
    lines = [record.getMessage() for record in caplog.records if record.name == "dermaseg.access"]
    assert len(lines) == 1
    import json

    record = json.loads(lines[0])
    assert record["request_id"] == response.headers["x-request-id"]
    assert record["status"] == 200
    assert record["route"] == "/segment"
    assert set(record["timings_ms"]) >= {"decode", "inference", "encode", "total"}
    assert "jane" not in lines[0]
    assert "pixel_spacing" not in lines[0]


# --- POST /segment: errors ---------------------------------------------------------------------------


def test_garbage_bytes_400(client: TestClient) -> None:
    response = client.post("/segment", files=upload(b"\x00\x01 definitely not a photo" * 10))
    assert response.status_code == 400
    assert error_code(response) == "undecodable_image"


def test_truncated_jpeg_400(client: TestClient) -> None:
    photo = lesion_photo((300, 300))
    response = client.post("/segment", files=upload(photo[: len(photo) // 3]))
    assert response.status_code == 400
    assert error_code(response) == "undecodable_image"


def test_gif_415(client: TestClient) -> None:
    image, _ = make_lesion((40, 40), seed=2)
    response = client.post("/segment", files=upload(encode(image, "GIF"), "a.gif", "image/gif"))
    assert response.status_code == 415
    assert error_code(response) == "unsupported_media_type"
    assert "GIF" in response.json()["error"]["message"]


def test_not_multipart_415(client: TestClient) -> None:
    response = client.post("/segment", content=lesion_photo(), headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 415
    assert error_code(response) == "unsupported_media_type"


def test_missing_file_field_422(client: TestClient) -> None:
    response = client.post("/segment", files={"image": ("a.jpg", lesion_photo(), "image/jpeg")})
    assert response.status_code == 422
    assert error_code(response) == "validation_error"
    assert "file" in response.json()["error"]["message"]


def test_options_as_form_fields(client: TestClient) -> None:
    photo = lesion_photo()
    by_query = client.post(
        "/segment",
        params={"threshold": "0.3", "outputs": "mask", "pixel_spacing_mm": "0.05"},
        files=upload(photo),
    ).json()
    by_form = client.post(
        "/segment",
        data={"threshold": "0.3", "outputs": "mask", "pixel_spacing_mm": "0.05", "unrelated": "ignored"},
        files=upload(photo),
    ).json()
    assert by_form["options"] == by_query["options"] and by_form["options"]["threshold"] == 0.3
    assert by_form["lesion"] == by_query["lesion"] and by_form["lesion"]["area_mm2"] is not None
    assert by_form["probability_png"] is None and by_form["mask_png"] == by_query["mask_png"]

    mask_only = client.post("/segment", data={"format": "png"}, files=upload(photo))
    assert mask_only.headers["content-type"] == "image/png"


@pytest.mark.parametrize(
    ("params", "data", "message"),
    [
        ({"threshold": "0.3"}, {"threshold": "0.4"}, "given both in the query and as form fields"),
        ({}, {"threshold": "2"}, "threshold"),
        ({}, {"flip_tta": "maybe"}, "flip_tta"),
        ({}, {"outputs": "x" * 300}, "longer than any option"),
    ],
)
def test_bad_form_options_422(client: TestClient, params: dict, data: dict, message: str) -> None:
    response = client.post("/segment", params=params, data=data, files=upload(lesion_photo()))
    assert response.status_code == 422
    assert error_code(response) == "validation_error"
    assert message in response.json()["error"]["message"]


@pytest.mark.parametrize(
    "query",
    [{"threshold": "1.5"}, {"outputs": "mask,colour"}, {"pixel_spacing_mm": "-1"}, {"format": "gif"},
     {"flip_tta": "maybe"}],
)  # fmt: skip
def test_bad_options_422(client: TestClient, query: dict[str, str]) -> None:
    response = client.post("/segment", params=query, files=upload(lesion_photo()))
    assert response.status_code == 422
    assert error_code(response) == "validation_error"
    assert next(iter(query)) in response.json()["error"]["message"]


def test_malformed_multipart_400(client: TestClient) -> None:
    body = b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\nabc'
    headers = {"Content-Type": "multipart/form-data; boundary=XyZ"}
    response = client.post("/segment", content=body, headers=headers)
    assert response.status_code == 400
    assert error_code(response) == "malformed_request"
    no_boundary = client.post("/segment", content=b"x", headers={"Content-Type": "multipart/form-data"})
    assert no_boundary.status_code == 400


def test_upload_over_the_byte_limit_413_before_decoding(
    model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_decode(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("decoded an upload over the byte limit")

    monkeypatch.setattr(Pipeline, "decode", must_not_decode)
    photo = np.random.default_rng(0).integers(0, 255, (100, 100, 3), dtype=np.uint8)
    data = encode(photo, "BMP")  # 30 kB
    with serving(create_app(make_settings(model_path, max_upload_bytes=10_000))) as client:
        response = client.post("/segment", files=upload(data, "a.bmp", "image/bmp"))
        assert response.status_code == 413
        assert error_code(response) == "payload_too_large"

        # Without Content-Length (chunked), the limit is enforced on the bytes as they arrive.
        boundary = "b0undary"
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.bmp"\r\n\r\n'
        chunks = [head.encode(), data[:15_000], data[15_000:], f"\r\n--{boundary}--\r\n".encode()]
        streamed = client.post(
            "/segment",
            content=iter(chunks),
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        assert "content-length" not in streamed.request.headers
        assert streamed.status_code == 413
        assert error_code(streamed) == "payload_too_large"


def test_image_over_the_pixel_limit_413(model_path: Path) -> None:
    with serving(create_app(make_settings(model_path, max_pixels=10_000))) as client:
        response = client.post("/segment", files=upload(lesion_photo((120, 100))))  # 12 000 pixels
        assert response.status_code == 413
        assert error_code(response) == "image_too_large"
        assert client.post("/segment", files=upload(lesion_photo((100, 100)))).status_code == 200


def test_decompression_bomb_413(client: TestClient) -> None:
    # A 4-byte-per-row PNG that claims 60 000 × 1 000 pixels: refused from its header, never inflated.
    bomb = encode(np.zeros((1000, 60000), dtype=np.uint8), "PNG", optimize=True)
    assert len(bomb) < 200_000
    response = client.post("/segment", files=upload(bomb, "bomb.png", "image/png"))
    assert response.status_code == 413
    assert error_code(response) == "image_too_large"


def test_unexpected_failure_500_without_internals(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("secret detail at /srv/internal/path.py")

    monkeypatch.setattr(Pipeline, "postprocess", explode)
    response = client.post("/segment", files=upload(lesion_photo()))
    assert response.status_code == 500
    assert error_code(response) == "internal_error"
    assert "secret" not in response.text
    assert "/srv" not in response.text
    assert response.headers["x-request-id"] in response.json()["error"]["message"]
    # The slot was given back: the next request is served.
    monkeypatch.undo()
    assert client.post("/segment", files=upload(lesion_photo())).status_code == 200


def test_unknown_route_and_method_use_the_error_shape(client: TestClient) -> None:
    assert error_code(client.get("/nowhere")) == "not_found"
    wrong_method = client.get("/segment")
    assert wrong_method.status_code == 405
    assert error_code(wrong_method) == "method_not_allowed"


# --- concurrency -------------------------------------------------------------------------------------


def test_overloaded_503_with_retry_after(model_path: Path) -> None:
    settings = make_settings(model_path, max_concurrency=1, max_queued=0, retry_after_s=7)
    with serving(create_app(settings)) as client:
        limiter: InferenceLimiter = client.app.state.limiter  # type: ignore[attr-defined]
        client.portal.call(limiter.acquire)  # type: ignore[union-attr]  # a request holding the only slot
        try:
            response = client.post("/segment", files=upload(lesion_photo()))
            assert response.status_code == 503
            assert error_code(response) == "overloaded"
            assert response.headers["retry-after"] == "7"
        finally:
            client.portal.call(limiter.release)  # type: ignore[union-attr]
        assert client.post("/segment", files=upload(lesion_photo())).status_code == 200


def test_requests_wait_in_a_bounded_queue(model_path: Path) -> None:
    settings = make_settings(model_path, max_concurrency=1, max_queued=1)
    with serving(create_app(settings)) as client:
        limiter: InferenceLimiter = client.app.state.limiter  # type: ignore[attr-defined]
        client.portal.call(limiter.acquire)  # type: ignore[union-attr]
        queued: dict[str, int] = {}
        waiter = threading.Thread(
            target=lambda: queued.update(
                status=client.post("/segment", files=upload(lesion_photo())).status_code
            )
        )
        waiter.start()
        try:
            deadline = time.monotonic() + 10
            while limiter.waiting < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert limiter.waiting == 1
            refused = client.post("/segment", files=upload(lesion_photo()))
            assert refused.status_code == 503
            assert error_code(refused) == "overloaded"
        finally:
            client.portal.call(limiter.release)  # type: ignore[union-attr]
            waiter.join(timeout=30)
        assert queued == {"status": 200}
        assert limiter.running == 0
        assert limiter.waiting == 0


# --- auth, CORS, docs --------------------------------------------------------------------------------


def test_api_keys(model_path: Path) -> None:
    with serving(create_app(make_settings(model_path, api_keys=["first-key", "second-key"]))) as client:
        photo = lesion_photo()
        missing = client.post("/segment", files=upload(photo))
        assert missing.status_code == 401
        assert error_code(missing) == "unauthorized"
        assert missing.headers["www-authenticate"].startswith("Bearer")
        wrong = client.post("/segment", headers={"X-API-Key": "third-key"}, files=upload(photo))
        assert wrong.status_code == 401
        assert (
            client.post("/segment", headers={"X-API-Key": "second-key"}, files=upload(photo)).status_code
            == 200
        )
        bearer = {"Authorization": "Bearer first-key"}
        assert client.post("/segment", headers=bearer, files=upload(photo)).status_code == 200
        assert client.get("/v1/model").status_code == 401
        assert client.get("/v1/model", headers=bearer).status_code == 200
        assert client.get("/v1/model", headers={"Authorization": "Basic Zmlyc3Qta2V5"}).status_code == 401
        for open_path in ("/health/live", "/health/ready", "/metrics"):
            assert client.get(open_path).status_code == 200


def test_no_keys_no_auth(client: TestClient) -> None:
    assert client.get("/v1/model", headers={"X-API-Key": "anything"}).status_code == 200


def test_cors(model_path: Path, client: TestClient) -> None:
    preflight = {"Origin": "https://clinic.example", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in client.options("/segment", headers=preflight).headers
    with serving(create_app(make_settings(model_path, cors_origins=["https://clinic.example"]))) as cors:
        response = cors.options("/segment", headers=preflight)
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "https://clinic.example"


def test_docs_are_off_unless_configured(model_path: Path, client: TestClient) -> None:
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert error_code(response) == "not_found"
    with serving(create_app(make_settings(model_path, docs=True))) as documented:
        assert documented.get("/docs").status_code == 200
        assert documented.get("/redoc").status_code == 200
        assert documented.get("/openapi.json").json()["paths"].keys() >= {"/segment", "/v1/model"}


# --- uploads never touch the disk --------------------------------------------------------------------


def test_a_5_mb_upload_creates_no_temporary_file(
    client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import starlette.formparsers

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a temporary file was created for an upload")

    temp_dir = tmp_path / "tmp"
    temp_dir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp_dir))
    for name in ("SpooledTemporaryFile", "NamedTemporaryFile", "TemporaryFile", "mkstemp"):
        monkeypatch.setattr(tempfile, name, refuse)
    monkeypatch.setattr(starlette.formparsers, "SpooledTemporaryFile", refuse)

    image = np.random.default_rng(1).integers(0, 255, (1300, 1300, 3), dtype=np.uint8)
    data = encode(image, "BMP")
    assert len(data) > 5_000_000
    response = client.post("/segment?outputs=mask", files=upload(data, "big.bmp", "image/bmp"))
    assert response.status_code == 200, response.text
    assert response.json()["image"] == {"width": 1300, "height": 1300}
    assert list(temp_dir.iterdir()) == []
