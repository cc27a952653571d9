"""Outline quality: features of hand-made probability maps, the estimator file, the calibration command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.inference import sha256_file
from service.quality import (
    FORMAT,
    LESION_TOUCHES_BORDER,
    LOW_ESTIMATED_JACCARD,
    NO_LESION_FOUND,
    FeatureTerm,
    QualityEstimator,
    QualityFileError,
    estimator_path,
    quality_features,
)
from tests.conftest import make_dataset
from tests.onnx_models import write_darkness_model
from training.cli import main as cli_main
from training.data import Sample
from training.quality import (
    QualityRow,
    auroc,
    calibrate,
    choose_photos,
    read_rows,
    split_by_group,
    unseen_photos,
    write_rows,
)

SHIPPED_MODEL = Path(__file__).resolve().parents[1] / "models" / "dermaseg.onnx"
SHIPPED_ESTIMATOR = estimator_path(SHIPPED_MODEL)
SIZE = 192


def disc_map(center: tuple[float, float] = (96, 96), radius: float = 40, edge_px: float = 0.7) -> np.ndarray:
    """A confident disc: probability ~1 inside, ~0 outside, a sharp sigmoid rim ``edge_px`` wide."""
    rows, columns = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    distance = np.hypot(rows - center[0], columns - center[1])
    return (1.0 / (1.0 + np.exp((distance - radius) / edge_px))).astype(np.float32)


def fuzzy_map(seed: int = 0) -> np.ndarray:
    """An undecided map: a faint blob whose probabilities hover around 0.5 with noise."""
    generator = np.random.default_rng(seed)
    blob = 0.35 + 0.3 * disc_map(radius=60, edge_px=20)
    return np.clip(blob + generator.normal(0, 0.08, blob.shape), 0, 1).astype(np.float32)


@pytest.fixture(scope="module")
def shipped() -> QualityEstimator:
    if not SHIPPED_ESTIMATOR.is_file():
        pytest.skip(f"no shipped estimator at {SHIPPED_ESTIMATOR}")
    return QualityEstimator.load(SHIPPED_ESTIMATOR)


def toy_estimator(review_below: float = 0.7) -> QualityEstimator:
    """Two terms by hand: the map's own expected Jaccard raises the estimate, border contact lowers it."""
    return QualityEstimator(
        terms=(
            FeatureTerm("expected_jaccard", "logit", mean=2.0, scale=1.0, weight=1.0),
            FeatureTerm("border_fraction", "identity", mean=0.0, scale=0.1, weight=-2.0),
        ),
        intercept=1.5,
        review_below=review_below,
    )


# --- features ----------------------------------------------------------------------------------------------


def test_features_of_a_clear_disc() -> None:
    features = quality_features(disc_map())
    assert features.area_fraction == pytest.approx(math.pi * 40**2 / SIZE**2, rel=0.03)
    assert features.mean_confidence > 0.95
    assert features.expected_jaccard > 0.95
    assert features.border_fraction == 0.0
    assert features.components == 1 and features.largest_share == 1.0
    assert features.compactness == pytest.approx(1.0, abs=0.05)
    # The rim is a couple of pixels wide: about one undecided pixel per outline edge, far below a fuzzy map.
    assert features.uncertain_ratio < 1.5
    assert features.flip_agreement is None


def test_features_of_fuzzy_blank_and_flat_maps() -> None:
    fuzzy = quality_features(fuzzy_map())
    assert fuzzy.expected_jaccard < 0.6 and fuzzy.uncertain_fraction > 0.9
    assert fuzzy.components > 1 and fuzzy.largest_share < 0.9 and fuzzy.compactness < 0.1
    blank = quality_features(np.full((SIZE, SIZE), 0.01, dtype=np.float32))
    assert not blank.found and blank.components == 0 and blank.expected_jaccard == 0.0
    flat = quality_features(np.full((SIZE, SIZE, 1), 0.5, dtype=np.float32))
    assert flat.area_fraction == 1.0 and flat.border_fraction == 1.0
    assert flat.expected_jaccard == pytest.approx(0.5) and flat.uncertain_fraction == 1.0


