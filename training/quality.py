"""``dermaseg calibrate-quality``: fit the outline-quality estimator on photos the network never trained on.

Runs the shipped ONNX model through the service's own inference core, computes each photo's quality
features (:mod:`service.quality`, at the network's resolution) and its true Jaccard (at the photo's own
size, as ``dermaseg evaluate`` and the issue's external check score it), splits the photos by lesion into
a fit and a test part, fits the estimator and its review threshold on the fit part, and reports on the
test part: AUROC for failures (Jaccard < 0.65), Spearman correlation, mean absolute error, share flagged
and share of failures caught, overall and per source.

Photos the model's card lists as trained on are left out (only its validation photos of those datasets
are kept), so the estimator does not learn the training set's optimism.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from scipy import optimize, stats

from service.imaging import load_mask
from service.inference import OnnxModel, sha256_file
from service.pipeline import Pipeline
from service.quality import (
    FeatureTerm,
    QualityEstimator,
    QualityFeatures,
    ReasonLimits,
    feature_matrix,
    quality_features,
    transform,
)
from training.data import DataError, Sample, load_samples
from training.metrics import ISIC_JACCARD_CUTOFF, confusion_counts, metrics_from_counts
from training.split import trained_on

logger = logging.getLogger(__name__)

#: The default estimator's terms: (feature, transform). Chosen on the 1.0.0 calibration (see the report's
#: per-feature AUROCs): no term needs a second inference.
DEFAULT_TERMS: tuple[tuple[str, str], ...] = (
    ("expected_jaccard", "logit"),
    ("mean_confidence", "logit"),
    ("uncertain_ratio", "log"),
    ("border_fraction", "identity"),
    ("area_fraction", "log"),
    ("compactness", "identity"),
    ("largest_share", "identity"),
)
#: Features whose per-feature AUROC the report gives.
REPORTED_FEATURES = (
    "expected_jaccard",
    "mean_confidence",
    "uncertain_fraction",
    "uncertain_ratio",
    "border_fraction",
    "area_fraction",
    "compactness",
    "components",
    "largest_share",
)
#: Review thresholds the report's trade-off table lists.
TRADE_OFF = (0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85)
#: ``low_confidence`` is named when a mask's mean confidence is below this quantile of the fit photos'.
LOW_CONFIDENCE_QUANTILE = 0.25
#: Ridge penalty on the standardized weights (keeps the fit stable when features are correlated).
RIDGE = 1e-3
#: The manifest column that groups several photos of one lesion (HAM10000).
GROUP_COLUMN = "lesion_id"


@dataclass(frozen=True)
class QualityRow:
    """One calibration photo: its features and the Jaccard its mask really scored."""

    dataset: str
    id: str
    group: str
    features: QualityFeatures
    jaccard: float

    @property
    def failed(self) -> bool:
        return self.jaccard < ISIC_JACCARD_CUTOFF


# --- choosing photos ---------------------------------------------------------------------------------------


def read_groups(roots: Sequence[Path]) -> dict[tuple[str, str], str]:
    """``(dataset, id) → lesion`` from each normalized folder's manifest that has a ``lesion_id`` column."""
    groups: dict[tuple[str, str], str] = {}
    for root in roots:
        manifest = Path(root) / "manifest.csv"
        if not manifest.is_file():
            continue
        with manifest.open(newline="", encoding="utf-8-sig") as stream:
            for row in csv.DictReader(stream):
                if row.get(GROUP_COLUMN) and row.get("id"):
                    groups[(Path(root).resolve().name, row["id"])] = row[GROUP_COLUMN]
    return groups


def unseen_photos(samples: Sequence[Sample], card: dict[str, Any] | None) -> list[Sample]:
    """The samples the card's model did not train on: other datasets, and its own validation photos.

    Without a card nothing can be checked; every sample is kept, with a warning.
    """
    if card is None:
        logger.warning("no model card given: cannot check that the photos were not trained on")
        return list(samples)
    trained = trained_on(card)
    kept = [s for s in samples if not trained(s)]
    if len(kept) < len(samples):
        logger.info("left out %d photos the model trained on", len(samples) - len(kept))
    return kept


