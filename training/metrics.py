"""Segmentation metrics, all computed from one pixel count: `confusion_counts`.

numpy only (no Keras), so evaluation of ONNX models and the service can import it.

Conventions for empty denominators (each metric is a ratio whose denominator can be 0 on a real image):

* dice and jaccard: no lesion in the truth and none predicted (TP + FP + FN = 0) → 1, a perfect answer.
  No lesion in the truth but some predicted → 0 (TP = 0, FP > 0: the ratio is defined and is 0).
* sensitivity (recall, TP / (TP + FN)): no lesion in the truth (TP + FN = 0) → 1, nothing to find and
  nothing missed. False positives on such an image show in dice, jaccard and specificity instead.
* specificity (TN / (TN + FP)): the whole image is lesion (TN + FP = 0) → 1, by the same reasoning.
* accuracy ((TP + TN) / N) is defined for any non-empty image; zero pixels is an error.
"""

from __future__ import annotations

from typing import Any

import numpy as np

METRIC_NAMES = ("accuracy", "dice", "jaccard", "sensitivity", "specificity")

# ISIC 2018 Task 1 score: a per-image Jaccard below this counts as 0.
ISIC_JACCARD_CUTOFF = 0.65


def _as_mask(array: Any, what: str) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype == bool:
        return array
    # Integer 0/1 masks are accepted; anything else (a probability map, 0/255 masks) must be thresholded
    # by the caller, since casting it to bool would silently treat every non-zero value as lesion.
    if np.issubdtype(array.dtype, np.integer) and np.isin(array, (0, 1)).all():
        return array.astype(bool)
    raise TypeError(f"{what} must be a boolean mask (or integers 0/1), not {array.dtype} values")


def confusion_counts(prediction: Any, truth: Any) -> tuple[int, int, int, int]:
    """Pixel counts of a predicted mask against the expert's mask.

    Args:
        prediction: Boolean mask (True = lesion), any shape.
        truth: Boolean mask of the same shape.

    Returns:
        ``(tp, fp, fn, tn)`` as Python ints.

    Raises:
        ValueError: The shapes differ.
        TypeError: A mask is neither boolean nor integer 0/1.
    """
    prediction = _as_mask(prediction, "prediction")
    truth = _as_mask(truth, "truth")
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction shape {prediction.shape} differs from truth shape {truth.shape}")
    tp = int(np.count_nonzero(prediction & truth))
    fp = int(np.count_nonzero(prediction & ~truth))
    fn = int(np.count_nonzero(~prediction & truth))
    tn = int(truth.size) - tp - fp - fn
    return tp, fp, fn, tn


def _ratio(numerator: int, denominator: int) -> float:
    """``numerator / denominator``, and 1 when the denominator is 0 (see the module's conventions)."""
    return numerator / denominator if denominator else 1.0


def metrics_from_counts(tp: int, fp: int, fn: int, tn: int) -> dict[str, float]:
    """The five ISIC metrics of one set of counts.

    ``accuracy = (TP + TN) / N``, ``dice = 2TP / (2TP + FP + FN)``, ``jaccard = TP / (TP + FP + FN)``,
    ``sensitivity = TP / (TP + FN)``, ``specificity = TN / (TN + FP)``. An empty denominator gives 1 —
    see the module docstring: empty truth and empty prediction → dice = jaccard = sensitivity = 1; empty
    truth, non-empty prediction → dice = jaccard = 0, sensitivity = 1; an all-lesion truth → specificity
    = 1.

    Args:
        tp: True positive pixels.
        fp: False positive pixels.
        fn: False negative pixels.
        tn: True negative pixels.

    Returns:
        ``{"accuracy", "dice", "jaccard", "sensitivity", "specificity"}`` as floats.

    Raises:
        ValueError: A count is negative, or all are 0.
    """
    if min(tp, fp, fn, tn) < 0:
        raise ValueError(f"counts must be non-negative, not tp={tp}, fp={fp}, fn={fn}, tn={tn}")
    total = tp + fp + fn + tn
    if total == 0:
        raise ValueError("metrics of an image with no pixels are undefined")
    return {
        # The paper prints accuracy as (TP + FP) / N: a typo, the standard definition is (TP + TN) / N.
        "accuracy": (tp + tn) / total,
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "jaccard": _ratio(tp, tp + fp + fn),
        # Sensitivity is recall, TP / (TP + FN) — not precision, TP / (TP + FP) (segmentation_models #194).
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
    }