def test_border_fraction_and_fragments_by_hand() -> None:
    probability = np.zeros((10, 10), dtype=np.float32)
    probability[0:3, 0:5] = 0.9  # touches the top edge over 5 pixels and the left edge over 3
    probability[6:8, 6:8] = 0.9
    features = quality_features(probability)
    assert features.border_fraction == pytest.approx((5 + 2) / 36)  # the corner pixel counts once
    assert features.components == 2
    assert features.largest_share == pytest.approx(15 / 19)
    assert features.mean_confidence == pytest.approx(0.9)


def test_flip_agreement_when_the_mirrored_pass_is_given() -> None:
    probability = disc_map(center=(96, 45))
    mirrored_back = disc_map(center=(96, 45))[:, ::-1]  # a network that disagrees with itself
    assert quality_features(probability, flipped_probability=probability).flip_agreement == 1.0
    assert quality_features(probability, flipped_probability=mirrored_back).flip_agreement == 0.0
    with pytest.raises(ValueError, match="differs"):
        quality_features(probability, flipped_probability=probability[:100])


def test_a_map_must_be_two_dimensional() -> None:
    with pytest.raises(ValueError, match="probability map"):
        quality_features(np.zeros((2, 8, 8, 1), dtype=np.float32))


# --- the estimator -----------------------------------------------------------------------------------------


def test_toy_estimator_moves_the_right_way_and_flags() -> None:
    estimator = toy_estimator()
    clear = estimator.assess(quality_features(disc_map()))
    touching = estimator.assess(quality_features(disc_map(center=(96, 10), radius=60)))
    assert clear.estimated_jaccard > 0.9 and not clear.review_recommended and clear.reasons == ()
    assert touching.estimated_jaccard < clear.estimated_jaccard
    assert touching.review_recommended and LESION_TOUCHES_BORDER in touching.reasons
    blank = estimator.assess(quality_features(np.zeros((SIZE, SIZE), dtype=np.float32)))
    assert blank.estimated_jaccard == 0.0 and blank.review_recommended and blank.reasons == (NO_LESION_FOUND,)


def test_the_threshold_setting_changes_the_flag() -> None:
    estimator = toy_estimator()
    features = quality_features(disc_map())
    estimate = estimator.estimate(features)
    assert not estimator.assess(features, review_below=estimate - 0.01).review_recommended
    flagged = estimator.assess(features, review_below=estimate + 0.01)
    assert flagged.review_recommended and flagged.reasons == (LOW_ESTIMATED_JACCARD,)


def test_estimates_are_bounded_and_deterministic() -> None:
    estimator = toy_estimator()
    generator = np.random.default_rng(3)
    for _ in range(20):
        probability = generator.random((48, 48)).astype(np.float32) ** generator.uniform(0.2, 5)
        first = estimator.assess(quality_features(probability))
        assert 0.0 <= first.estimated_jaccard <= 1.0
        assert estimator.assess(quality_features(probability.copy())) == first
    assert estimator.assess_map(disc_map()[..., None], 0.5) == estimator.assess(quality_features(disc_map()))
    extreme = QualityEstimator(terms=toy_estimator().terms, intercept=1e6)
    assert extreme.estimate(quality_features(disc_map())) == 1.0


