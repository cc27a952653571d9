"""Outline quality: features of the network's probability map, and an estimated Jaccard with a review flag.

The network says how sure it is, pixel by pixel. A few numbers drawn from its probability map at its own
resolution (192 × 192 for 1.0.0) predict how well the thresholded mask will match an expert's outline:
how much of the map is undecided, how sure the mask is inside, whether the lesion runs off the frame. A
tiny model fitted on photos the network never trained on (``dermaseg calibrate-quality``) maps them to an
estimated Jaccard in [0, 1]; answers below a threshold are flagged for review, with short reasons.

Only numpy and scipy: the service needs neither scikit-learn nor TensorFlow for this. The fitted
parameters live in a small JSON file beside the model (``models/dermaseg.quality.json``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

#: Format tag of the estimator file; a file of another format is refused.
FORMAT = "dermaseg.quality/1"
#: A pixel is "undecided" when its probability lies strictly between these.
UNCERTAIN_LOW, UNCERTAIN_HIGH = 0.2, 0.8
#: Below this estimated Jaccard an answer is flagged when the file names no threshold of its own.
DEFAULT_REVIEW_BELOW = 0.65

#: Reasons (stable, machine-readable) given with a flagged answer.
NO_LESION_FOUND = "no_lesion_found"
LESION_TOUCHES_BORDER = "lesion_touches_border"
LOW_CONFIDENCE = "low_confidence"
FRAGMENTED = "fragmented_outline"
LOW_ESTIMATED_JACCARD = "low_estimated_jaccard"
REASONS = (NO_LESION_FOUND, LESION_TOUCHES_BORDER, LOW_CONFIDENCE, FRAGMENTED, LOW_ESTIMATED_JACCARD)

#: Transforms applied to a feature before it is standardized.
TRANSFORMS = ("identity", "log", "logit")
_EPSILON = 1e-4
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


class QualityFileError(ValueError):
    """An estimator file that is unreadable, of another format, or calibrated for another model."""


@dataclass(frozen=True)
class QualityFeatures:
    """What the probability map says about its own mask, all at the network's resolution.

    Attributes:
        area_fraction: share of the frame in the mask.
        mean_confidence: mean probability inside the mask (0 when the mask is empty).
        uncertain_fraction: share of the frame whose probability is between 0.2 and 0.8.
        uncertain_ratio: undecided pixels per pixel of the mask's outline (how wide the fuzzy rim is).
        expected_jaccard: the Jaccard the mask would score if the truth were drawn pixel by pixel from the
            probabilities: ``Σ_mask p / (|mask| + Σ_outside p)``.
        border_fraction: share of the frame's edge pixels that the mask covers.
        compactness: ``4π·area / perimeter²`` of the mask (about 1 for a disc, smaller for ragged outlines);
            the perimeter is π/4 of the outline's pixel edges, which is exact on average over orientations.
        components: number of 8-connected regions of the mask.
        largest_share: share of the mask in its largest region (1 when it is one piece).
        flip_agreement: Jaccard between this mask and the mask of the horizontally mirrored pass, when the
            caller ran one (it doubles the inference, so the default estimator does not use it).
    """

    area_fraction: float
    mean_confidence: float
    uncertain_fraction: float
    uncertain_ratio: float
    expected_jaccard: float
    border_fraction: float
    compactness: float
    components: int
    largest_share: float
    flip_agreement: float | None = None

    @property
    def found(self) -> bool:
        return self.area_fraction > 0.0

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)

    def value(self, name: str) -> float:
        """A feature by name, as a float (``flip_agreement`` must have been computed)."""
        raw = getattr(self, name, None)
        if raw is None or not isinstance(raw, int | float):
            raise KeyError(f"feature {name!r} is not available")
        return float(raw)


def _as_map(probability: np.ndarray) -> np.ndarray:
    array = np.asarray(probability, dtype=np.float32)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2 or array.size == 0:
        raise ValueError(f"expected an (h, w) probability map, got shape {array.shape}")
    return array


def _outline_length(mask: np.ndarray) -> int:
    """Edges between mask and background pixels (4-neighbours), the frame counting as background."""
    inner = np.count_nonzero(mask[1:] != mask[:-1]) + np.count_nonzero(mask[:, 1:] != mask[:, :-1])
    frame = np.count_nonzero(mask[0]) + np.count_nonzero(mask[-1]) + np.count_nonzero(mask[:, 0])
    return int(inner + frame + np.count_nonzero(mask[:, -1]))


def _border_fraction(mask: np.ndarray) -> float:
    edge = np.concatenate([mask[0, :], mask[-1, :], mask[1:-1, 0], mask[1:-1, -1]])
    return float(edge.mean()) if edge.size else 0.0


def _jaccard(first: np.ndarray, second: np.ndarray) -> float:
    union = int(np.logical_or(first, second).sum())
    return 1.0 if union == 0 else int(np.logical_and(first, second).sum()) / union


def quality_features(
    probability: np.ndarray, threshold: float = 0.5, *, flipped_probability: np.ndarray | None = None
) -> QualityFeatures:
    """Computes the quality features of one probability map at the network's resolution.

    Args:
        probability: ``(h, w)`` or ``(h, w, 1)`` lesion probabilities as the network gave them (not resized
            to the photo: the features are then the same whatever the photo's size, and cheap).
        threshold: the mask is ``probability >= threshold``, as in :func:`service.inference.postprocess`.
        flipped_probability: optionally, the probabilities of the horizontally mirrored input, already
            mirrored back; gives ``flip_agreement``.

    Raises:
        ValueError: the map is not two-dimensional or its flipped twin has another shape.
    """
    p = _as_map(probability)
    mask = p >= threshold
    area = int(mask.sum())
    inside = float(p.sum(where=mask, dtype=np.float64))
    outside = float(p.sum(dtype=np.float64)) - inside
    uncertain = int(np.count_nonzero((p > UNCERTAIN_LOW) & (p < UNCERTAIN_HIGH)))
    outline = _outline_length(mask)
    if area:
        labels, components = ndimage.label(mask, structure=_EIGHT_CONNECTED)
        largest_share = float(np.bincount(labels[mask]).max()) / area
    else:
        components, largest_share = 0, 0.0
    flip_agreement = None
    if flipped_probability is not None:
        flipped = _as_map(flipped_probability)
        if flipped.shape != p.shape:
            raise ValueError(f"flipped map {flipped.shape} differs from the map {p.shape}")
        flip_agreement = _jaccard(mask, flipped >= threshold)
    return QualityFeatures(
        area_fraction=area / p.size,
        mean_confidence=inside / area if area else 0.0,
        uncertain_fraction=uncertain / p.size,
        uncertain_ratio=uncertain / outline if outline else 0.0,
        expected_jaccard=inside / (area + outside) if area else 0.0,
        border_fraction=_border_fraction(mask),
        compactness=min(1.0, 4.0 * math.pi * area / (math.pi / 4 * outline) ** 2) if outline else 0.0,
        components=int(components),
        largest_share=largest_share,
        flip_agreement=flip_agreement,
    )


def transform(name: str, value: float) -> float:
    """A feature's value on the scale the estimator is linear in."""
    if name == "identity":
        return value
    if name == "log":
        return math.log(max(value, 0.0) + _EPSILON)
    if name == "logit":
        clipped = min(max(value, _EPSILON), 1.0 - _EPSILON)
        return math.log(clipped / (1.0 - clipped))
    raise ValueError(f"unknown transform {name!r} (known: {', '.join(TRANSFORMS)})")


@dataclass(frozen=True)
class FeatureTerm:
    """One term of the estimator: ``weight · (transform(feature) − mean) / scale``."""

    name: str
    transform: str
    mean: float
    scale: float
    weight: float

    def __post_init__(self) -> None:
        if self.name not in QualityFeatures.__dataclass_fields__:
            raise QualityFileError(f"unknown feature {self.name!r}")
        if self.transform not in TRANSFORMS:
            raise QualityFileError(f"unknown transform {self.transform!r} for {self.name}")
        if not all(math.isfinite(v) for v in (self.mean, self.scale, self.weight)) or self.scale <= 0:
            raise QualityFileError(f"term {self.name}: mean, scale and weight must be finite, scale > 0")

    def standardized(self, features: QualityFeatures) -> float:
        return (transform(self.transform, features.value(self.name)) - self.mean) / self.scale


@dataclass(frozen=True)
class ReasonLimits:
    """When a flagged answer names a specific reason (beyond a low estimate).

    Attributes:
        border_fraction: ``lesion_touches_border`` when the mask covers more than this share of the frame's
            edge.
        mean_confidence: ``low_confidence`` when the mean probability inside the mask is below this (how
            soft a network's maps are is its own: calibration sets it to a low quantile of unseen photos).
        largest_share: ``fragmented_outline`` when the largest region holds less than this share of the mask.
    """

    border_fraction: float = 0.1
    mean_confidence: float = 0.8
    largest_share: float = 0.9


@dataclass(frozen=True)
class QualityAssessment:
    """The answer's ``quality`` object."""

    estimated_jaccard: float
    review_recommended: bool
    reasons: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "estimated_jaccard": self.estimated_jaccard,
            "review_recommended": self.review_recommended,
            "reasons": list(self.reasons),
        }