def thresholded_jaccard(jaccards: Any, cutoff: float = ISIC_JACCARD_CUTOFF) -> float:
    """The ISIC 2018 Task 1 score: mean per-image Jaccard, where an image below ``cutoff`` counts 0.

    Args:
        jaccards: Per-image Jaccard indices.
        cutoff: Images with ``jaccard < cutoff`` score 0 (an image exactly at the cut-off keeps its score).

    Returns:
        The mean over images.

    Raises:
        ValueError: No images.
    """
    values = np.asarray(jaccards, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("thresholded Jaccard of no images is undefined")
    return float(np.where(values < cutoff, 0.0, values).mean())


class MetricAccumulator:
    """Collects per-image counts and summarises them both ways.

    ``mean`` is the ISIC convention (metrics per image, then averaged: every image weighs the same);
    ``pooled`` sums the counts of all images first (every pixel weighs the same, so large lesions
    dominate). Both are reported because they can differ a lot.
    """

    def __init__(self) -> None:
        # A list, not a dict by id: datasets share ids (ISIC 2016 and 2017 hold the same images), and
        # each added image counts once, as added.
        self._images: list[tuple[str, tuple[int, int, int, int]]] = []

    def __len__(self) -> int:
        return len(self._images)

    def add(self, image_id: str, prediction: Any, truth: Any) -> dict[str, float]:
        """Counts one image.

        Args:
            image_id: Name of the image in the summary. Not checked for uniqueness, since datasets share
                ids; pass ``"dataset/id"`` where the summary must tell them apart.
            prediction: Boolean predicted mask.
            truth: Boolean expert mask of the same shape.

        Returns:
            This image's five metrics.

        Raises:
            ValueError: Mismatched shapes.
        """
        counts = confusion_counts(prediction, truth)
        self._images.append((str(image_id), counts))
        return metrics_from_counts(*counts)

    def summary(self) -> dict[str, Any]:
        """All images so far: JSON-ready plain Python values.

        Returns:
            ``{"n_images", "mean", "pooled", "thresholded_jaccard", "per_image"}``; ``mean`` and
            ``pooled`` map each of `METRIC_NAMES` to a float; ``per_image`` is a list of
            ``{"id", <the five metrics>, "tp", "fp", "fn", "tn"}`` in the order the images were added.

        Raises:
            ValueError: No image was added.
        """
        if not self._images:
            raise ValueError("no images were added")
        per_image = []
        for image_id, (tp, fp, fn, tn) in self._images:
            pixel_counts = {"tp": tp, "fp": fp, "fn": fn, "tn": tn}
            per_image.append({"id": image_id, **metrics_from_counts(tp, fp, fn, tn), **pixel_counts})
        pooled_counts = (sum(counts[index] for _, counts in self._images) for index in range(4))
        return {
            "n_images": len(per_image),
            "mean": {name: float(np.mean([image[name] for image in per_image])) for name in METRIC_NAMES},
            "pooled": metrics_from_counts(*pooled_counts),
            "thresholded_jaccard": thresholded_jaccard([image["jaccard"] for image in per_image]),
            "per_image": per_image,
        }


def paired_difference(
    base: dict[str, Any], other: dict[str, Any], metric: str = "dice"
) -> tuple[float, float, int, int]:
    """Mean per-image difference ``other − base``, its 95 % half-width, and how many got worse / better.

    ``base`` and ``other`` are evaluations (``{"per_image": [{"id", metric …}, …]}``) of the same images;
    only ids in both count. Here rather than in the report so that the benchmark, which must not load
    TensorFlow, pairs its own evaluations with the same formula.
    """
    before = {row["id"]: row[metric] for row in base["per_image"]}
    after = {row["id"]: row[metric] for row in other["per_image"]}
    differences = [after[key] - before[key] for key in before if key in after]
    count = len(differences)
    mean = sum(differences) / count
    spread = (sum((d - mean) ** 2 for d in differences) / (count - 1)) ** 0.5 if count > 1 else 0.0
    worse = sum(d < 0 for d in differences)
    better = sum(d > 0 for d in differences)
    return mean, 1.96 * spread / count**0.5, worse, better