def test_json_round_trip_and_refusals(tmp_path: Path) -> None:
    estimator = QualityEstimator(
        terms=toy_estimator().terms, intercept=0.3, review_below=0.61, model_sha256="ab" * 32
    )
    path = tmp_path / "m.quality.json"
    estimator.save(path)
    loaded = QualityEstimator.load(path, model_sha256="ab" * 32)
    assert loaded == estimator
    assert loaded.assess(quality_features(fuzzy_map())) == estimator.assess(quality_features(fuzzy_map()))
    with pytest.raises(QualityFileError, match="calibrated on the model"):
        QualityEstimator.load(path, model_sha256="cd" * 32)
    document = json.loads(path.read_text())
    for broken, message in (
        ({**document, "format": "other/1"}, "not a dermaseg.quality/1"),
        ({**document, "terms": [{**document["terms"][0], "name": "colour"}]}, "unknown feature"),
        ({**document, "terms": [{**document["terms"][0], "scale": 0}]}, "scale > 0"),
        ({**document, "review_below": 2}, "review_below"),
        ({key: value for key, value in document.items() if key != "intercept"}, "invalid"),
    ):
        path.write_text(json.dumps(broken))
        with pytest.raises(QualityFileError, match=message):
            QualityEstimator.load(path)
    path.write_text("[1, 2]")
    with pytest.raises(QualityFileError, match="JSON object"):
        QualityEstimator.load(path)
    assert estimator_path("models/dermaseg.onnx") == Path("models/dermaseg.quality.json")


def test_shipped_estimator_scores_easy_high_and_hard_low(shipped: QualityEstimator) -> None:
    assert shipped.to_json()["format"] == FORMAT and not shipped.needs_flip
    clear = shipped.assess(quality_features(disc_map()))
    assert clear.estimated_jaccard > 0.85 and not clear.review_recommended
    for hard in (fuzzy_map(), np.full((SIZE, SIZE), 0.5, dtype=np.float32), np.zeros((SIZE, SIZE))):
        verdict = shipped.assess(quality_features(hard))
        assert verdict.estimated_jaccard < shipped.review_below and verdict.review_recommended
        assert verdict.reasons


def test_shipped_estimator_was_calibrated_on_the_shipped_model(shipped: QualityEstimator) -> None:
    """A new release model needs a new calibration (`dermaseg calibrate-quality`, see docs/quality.md)."""
    QualityEstimator.load(SHIPPED_ESTIMATOR, model_sha256=sha256_file(SHIPPED_MODEL))
    test = shipped.calibration["test"]
    # Only photos the model never trained on count; for 2.0.0 that is its 1,222 validation photos.
    assert test["n_images"] >= 500 and test["failures"] >= 30, "too few unseen photos to judge the estimator"


# --- calibration -------------------------------------------------------------------------------------------


def row(dataset: str, group: str, jaccard: float, sample_id: str = "") -> QualityRow:
    return QualityRow(dataset, sample_id or group, group, quality_features(disc_map()), jaccard)


def test_auroc_by_hand() -> None:
    assert auroc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0
    # Pairs (positive, negative): 0.1<0.9, 0.1<0.2, 0.8<0.9 lost, 0.8>0.2 won: one of four.
    assert auroc([0.1, 0.8, 0.9, 0.2], [True, True, False, False]) == 0.25
    assert auroc([0.5, 0.5], [True, False]) == 0.5
    assert math.isnan(auroc([0.1, 0.2], [False, False]))


def test_split_keeps_each_lesion_on_one_side() -> None:
    rows = [row("ham", f"L{i // 3}", 0.8, f"P{i}") for i in range(60)] + [
        row("isic", f"I{i}", 0.5) for i in range(10)
    ]
    fit, test = split_by_group(rows, 0.5, seed=1)
    assert len(fit) + len(test) == 70
    assert not {(r.dataset, r.group) for r in fit} & {(r.dataset, r.group) for r in test}
    assert sum(r.dataset == "isic" for r in test) == 5 and sum(r.dataset == "ham" for r in test) == 30
    assert split_by_group(rows, 0.5, seed=1) == (fit, test)


