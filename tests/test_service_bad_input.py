"""Every kind of bad input in tests/bad_inputs.py gets its documented answer, and the service stays up.

One app serves the whole corpus in turn (as one long-lived service would): after each request it must
still be ready and still segment a good photo correctly. Also: what the answers and the log must never
carry (EXIF, filenames, pixels), and API keys (401 and no work done, never logged).
"""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.config import Settings
from service.errors import ERROR_CODES
from service.main import create_app
from tests.bad_inputs import (
    CORPUS_LIMITS,
    Case,
    bad_cases,
    corpus,
    encode,
    lesion,
    mask_of,
    multipart,
    photo_part,
)
from tests.conftest import serving
from tests.onnx_models import write_darkness_model


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_darkness_model(tmp_path_factory.mktemp("model") / "tiny.onnx")


@pytest.fixture(scope="module")
def client(model_path: Path) -> Iterator[TestClient]:
    settings = Settings.model_validate({"model_path": model_path, **CORPUS_LIMITS})
    with serving(create_app(settings)) as test_client:
        yield test_client


def send(client: TestClient, case: Case, **headers: str) -> object:
    return client.post(case.path, content=case.body, headers={**case.headers, **headers})


def test_the_corpus_covers_more_than_twenty_kinds_of_bad_input() -> None:
    assert len(bad_cases()) >= 20
    assert {case.status for case in bad_cases()} >= {400, 413, 415, 422}
    for case in bad_cases():
        assert ERROR_CODES[str(case.code)] == case.status, case.name  # every expectation is a documented code


@pytest.mark.parametrize("case", corpus(), ids=lambda case: case.name)
def test_each_input_gets_its_documented_answer(client: TestClient, case: Case) -> None:
    response = send(client, case)
    assert response.status_code == case.status, response.text[:300]  # type: ignore[attr-defined]
    body = response.json()  # type: ignore[attr-defined]
    if case.valid:
        width, height = case.size or (0, 0)
        assert body["image"] == {"width": width, "height": height}
        assert mask_of(body).shape == (height, width)
        assert set(np.unique(mask_of(body))) <= {0, 255}
    else:
        assert body == {"error": {"code": case.code, "message": body["error"]["message"]}}
        assert body["error"]["message"]
    # Nothing broke: still ready, and a good photo still gets the same answer as before.
    assert client.get("/health/ready").status_code == 200


def test_good_answers_are_unchanged_by_bad_ones_between_them(client: TestClient) -> None:
    good = next(case for case in corpus() if case.valid and case.name.startswith("good"))
    before = mask_of(send(client, good).json())  # type: ignore[attr-defined]
    for case in bad_cases():
        send(client, case)
    after = mask_of(send(client, good).json())  # type: ignore[attr-defined]
    np.testing.assert_array_equal(before, after)


def test_metrics_count_the_bad_inputs_as_4xx_not_5xx(client: TestClient) -> None:
    for case in bad_cases():
        send(client, case)
    text = client.get("/metrics").text
    assert 'status="5' not in text
    assert 'dermaseg_http_requests_total{method="POST",route="/segment",status="415"}' in text


# --- what answers and logs never carry ---------------------------------------------------------------

SECRET = "PATIENT-Jane-Doe-1961-05-04"


def _photo_with_exif() -> bytes:
    exif = Image.Exif()
    exif[0x013B] = SECRET  # Artist
    exif[0x010E] = f"{SECRET} left forearm"  # ImageDescription
    exif[0x9286] = SECRET  # UserComment (in the IFD0 here; Pillow writes what it is given)
    return encode(Image.fromarray(lesion((120, 160), seed=4)), "JPEG", exif=exif.tobytes(), quality=90)


@pytest.mark.parametrize("answer", ["json", "png"])
def test_answers_do_not_echo_exif_or_the_filename(client: TestClient, answer: str) -> None:
    data = _photo_with_exif()
    assert SECRET.encode() in data
    body = multipart(photo_part(data, f"{SECRET}.jpg".encode()))
    response = client.post(
        f"/segment?format={answer}", content=body, headers={"Content-Type": corpus()[0].content_type}
    )
    assert response.status_code == 200
    raw = response.content + "".join(f"{k}: {v}" for k, v in response.headers.items()).encode()
    assert SECRET.encode() not in raw
    pngs = [response.content] if answer == "png" else [
        base64.b64decode(response.json()[key]) for key in ("mask_png", "probability_png")
    ]  # fmt: skip
    for png in pngs:
        with Image.open(io.BytesIO(png)) as image:
            assert not image.getexif()
            assert not image.info.get("exif")
            assert set(image.info) <= {"dpi", "gamma"}


def test_the_log_holds_no_filenames_pixels_keys_or_queries(
    model_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = "sk-dermaseg-0123456789abcdef"
    settings = Settings.model_validate(
        {"model_path": model_path, "api_keys": [key], "log_level": "DEBUG", **CORPUS_LIMITS}
    )
    data = _photo_with_exif()
    body = multipart(photo_part(data, f"{SECRET}.jpg".encode()))
    with caplog.at_level(logging.DEBUG), serving(create_app(settings)) as client:
        headers = {"Content-Type": corpus()[0].content_type}
        for presented in ({"X-API-Key": key}, {"Authorization": f"Bearer {key}"}, {"X-API-Key": key + "x"}):
            client.post(
                f"/segment?threshold=0.4242424&note={SECRET}", content=body, headers=headers | presented
            )
        for case in bad_cases():
            send(client, case, **{"X-API-Key": key})
    # Everything logged in this process but the test's own HTTP client (httpx logs the URLs it calls).
    text = "\n".join(record.getMessage() for record in caplog.records if record.name != "httpx")
    assert '"route":"/segment"' in text  # the access log was captured
    # (0.4242424 has more decimals than any timing in the log, so only the query could have put it there.)
    for secret in (SECRET, key, "0.4242424", base64.b64encode(data[:48]).decode()[:40]):
        assert secret not in text, secret
    assert "photo.jpg" not in text


def test_wrong_or_missing_keys_are_refused_before_any_work(
    model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.routes import segment as segment_route

    settings = Settings.model_validate({"model_path": model_path, "api_keys": ["right-key"]})
    calls: list[int] = []
    real = segment_route.read_upload

    async def counting_read_upload(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return await real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(segment_route, "read_upload", counting_read_upload)
    body = multipart(photo_part(encode(lesion(), "PNG")))
    headers = {"Content-Type": corpus()[0].content_type}
    with serving(create_app(settings)) as client:
        for presented in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}, {"X-API-Key": ""}):
            response = client.post("/segment", content=body, headers=headers | presented)
            assert response.status_code == 401, presented
            assert response.json()["error"]["code"] == "unauthorized"
            assert client.get("/v1/model", headers=presented).status_code == 401
        assert calls == []
        text = client.get("/metrics").text
        assert "dermaseg_inference_duration_seconds_count 0.0" in text
        assert (
            client.post("/segment", content=body, headers=headers | {"X-API-Key": "right-key"}).status_code
            == 200
        )
        assert calls == [1]
