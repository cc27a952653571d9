"""The outline's quality in every answer: estimated Jaccard, review flag, reasons, headers, metrics, card.

These run the shipped model with its shipped estimator (models/dermaseg.quality.json), as served.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.config import DEFAULT_MODEL_PATH, Settings
from service.inference import ModelLoadError
from service.main import create_app, load_served_model
from service.quality import QualityEstimator, estimator_path
from tests.conftest import make_lesion, metric_value, serving
from tests.onnx_models import write_darkness_model

pytestmark = pytest.mark.skipif(
    not DEFAULT_MODEL_PATH.is_file() or not estimator_path(DEFAULT_MODEL_PATH).is_file(),
    reason="the shipped model and its quality estimator are not in this checkout",
)


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def clear_lesion() -> bytes:
    image, _ = make_lesion((300, 400), seed=2)
    return png(image)


def blank_photo() -> bytes:
    return png(np.full((300, 400, 3), 180, np.uint8))


def segment(client: TestClient, data: bytes, **params: Any) -> Any:
    response = client.post("/segment", params=params, files={"file": ("photo.png", data, "image/png")})
    assert response.status_code == 200, response.text
    return response


def settings(**overrides: Any) -> Settings:
    return Settings.model_validate({"model_path": DEFAULT_MODEL_PATH, "warmup_runs": 1, **overrides})


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with serving(create_app(settings())) as test_client:
        yield test_client


def test_every_json_answer_carries_a_bounded_quality(client: TestClient) -> None:
    for data in (clear_lesion(), blank_photo()):
        quality = segment(client, data, outputs="").json()["quality"]
        assert set(quality) == {"estimated_jaccard", "review_recommended", "reasons"}
        assert 0.0 <= quality["estimated_jaccard"] <= 1.0
        assert isinstance(quality["review_recommended"], bool)


def test_a_clear_lesion_scores_high_and_a_blank_photo_is_flagged(client: TestClient) -> None:
    clear = segment(client, clear_lesion(), outputs="").json()["quality"]
    blank = segment(client, blank_photo(), outputs="").json()["quality"]
    review_below = QualityEstimator.load(estimator_path(DEFAULT_MODEL_PATH)).review_below

    assert clear["estimated_jaccard"] > review_below
    assert clear == {
        "estimated_jaccard": clear["estimated_jaccard"],
        "review_recommended": False,
        "reasons": [],
    }
    assert blank["estimated_jaccard"] < clear["estimated_jaccard"]
    assert blank["review_recommended"] is True
    assert blank["reasons"] == ["no_lesion_found"]


def test_the_estimate_is_deterministic(client: TestClient) -> None:
    data = clear_lesion()
    first = segment(client, data, outputs="").json()["quality"]
    assert all(segment(client, data, outputs="").json()["quality"] == first for _ in range(2))


def test_png_answers_carry_the_quality_as_headers(client: TestClient) -> None:
    data = clear_lesion()
    quality = segment(client, data, outputs="").json()["quality"]
    clear = segment(client, data, format="png")
    assert float(clear.headers["x-lesion-estimated-jaccard"]) == pytest.approx(quality["estimated_jaccard"])
    assert clear.headers["x-lesion-review"] == "false"
    blank = segment(client, blank_photo(), format="png")
    assert blank.headers["x-lesion-review"] == "true; no_lesion_found"


def test_the_review_threshold_setting_changes_the_flag() -> None:
    data = clear_lesion()
    with serving(create_app(settings(review_below=0.999))) as strict:
        flagged = segment(strict, data, outputs="").json()["quality"]
    assert flagged["review_recommended"] is True
    assert flagged["reasons"]  # a flagged answer always says why
    with serving(create_app(settings(review_below=0.0))) as lenient:
        assert segment(lenient, blank_photo(), outputs="").json()["quality"]["review_recommended"] is False
        card = lenient.get("/v1/model").json()
    assert card["quality"]["review_below"] == 0.0


def test_metrics_count_estimates_and_flagged_answers(client: TestClient) -> None:
    def read() -> tuple[float, float, float]:
        text = client.get("/metrics").text
        return (
            metric_value(text, "dermaseg_estimated_jaccard_count"),
            metric_value(text, "dermaseg_review_recommended_total"),
            _reason_count(text),
        )

    before = read()
    segment(client, clear_lesion(), outputs="")
    segment(client, blank_photo(), outputs="")
    after = read()
    assert after[0] - before[0] == 2
    assert after[1] - before[1] == 1
    assert after[2] - before[2] == 1


def _reason_count(text: str) -> float:
    try:
        return metric_value(text, "dermaseg_review_reasons_total", reason="no_lesion_found")
    except AssertionError:  # no flagged answer yet: the labelled series does not exist
        return 0.0


def test_the_model_card_says_how_the_estimator_was_calibrated(client: TestClient) -> None:
    card = client.get("/v1/model").json()
    estimator = QualityEstimator.load(estimator_path(DEFAULT_MODEL_PATH))
    assert card["quality"]["review_below"] == pytest.approx(estimator.review_below)
    assert card["quality"]["calibration"] == json.loads(json.dumps(dict(estimator.calibration)))


def test_an_estimator_of_another_model_stops_the_start_up(tmp_path: Path) -> None:
    model = write_darkness_model(tmp_path / "tiny.onnx")
    shutil.copy(estimator_path(DEFAULT_MODEL_PATH), estimator_path(model))
    with pytest.raises(ModelLoadError, match=r"quality estimator: .*calibrated on the model"):
        load_served_model(Settings.model_validate({"model_path": model}))
    # Without an estimator a custom model is served, and its answers say quality: null.
    estimator_path(model).unlink()
    with serving(create_app(Settings.model_validate({"model_path": model, "warmup_runs": 1}))) as plain:
        assert segment(plain, clear_lesion(), outputs="").json()["quality"] is None


def test_predict_writes_each_photos_quality(tmp_path: Path) -> None:
    from tests.test_inference import predict_args
    from training.predict import predict_cli

    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "lesion.png").write_bytes(clear_lesion())
    (photos / "blank.png").write_bytes(blank_photo())

    def qualities(**options: Any) -> dict[str, Any]:
        out = tmp_path / f"out{len(options)}"
        assert predict_cli(predict_args([photos], out, DEFAULT_MODEL_PATH, **options)) == 0
        summary = json.loads((out / "predictions.json").read_text())
        return {Path(entry["file"]).stem: entry["quality"] for entry in summary["images"]}

    default = qualities()
    assert default["lesion"]["review_recommended"] is False
    assert default["blank"] == {
        "estimated_jaccard": 0.0,
        "review_recommended": True,
        "reasons": ["no_lesion_found"],
    }
    strict = qualities(review_below=0.999)
    assert strict["lesion"]["review_recommended"] is True
    assert strict["lesion"]["estimated_jaccard"] == default["lesion"]["estimated_jaccard"]