def choose_photos(
    samples: Sequence[Sample], groups: dict[tuple[str, str], str], max_per_source: int | None, seed: int
) -> list[tuple[Sample, str]]:
    """A seeded subset of whole lesions, at most ``max_per_source`` photos of each dataset."""
    by_source: dict[str, dict[str, list[Sample]]] = defaultdict(lambda: defaultdict(list))
    for sample in samples:
        group = groups.get((sample.dataset, sample.id), sample.id)
        by_source[sample.dataset][group].append(sample)
    chosen: list[tuple[Sample, str]] = []
    for dataset in sorted(by_source):
        lesions = sorted(by_source[dataset])
        random.Random(f"{seed}/{dataset}").shuffle(lesions)
        taken = 0
        for lesion in lesions:
            if max_per_source is not None and taken >= max_per_source:
                break
            chosen.extend((sample, lesion) for sample in by_source[dataset][lesion])
            taken += len(by_source[dataset][lesion])
    return chosen


# --- running the network -----------------------------------------------------------------------------------


def collect(
    pipeline: Pipeline, photos: Sequence[tuple[Sample, str]], *, flip: bool = False
) -> tuple[list[QualityRow], dict[str, float]]:
    """Segments each photo with the served pipeline's steps, computes its features and scores its mask.

    Returns:
        The rows, and timings: network ms per photo (batched) and feature ms per call.
    """
    rows: list[QualityRow] = []
    network_s = feature_s = 0.0
    threshold = pipeline.threshold
    for start in range(0, len(photos), pipeline.batch_size):
        chunk = photos[start : start + pipeline.batch_size]
        images = [pipeline.decode(sample.image_path) for sample, _ in chunk]
        batch = pipeline.preprocess(images)
        began = time.perf_counter()
        probabilities = pipeline.infer(batch)
        network_s += time.perf_counter() - began
        mirrored: list[np.ndarray | None] = [None] * len(chunk)
        if flip:
            output = np.asarray(pipeline.predict(batch[:, :, ::-1].copy()), dtype=np.float32)
            mirrored = list(output.reshape(batch.shape[:3])[:, :, ::-1])
        for (sample, group), image, probability, twin in zip(
            chunk, images, probabilities, mirrored, strict=True
        ):
            began = time.perf_counter()
            features = quality_features(probability, threshold, flipped_probability=twin)
            feature_s += time.perf_counter() - began
            mask = pipeline.postprocess(probability, image.size, threshold).mask
            truth = load_mask(sample.mask_path)
            if truth.shape != mask.shape:
                raise DataError(f"{sample.mask_path}: mask is {truth.shape} but the photo {mask.shape}")
            jaccard = metrics_from_counts(*confusion_counts(mask, truth))["jaccard"]
            rows.append(QualityRow(sample.dataset, sample.id, group, features, jaccard))
        if start // pipeline.batch_size % 50 == 0:
            logger.info("calibrate-quality: %d of %d photos", start + len(chunk), len(photos))
    count = max(len(rows), 1)
    return rows, {
        "network_ms_per_photo_batched": 1e3 * network_s / count,
        "features_ms": 1e3 * feature_s / count,
    }


def single_photo_inference_ms(
    pipeline: Pipeline, photos: Sequence[tuple[Sample, str]], repeats: int
) -> float:
    """Median ms of one photo through the network at batch size 1 (what a request pays)."""
    timings = []
    for sample, _ in photos[:repeats]:
        batch = pipeline.preprocess([pipeline.decode(sample.image_path)])
        began = time.perf_counter()
        pipeline.infer(batch)
        timings.append(time.perf_counter() - began)
    return 1e3 * float(np.median(timings)) if timings else float("nan")


# --- rows on disk ------------------------------------------------------------------------------------------


def write_rows(path: Path, rows: Sequence[QualityRow]) -> None:
    """One CSV line per photo: dataset, id, group, jaccard and every feature (refit without the network)."""
    names = list(QualityFeatures.__dataclass_fields__)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["dataset", "id", "group", "jaccard", *names])
        for row in rows:
            values = row.features.as_dict()
            writer.writerow([row.dataset, row.id, row.group, repr(row.jaccard), *(values[n] for n in names)])