@dataclass(frozen=True)
class QualityEstimator:
    """Maps quality features to an estimated Jaccard: ``sigmoid(intercept + Σ terms)``, 0 with no lesion.

    Attributes:
        terms: the linear terms on standardized, transformed features.
        intercept: the logit of the estimate for an average photo.
        review_below: default threshold; answers whose estimate is below it are flagged for review.
        reason_limits: when a flagged answer names a specific reason.
        model_sha256: the network the estimator was calibrated on (empty: not said).
        calibration: how it was fitted and how well it did (free-form, for the card and ``/v1/model``).
    """

    terms: tuple[FeatureTerm, ...]
    intercept: float
    review_below: float = DEFAULT_REVIEW_BELOW
    reason_limits: ReasonLimits = field(default_factory=ReasonLimits)
    model_sha256: str = ""
    calibration: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not math.isfinite(self.intercept):
            raise QualityFileError("intercept must be finite")
        if not 0.0 <= self.review_below <= 1.0:
            raise QualityFileError(f"review_below must be in [0, 1], not {self.review_below}")

    @property
    def needs_flip(self) -> bool:
        """Whether the estimator reads ``flip_agreement`` (a second, mirrored inference per photo)."""
        return any(term.name == "flip_agreement" for term in self.terms)

    def estimate(self, features: QualityFeatures) -> float:
        """The estimated Jaccard in [0, 1]; 0 when no lesion was found (the expert drew one)."""
        if not features.found:
            return 0.0
        logit = self.intercept + sum(term.weight * term.standardized(features) for term in self.terms)
        logit = min(max(logit, -40.0), 40.0)
        return 1.0 / (1.0 + math.exp(-logit))

    def reasons(self, features: QualityFeatures) -> tuple[str, ...]:
        """Short codes for what looks wrong with the mask, in the order of :data:`REASONS`."""
        if not features.found:
            return (NO_LESION_FOUND,)
        limits = self.reason_limits
        found = []
        if features.border_fraction > limits.border_fraction:
            found.append(LESION_TOUCHES_BORDER)
        if features.mean_confidence < limits.mean_confidence:
            found.append(LOW_CONFIDENCE)
        if features.largest_share < limits.largest_share:
            found.append(FRAGMENTED)
        return tuple(found)

    def assess(self, features: QualityFeatures, review_below: float | None = None) -> QualityAssessment:
        """Estimate, flag and reasons for one mask.

        Reasons are given with flagged answers only (an unflagged answer has none); a flagged answer whose
        features trip no specific limit gets ``low_estimated_jaccard``.

        Args:
            features: from :func:`quality_features`.
            review_below: the threshold (``DERMASEG_REVIEW_BELOW``); default: the file's own.
        """
        threshold = self.review_below if review_below is None else review_below
        estimate = self.estimate(features)
        flagged = estimate < threshold
        reasons: tuple[str, ...] = ()
        if flagged:
            reasons = self.reasons(features) or (LOW_ESTIMATED_JACCARD,)
        return QualityAssessment(round(estimate, 4), flagged, reasons)

    def assess_map(
        self,
        probability: np.ndarray,
        threshold: float,
        review_below: float | None = None,
        *,
        flipped_probability: np.ndarray | None = None,
    ) -> QualityAssessment:
        """:meth:`assess` straight from the network's ``(h, w[, 1])`` probability map (what a request calls).

        Raises:
            ValueError: the estimator reads ``flip_agreement`` and no mirrored map was given.
        """
        if self.needs_flip and flipped_probability is None:
            raise ValueError("this estimator needs the mirrored pass's probabilities (flip_agreement)")
        features = quality_features(probability, threshold, flipped_probability=flipped_probability)
        return self.assess(features, review_below)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "model_sha256": self.model_sha256,
            "estimate": "sigmoid(intercept + sum(weight * (transform(feature) - mean) / scale)); 0: no mask",
            "intercept": self.intercept,
            "terms": [asdict(term) for term in self.terms],
            "review_below": self.review_below,
            "reason_limits": asdict(self.reason_limits),
            "calibration": dict(self.calibration),
        }

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> QualityEstimator:
        """Builds an estimator from :meth:`to_json`'s document.

        Raises:
            QualityFileError: another format, or missing or invalid fields.
        """
        if document.get("format") != FORMAT:
            raise QualityFileError(f"not a {FORMAT} document (format: {document.get('format')!r})")
        try:
            terms = tuple(FeatureTerm(**term) for term in document["terms"])
            limits = ReasonLimits(**document.get("reason_limits", {}))
            return cls(
                terms=terms,
                intercept=float(document["intercept"]),
                review_below=float(document.get("review_below", DEFAULT_REVIEW_BELOW)),
                reason_limits=limits,
                model_sha256=str(document.get("model_sha256", "")),
                calibration=dict(document.get("calibration", {})),
            )
        except (KeyError, TypeError, ValueError) as error:
            if isinstance(error, QualityFileError):
                raise
            raise QualityFileError(f"invalid quality estimator: {error!r}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path, model_sha256: str | None = None) -> QualityEstimator:
        """Reads an estimator file; with ``model_sha256``, refuses one calibrated on another network.

        Raises:
            QualityFileError: unreadable, invalid, or made for another model.
        """
        path = Path(path)
        try:
            document = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise QualityFileError(f"{path}: not a readable quality estimator ({error})") from None
        if not isinstance(document, dict):
            raise QualityFileError(f"{path}: not a JSON object")
        estimator = cls.from_json(document)
        if model_sha256 is not None and estimator.model_sha256 not in ("", model_sha256):
            raise QualityFileError(
                f"{path} was calibrated on the model with sha256 {estimator.model_sha256[:12]}…, "
                f"not on this one ({model_sha256[:12]}…): recalibrate with `dermaseg calibrate-quality`"
            )
        return estimator


def load_estimator(
    model_path: str | Path, model_sha256: str, path: str | Path | None = None
) -> QualityEstimator | None:
    """The estimator a served model uses: ``path``, or the file beside the model; None when there is none.

    Raises:
        QualityFileError: the file is unreadable, invalid, calibrated on another network, or needs a
            second (mirrored) inference per photo, which the service does not pay for.
    """
    chosen = Path(path) if path is not None else estimator_path(model_path)
    if path is None and not chosen.exists():
        return None
    estimator = QualityEstimator.load(chosen, model_sha256=model_sha256)
    if estimator.needs_flip:
        raise QualityFileError(f"{chosen} needs a mirrored second inference per photo (flip_agreement)")
    return estimator


def estimator_path(model_path: str | Path) -> Path:
    """Where a model's estimator lives: ``models/dermaseg.onnx`` → ``models/dermaseg.quality.json``."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.stem + ".quality.json")


def feature_matrix(rows: Sequence[QualityFeatures], names: Sequence[str]) -> np.ndarray:
    """``(len(rows), len(names))`` float64 matrix of the named features (for fitting and evaluation)."""
    return np.array([[row.value(name) for name in names] for row in rows], dtype=np.float64).reshape(
        len(rows), len(names)
    )
