"""Every metric against counts written out by hand on 3×3 masks."""

import json

import numpy as np
import pytest

from training.metrics import (
    METRIC_NAMES,
    MetricAccumulator,
    confusion_counts,
    metrics_from_counts,
    thresholded_jaccard,
)


def mask(*rows: str) -> np.ndarray:
    """A boolean mask drawn as strings: ``mask("110", "100", "000")``."""
    return np.array([[character == "1" for character in row] for row in rows])


# truth      prediction
# 1 1 0      1 0 0
# 1 0 0      1 1 0
# 0 0 0      0 0 0
# tp: (0,0) (1,0) = 2; fp: (1,1) = 1; fn: (0,1) = 1; tn: the other 5.
TRUTH = mask("110", "100", "000")
PREDICTION = mask("100", "110", "000")


def test_confusion_counts_by_hand():
    assert confusion_counts(PREDICTION, TRUTH) == (2, 1, 1, 5)
    # Swapping the roles swaps false positives and false negatives.
    assert confusion_counts(TRUTH, PREDICTION) == (2, 1, 1, 5)
    assert confusion_counts(mask("111", "000", "000"), TRUTH) == (2, 1, 1, 5)
    assert confusion_counts(mask("000", "000", "001"), TRUTH) == (0, 1, 3, 5)


def test_confusion_counts_returns_python_ints():
    assert all(type(count) is int for count in confusion_counts(PREDICTION, TRUTH))


def test_confusion_counts_accepts_integer_zero_one_masks():
    assert confusion_counts(PREDICTION.astype(np.uint8), TRUTH.astype(np.int64)) == (2, 1, 1, 5)


@pytest.mark.parametrize(
    "prediction",
    [PREDICTION.astype(np.float32) * 0.7, PREDICTION.astype(np.uint8) * 255],
    ids=["probabilities", "0-255"],
)
def test_confusion_counts_rejects_unthresholded_masks(prediction):
    with pytest.raises(TypeError, match="boolean mask"):
        confusion_counts(prediction, TRUTH)


def test_confusion_counts_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        confusion_counts(PREDICTION, TRUTH[:2])


def test_metrics_by_hand():
    metrics = metrics_from_counts(2, 1, 1, 5)
    assert set(metrics) == set(METRIC_NAMES)
    assert metrics["accuracy"] == pytest.approx(7 / 9)  # (2 + 5) / 9
    assert metrics["dice"] == pytest.approx(4 / 6)  # 2·2 / (2·2 + 1 + 1)
    assert metrics["jaccard"] == pytest.approx(2 / 4)  # 2 / (2 + 1 + 1)
    assert metrics["sensitivity"] == pytest.approx(2 / 3)  # 2 / (2 + 1)
    assert metrics["specificity"] == pytest.approx(5 / 6)  # 5 / (5 + 1)


def test_accuracy_counts_true_negatives_not_false_positives():
    # tp=1, fp=3, fn=0, tn=5: (TP + TN) / N = 6/9; the paper's misprint (TP + FP) / N would give 4/9.
    assert metrics_from_counts(1, 3, 0, 5)["accuracy"] == pytest.approx(6 / 9)


def test_sensitivity_is_recall_not_precision():
    # segmentation_models #194 computed precision where recall was meant; on these masks they differ.
    # Under-segmentation: truth 4 pixels, prediction 1 of them → tp=1, fp=0, fn=3, tn=5.
    truth = mask("111", "100", "000")
    under = mask("100", "000", "000")
    assert confusion_counts(under, truth) == (1, 0, 3, 5)
    metrics = metrics_from_counts(1, 0, 3, 5)
    assert metrics["sensitivity"] == pytest.approx(1 / 4)  # precision would be 1/1
    assert metrics["specificity"] == pytest.approx(5 / 5)
    assert metrics["dice"] == pytest.approx(2 / 5)
    assert metrics["jaccard"] == pytest.approx(1 / 4)
    # Over-segmentation: the roles swap → tp=1, fp=3, fn=0, tn=5.
    assert confusion_counts(truth, under) == (1, 3, 0, 5)
    metrics = metrics_from_counts(1, 3, 0, 5)
    assert metrics["sensitivity"] == pytest.approx(1.0)  # precision would be 1/4
    assert metrics["specificity"] == pytest.approx(5 / 8)


def test_empty_truth_and_empty_prediction_is_perfect():
    counts = confusion_counts(mask("000", "000", "000"), mask("000", "000", "000"))
    assert counts == (0, 0, 0, 9)
    assert metrics_from_counts(*counts) == {
        "accuracy": 1.0,
        "dice": 1.0,
        "jaccard": 1.0,
        "sensitivity": 1.0,
        "specificity": 1.0,
    }


def test_empty_truth_with_false_positives():
    counts = confusion_counts(mask("110", "000", "000"), mask("000", "000", "000"))
    assert counts == (0, 2, 0, 7)
    metrics = metrics_from_counts(*counts)
    assert metrics["dice"] == 0.0
    assert metrics["jaccard"] == 0.0
    assert metrics["sensitivity"] == 1.0  # nothing to find, nothing missed
    assert metrics["specificity"] == pytest.approx(7 / 9)
    assert metrics["accuracy"] == pytest.approx(7 / 9)