def read_rows(path: Path) -> list[QualityRow]:
    """Reads :func:`write_rows`'s CSV."""
    rows = []
    with Path(path).open(newline="") as stream:
        for line in csv.DictReader(stream):
            flip = line.get("flip_agreement") or ""
            features = QualityFeatures(
                **{
                    name: (int(line[name]) if name == "components" else float(line[name]))
                    for name in QualityFeatures.__dataclass_fields__
                    if name != "flip_agreement"
                },
                flip_agreement=float(flip) if flip not in ("", "None") else None,
            )
            rows.append(
                QualityRow(line["dataset"], line["id"], line["group"], features, float(line["jaccard"]))
            )
    return rows


# --- fitting and scoring -----------------------------------------------------------------------------------


def split_by_group(
    rows: Sequence[QualityRow], test_fraction: float, seed: int
) -> tuple[list[QualityRow], list[QualityRow]]:
    """Fit and test parts with no lesion on both sides, about ``test_fraction`` of each source's lesions."""
    test_groups: set[tuple[str, str]] = set()
    for dataset in sorted({row.dataset for row in rows}):
        groups = sorted({row.group for row in rows if row.dataset == dataset})
        random.Random(f"{seed}/split/{dataset}").shuffle(groups)
        test_groups.update((dataset, group) for group in groups[: round(test_fraction * len(groups))])
    fit = [row for row in rows if (row.dataset, row.group) not in test_groups]
    test = [row for row in rows if (row.dataset, row.group) in test_groups]
    return fit, test