def test_trained_photos_are_left_out_and_lesions_kept_whole(tmp_path: Path) -> None:
    def sample(dataset: str, sample_id: str) -> Sample:
        return Sample(sample_id, tmp_path / f"{sample_id}.jpg", tmp_path / f"{sample_id}.png", dataset)

    samples = [
        sample("isic", "A"),
        sample("isic", "B"),
        sample("ham", "H1"),
        sample("ham", "H2"),
        sample("ham", "H3"),
    ]
    card = {"training": {"data": {"datasets": ["isic"], "val_ids": ["isic/B"]}}}
    assert [s.id for s in unseen_photos(samples, card)] == ["B", "H1", "H2", "H3"]
    groups = {("ham", "H1"): "L1", ("ham", "H2"): "L1", ("ham", "H3"): "L2"}
    chosen = choose_photos(samples[2:], groups, max_per_source=1, seed=0)
    assert len(chosen) in (1, 2) and len({group for _, group in chosen}) == 1
    assert choose_photos(samples[2:], groups, max_per_source=1, seed=0) == chosen


def test_calibration_runs_end_to_end_on_a_synthetic_dataset(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "synthetic", "normalized", n=40, size=48, seed=5)
    # Every fourth photo gets an expert outline elsewhere in the frame: the model's mask then fails.
    for index in range(0, 40, 4):
        wrong = np.zeros((48, 48), dtype=np.uint8)
        wrong[:12, :12] = 255
        Image.fromarray(wrong).save(data / "masks" / f"SYN_{index:04d}.png")
    model = write_darkness_model(tmp_path / "tiny.onnx", input_size=(48, 48))
    out, report_path, rows_path = (
        tmp_path / "tiny.quality.json",
        tmp_path / "report.json",
        tmp_path / "rows.csv",
    )
    report = calibrate(
        model,
        [data],
        out=out,
        report_path=report_path,
        rows_path=rows_path,
        seed=2,
        flip=True,
        max_per_source=None,
    )
    assert report["data"]["fit_images"] + report["data"]["test_images"] == 40
    assert report["test"]["failures"] > 0 and report["fit"]["failures"] > 0
    assert 0.0 <= report["test"]["auroc_failures"] <= 1.0 and 0.0 <= report["review_below"] <= 1.0
    assert "test_with_flip" in report["flip_agreement"] and report["cost"]["features_ms"] > 0
    estimator = QualityEstimator.load(out, model_sha256=report["model_sha256"])
    assert estimator.review_below == report["review_below"]
    assert json.loads(report_path.read_text())["test"] == json.loads(json.dumps(report["test"]))
    rows = read_rows(rows_path)
    assert len(rows) == 40 and all(r.features.flip_agreement is not None for r in rows)

    # The command refits from the rows alone, without the network, to the same estimator.
    again = tmp_path / "again.quality.json"
    status = cli_main(
        [
            "calibrate-quality",
            "--model",
            str(model),
            "--from-rows",
            str(rows_path),
            "--out",
            str(again),
            "--report",
            str(tmp_path / "again.json"),
            "--seed",
            "2",
        ]
    )
    assert status == 0
    assert QualityEstimator.load(again).terms == estimator.terms


def test_rows_round_trip(tmp_path: Path) -> None:
    rows = [row("ham", "L1", 0.71), QualityRow("isic", "X", "X", quality_features(np.zeros((8, 8))), 0.0)]
    write_rows(tmp_path / "rows.csv", rows)
    assert read_rows(tmp_path / "rows.csv") == rows


def test_the_quality_page_is_the_calibration_report() -> None:
    """docs/quality.md is what `python -m training.quality_report` writes from the committed report."""
    from training.quality_report import render

    root = Path(__file__).resolve().parents[1]
    report = json.loads((root / "docs" / "quality-calibration.json").read_text())
    card = json.loads((root / "models" / "dermaseg.json").read_text())
    assert report["model_sha256"] == card["sha256"], "the report is of another model: make calibrate-quality"
    expected = render(report, card["version"])
    assert (root / "docs" / "quality.md").read_text() == expected, "rerun python -m training.quality_report"