def test_empty_prediction_with_a_lesion():
    counts = confusion_counts(mask("000", "000", "000"), TRUTH)
    assert counts == (0, 0, 3, 6)
    metrics = metrics_from_counts(*counts)
    assert metrics["dice"] == 0.0
    assert metrics["jaccard"] == 0.0
    assert metrics["sensitivity"] == 0.0
    assert metrics["specificity"] == 1.0  # 6 / 6
    assert metrics["accuracy"] == pytest.approx(6 / 9)


def test_all_lesion_image_has_specificity_one():
    counts = confusion_counts(mask("111", "111", "000"), mask("111", "111", "111"))
    assert counts == (6, 0, 3, 0)
    metrics = metrics_from_counts(*counts)
    assert metrics["specificity"] == 1.0  # TN + FP = 0
    assert metrics["sensitivity"] == pytest.approx(6 / 9)
    assert metrics["dice"] == pytest.approx(12 / 15)
    assert metrics["jaccard"] == pytest.approx(6 / 9)
    assert metrics["accuracy"] == pytest.approx(6 / 9)


@pytest.mark.parametrize("counts", [(0, 0, 0, 0), (1, -1, 0, 0)])
def test_metrics_from_counts_rejects_impossible_counts(counts):
    with pytest.raises(ValueError):
        metrics_from_counts(*counts)


def test_thresholded_jaccard_cutoff():
    # 0.64 → 0, 0.65 stays (not below the cut-off), 0.9 stays, 0.0 → 0: (0.65 + 0.9) / 4.
    assert thresholded_jaccard([0.64, 0.65, 0.9, 0.0]) == pytest.approx(1.55 / 4)
    assert thresholded_jaccard([0.64, 0.65, 0.9, 0.0], cutoff=0.5) == pytest.approx((0.64 + 0.65 + 0.9) / 4)
    assert thresholded_jaccard([0.5]) == 0.0
    with pytest.raises(ValueError):
        thresholded_jaccard([])


def test_accumulator_mean_and_pooled_differ():
    accumulator = MetricAccumulator()
    accumulator.add("small", PREDICTION, TRUTH)  # tp=2, fp=1, fn=1, tn=5: jaccard 1/2
    accumulator.add("large", mask("111", "111", "111"), mask("111", "111", "111"))  # tp=9: jaccard 1
    summary = accumulator.summary()

    assert summary["n_images"] == 2 == len(accumulator)
    # Per image, then averaged (ISIC): jaccard (1/2 + 1) / 2; dice (4/6 + 1) / 2.
    assert summary["mean"]["jaccard"] == pytest.approx(0.75)
    assert summary["mean"]["dice"] == pytest.approx((4 / 6 + 1) / 2)
    assert summary["mean"]["specificity"] == pytest.approx((5 / 6 + 1) / 2)
    # Pooled counts tp=11, fp=1, fn=1, tn=5: jaccard 11/13, dice 22/24.
    assert summary["pooled"]["jaccard"] == pytest.approx(11 / 13)
    assert summary["pooled"]["dice"] == pytest.approx(22 / 24)
    assert summary["pooled"]["specificity"] == pytest.approx(5 / 6)
    assert summary["pooled"]["accuracy"] == pytest.approx(16 / 18)
    # Jaccard 1/2 is below 0.65 and counts 0: (0 + 1) / 2.
    assert summary["thresholded_jaccard"] == pytest.approx(0.5)

    first = summary["per_image"][0]
    assert first["id"] == "small"
    assert (first["tp"], first["fp"], first["fn"], first["tn"]) == (2, 1, 1, 5)
    assert first["sensitivity"] == pytest.approx(2 / 3)
    assert [image["id"] for image in summary["per_image"]] == ["small", "large"]
    json.dumps(summary)  # plain Python values only


def test_accumulator_add_returns_the_image_metrics():
    assert MetricAccumulator().add("a", PREDICTION, TRUTH)["jaccard"] == pytest.approx(0.5)


def test_accumulator_rejects_bad_input_and_empty_summaries():
    accumulator = MetricAccumulator()
    with pytest.raises(ValueError, match="no images"):
        accumulator.summary()
    with pytest.raises(ValueError, match="shape"):
        accumulator.add("b", PREDICTION, TRUTH[:2])
    assert len(accumulator) == 0


def test_accumulator_keeps_images_that_share_an_id():
    # ISIC 2016 and 2017 share image ids; each added image counts, in the order added.
    accumulator = MetricAccumulator()
    accumulator.add("ISIC_0000000", PREDICTION, TRUTH)  # jaccard 1/2
    accumulator.add("ISIC_0000000", TRUTH, TRUTH)  # jaccard 1
    summary = accumulator.summary()
    assert summary["n_images"] == 2
    assert [image["jaccard"] for image in summary["per_image"]] == pytest.approx([0.5, 1.0])
    assert summary["mean"]["jaccard"] == pytest.approx(0.75)