def auroc(scores: Sequence[float] | np.ndarray, positives: Sequence[bool] | np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for telling positives (higher score = more likely) apart."""
    scores, positives = np.asarray(scores, dtype=np.float64), np.asarray(positives, dtype=bool)
    n_positive, n_negative = int(positives.sum()), int((~positives).sum())
    if n_positive == 0 or n_negative == 0:
        return float("nan")
    ranks = stats.rankdata(scores)
    return float((ranks[positives].sum() - n_positive * (n_positive + 1) / 2) / (n_positive * n_negative))


def fit_estimator(
    rows: Sequence[QualityRow], terms: Sequence[tuple[str, str]] = DEFAULT_TERMS, ridge: float = RIDGE
) -> QualityEstimator:
    """Least squares of ``sigmoid(intercept + Σ w·z)`` on the true Jaccard of photos where a mask was found.

    Photos without a mask get 0 whatever the weights, so they do not take part in the fit.
    """
    found = [row for row in rows if row.features.found]
    if len(found) < len(terms) + 2:
        raise DataError(f"too few photos with a mask to fit {len(terms)} terms: {len(found)}")
    raw = feature_matrix([row.features for row in found], [name for name, _ in terms])
    transformed = np.array(
        [[transform(kind, v) for (_, kind), v in zip(terms, line, strict=True)] for line in raw]
    )
    means = transformed.mean(axis=0)
    scales = transformed.std(axis=0)
    scales[scales < 1e-9] = 1.0
    standardized = (transformed - means) / scales
    target = np.array([row.jaccard for row in found])

    def residuals(parameters: np.ndarray) -> np.ndarray:
        logit = np.clip(parameters[0] + standardized @ parameters[1:], -40, 40)
        fitted = 1.0 / (1.0 + np.exp(-logit))
        return np.concatenate([fitted - target, math.sqrt(ridge * len(found)) * parameters[1:]])

    mean_target = float(np.clip(target.mean(), 0.01, 0.99))
    start = np.zeros(len(terms) + 1)
    start[0] = math.log(mean_target / (1 - mean_target))
    solution = optimize.least_squares(residuals, start, method="trf", x_scale="jac")
    return QualityEstimator(
        terms=tuple(
            FeatureTerm(name, kind, float(mean), float(scale), float(weight))
            for (name, kind), mean, scale, weight in zip(terms, means, scales, solution.x[1:], strict=True)
        ),
        intercept=float(solution.x[0]),
    )


def youden_threshold(estimates: np.ndarray, failed: np.ndarray) -> float:
    """The review threshold that best separates failures: maximizes caught share − flagged-success share."""
    candidates = np.unique(np.round(estimates, 3))
    best, best_gain = float(ISIC_JACCARD_CUTOFF), -1.0
    for candidate in candidates:
        flagged = estimates < candidate
        gain = flagged[failed].mean() - flagged[~failed].mean()
        if gain > best_gain:
            best, best_gain = float(candidate), float(gain)
    return best


def score_rows(
    estimator: QualityEstimator, rows: Sequence[QualityRow], review_below: float
) -> dict[str, Any]:
    """The issue's figures on some rows: AUROC, Spearman, MAE, share flagged and share of failures caught."""
    estimates = np.array([estimator.estimate(row.features) for row in rows])
    truth = np.array([row.jaccard for row in rows])
    failed = truth < ISIC_JACCARD_CUTOFF
    flagged = estimates < review_below
    reason_rows: dict[str, list[bool]] = defaultdict(list)
    for row in rows:
        for reason in estimator.assess(row.features, review_below).reasons:
            reason_rows[reason].append(row.failed)
    return {
        "n_images": len(rows),
        "failures": int(failed.sum()),
        "failure_rate": float(failed.mean()) if rows else float("nan"),
        "mean_jaccard": float(truth.mean()) if rows else float("nan"),
        "mean_estimate": float(estimates.mean()) if rows else float("nan"),
        "auroc_failures": auroc(-estimates, failed),
        "spearman": float(stats.spearmanr(estimates, truth).statistic) if len(rows) > 2 else float("nan"),
        "mae": float(np.abs(estimates - truth).mean()) if rows else float("nan"),
        "flagged_share": float(flagged.mean()) if rows else float("nan"),
        "failures_caught": float(flagged[failed].mean()) if failed.any() else float("nan"),
        "failure_rate_among_flagged": float(failed[flagged].mean()) if flagged.any() else float("nan"),
        "reasons": {
            reason: {"count": len(outcomes), "failure_rate": float(np.mean(outcomes))}
            for reason, outcomes in sorted(reason_rows.items())
        },
    }


def threshold_table(
    estimator: QualityEstimator, rows: Sequence[QualityRow], thresholds: Sequence[float] = TRADE_OFF
) -> list[dict[str, float]]:
    """Share flagged and share of failures caught at several review thresholds (for DERMASEG_REVIEW_BELOW)."""
    estimates = np.array([estimator.estimate(row.features) for row in rows])
    failed = np.array([row.failed for row in rows])
    table = []
    for threshold in thresholds:
        flagged = estimates < threshold
        table.append(
            {
                "review_below": threshold,
                "flagged_share": float(flagged.mean()),
                "failures_caught": float(flagged[failed].mean()) if failed.any() else float("nan"),
            }
        )
    return table


def feature_aurocs(rows: Sequence[QualityRow], names: Sequence[str]) -> dict[str, dict[str, float | str]]:
    """Each feature alone as a failure detector: AUROC, and whether low or high values mean failure."""
    failed = np.array([row.failed for row in rows])
    result: dict[str, dict[str, float | str]] = {}
    for name in names:
        values = np.array([row.features.value(name) for row in rows])
        low_means_failure = auroc(-values, failed)
        if low_means_failure >= 0.5:
            result[name] = {"auroc": low_means_failure, "failure_when": "low"}
        else:
            result[name] = {"auroc": 1.0 - low_means_failure, "failure_when": "high"}
    return result


def by_source(rows: Sequence[QualityRow]) -> dict[str, list[QualityRow]]:
    sources: dict[str, list[QualityRow]] = defaultdict(list)
    for row in rows:
        sources[row.dataset].append(row)
    return dict(sorted(sources.items()))


# --- the command -------------------------------------------------------------------------------------------


def calibrate(
    model_path: Path,
    roots: Sequence[Path],
    *,
    out: Path,
    report_path: Path,
    card_path: Path | None = None,
    rows_path: Path | None = None,
    from_rows: Path | None = None,
    max_per_source: int | None = 3000,
    test_fraction: float = 0.5,
    seed: int = 14,
    flip: bool = False,
    batch_size: int = 8,
    pipeline: Pipeline | None = None,
) -> dict[str, Any]:
    """Collects (or reads) the calibration rows, fits the estimator on one part, reports on the other.

    Args:
        model_path: the ``.onnx`` model the estimator is for (its sha256 goes into the estimator file).
        roots: dataset folders; photos the card lists as trained on are left out.
        out: the estimator file to write (``models/dermaseg.quality.json``).
        report_path: the evaluation report (JSON) to write.
        card_path: the model's card (``models/dermaseg.json``): which photos it trained on.
        rows_path: also write the per-photo features and Jaccards here (CSV).
        from_rows: read the rows from such a CSV instead of running the network.
        max_per_source: at most this many photos of each dataset (whole lesions, seeded).
        test_fraction: share of each source's lesions held out for the report.
        seed: seeds the subset and the split.
        flip: also run the mirrored pass, to measure what its agreement would add (not used by default).
        pipeline: use this instead of loading ``model_path`` (tests).

    Returns:
        The report.
    """
    card = json.loads(Path(card_path).read_text()) if card_path is not None else None
    timings: dict[str, float] = {}
    if from_rows is not None:
        rows = read_rows(from_rows)
    else:
        samples = unseen_photos(load_samples([Path(root) for root in roots]), card)
        photos = choose_photos(samples, read_groups(roots), max_per_source, seed)
        if not photos:
            raise DataError("no photo left to calibrate on (all were trained on?)")
        if pipeline is None:
            pipeline = OnnxModel(model_path).pipeline(batch_size=batch_size)
        logger.info("calibrate-quality: %d photos from %d sources", len(photos), len(by_source_ids(photos)))
        rows, timings = collect(pipeline, photos, flip=flip)
        timings["network_ms_batch1"] = single_photo_inference_ms(pipeline, photos, repeats=16)
        if rows_path is not None:
            write_rows(rows_path, rows)
    fit_rows, test_rows = split_by_group(rows, test_fraction, seed)
    if not fit_rows or not test_rows:
        raise DataError(f"too few lesions to split into fit and test parts ({len(rows)} photos)")

    estimator = fit_estimator(fit_rows)
    fit_estimates = np.array([estimator.estimate(row.features) for row in fit_rows])
    review_below = youden_threshold(fit_estimates, np.array([row.failed for row in fit_rows]))
    confidences = [row.features.mean_confidence for row in fit_rows if row.features.found]
    limits = ReasonLimits(mean_confidence=round(float(np.quantile(confidences, LOW_CONFIDENCE_QUANTILE)), 3))
    estimator = replace(estimator, review_below=review_below, reason_limits=limits)
    assessment_cost_ms = _assessment_ms(estimator, test_rows)

    report: dict[str, Any] = {
        "model": Path(model_path).name,
        "model_sha256": sha256_file(model_path) if Path(model_path).is_file() else "",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "failure": f"true Jaccard < {ISIC_JACCARD_CUTOFF} (at the photo's own size, threshold of the model)",
        "data": {
            "roots": [str(root) for root in roots],
            "sources": {name: len(part) for name, part in by_source(rows).items()},
            "left_out": "photos the model card lists as trained on (its validation photos are kept)",
            "max_per_source": max_per_source,
            "seed": seed,
            "split": f"by lesion ({GROUP_COLUMN} where the manifest has it, else by photo), "
            f"{test_fraction:.0%} of each source's lesions held out",
            "fit_images": len(fit_rows),
            "test_images": len(test_rows),
        },
        "estimator": {"terms": [f"{kind}({name})" for name, kind in DEFAULT_TERMS], "link": "sigmoid"},
        "review_below": review_below,
        "review_below_chosen_by": "Youden's J (caught share of failures − flagged share of successes) on fit",
        "reason_limits": asdict(limits),
        "reason_limits_chosen_by": f"low_confidence: the {LOW_CONFIDENCE_QUANTILE:.0%} quantile of the fit "
        "photos' mean confidence; the others fixed",
        "test": score_rows(estimator, test_rows, review_below),
        "test_per_source": {
            name: score_rows(estimator, part, review_below) for name, part in by_source(test_rows).items()
        },
        "test_trade_off": threshold_table(estimator, test_rows),
        "fit": score_rows(estimator, fit_rows, review_below),
        "feature_auroc_test": feature_aurocs(test_rows, REPORTED_FEATURES),
        "cost": {**timings, "features_and_estimate_ms": timings.get("features_ms", 0.0) + assessment_cost_ms},
    }
    network_ms = timings.get("network_ms_batch1")
    if network_ms:
        report["cost"]["share_of_inference"] = report["cost"]["features_and_estimate_ms"] / network_ms
    if all(row.features.flip_agreement is not None for row in rows):
        report["flip_agreement"] = _flip_gain(fit_rows, test_rows, review_below)

    calibration = {
        "fitted_on": f"{len(fit_rows)} unseen photos ({', '.join(by_source(fit_rows))})",
        "tested_on": f"{len(test_rows)} other photos, other lesions",
        "test": {
            key: report["test"][key]
            for key in (
                "n_images",
                "failures",
                "auroc_failures",
                "spearman",
                "mae",
                "flagged_share",
                "failures_caught",
            )
        },
        "date": report["date"],
        "command": "dermaseg calibrate-quality",
    }
    final = replace(estimator, model_sha256=report["model_sha256"], calibration=_without_nan(calibration))
    out.parent.mkdir(parents=True, exist_ok=True)
    final.save(out)
    report = _without_nan(report)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    return report


def _without_nan(value: Any) -> Any:
    """The report with undefined figures (an AUROC without failures) as null, so it is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _without_nan(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_without_nan(item) for item in value]
    return value


def by_source_ids(photos: Sequence[tuple[Sample, str]]) -> set[str]:
    return {sample.dataset for sample, _ in photos}


def _assessment_ms(estimator: QualityEstimator, rows: Sequence[QualityRow]) -> float:
    """Median ms of one :meth:`QualityEstimator.assess` call (the estimate, the flag and the reasons)."""
    timings = []
    for row in rows[:500]:
        began = time.perf_counter()
        estimator.assess(row.features)
        timings.append(time.perf_counter() - began)
    return 1e3 * float(np.median(timings)) if timings else 0.0


def _flip_gain(
    fit_rows: Sequence[QualityRow], test_rows: Sequence[QualityRow], review_below: float
) -> dict[str, Any]:
    """What adding the mirrored pass's agreement to the estimator changes on the test part."""
    with_flip = fit_estimator(fit_rows, (*DEFAULT_TERMS, ("flip_agreement", "logit")))
    fit_estimates = np.array([with_flip.estimate(row.features) for row in fit_rows])
    threshold = youden_threshold(fit_estimates, np.array([row.failed for row in fit_rows]))
    return {
        "cost": "a second inference per photo (about +100 % of the network's time)",
        "feature_auroc_test": feature_aurocs(test_rows, ["flip_agreement"])["flip_agreement"],
        "test_with_flip": score_rows(with_flip, test_rows, threshold),
        "review_below_with_flip": threshold,
    }


def calibrate_cli(args: Any) -> int:
    """Runs ``dermaseg calibrate-quality`` from parsed arguments; prints the test figures."""
    report = calibrate(
        args.model,
        args.data or [],
        out=args.out,
        report_path=args.report,
        card_path=args.card,
        rows_path=args.rows,
        from_rows=args.from_rows,
        max_per_source=args.max_per_source,
        test_fraction=args.test_fraction,
        seed=args.seed,
        flip=args.flip_agreement,
        batch_size=args.batch_size,
    )
    test = report["test"]
    print(
        f"test: {test['n_images']} photos, {test['failures']} failures (J < {ISIC_JACCARD_CUTOFF}): "
        f"AUROC {test['auroc_failures']:.3f}  Spearman {test['spearman']:.3f}  MAE {test['mae']:.3f}  "
        f"flagged {test['flagged_share']:.1%}  failures caught {test['failures_caught']:.1%} "
        f"at review_below {report['review_below']:.3f}"
    )
    print(f"estimator written to {args.out}, report to {args.report}")
    return 0
