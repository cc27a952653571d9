"""The photos of an export: calibration photos for int8 and validation photos (with masks) to measure on."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service.imaging import decode_image, load_mask
from service.pipeline import preprocess
from training.export.errors import ExportError

logger = logging.getLogger(__name__)

#: Photos used to calibrate int8 and to compare the variants' masks (at most).
CALIBRATION_IMAGES = 64
EVALUATION_IMAGES = 32
#: Seed of the calibration / evaluation draw when the run has no split.json.
SELECTION_SEED = 0


@dataclass
class Selection:
    """Photos drawn from the calibration folders."""

    calibration: list[Any] = field(default_factory=list)
    evaluation: list[Any] = field(default_factory=list)
    source: str = "none"
    disjoint: bool = True


@dataclass
class EvaluationImages:
    """Decoded validation photos, their masks, and the network-size batch made of them."""

    images: list[np.ndarray] = field(default_factory=list)
    truths: list[np.ndarray] = field(default_factory=list)
    batch: np.ndarray | None = None


def select_samples(
    roots: Sequence[Path], run_dir: Path, calibration_count: int, evaluation_count: int
) -> Selection:
    """Chooses calibration and evaluation photos: the run's validation images for evaluation when known.

    With ``RUN_DIR/split.json``, evaluation photos are those of its validation side found in ``roots`` and
    calibration photos are the others (so int8 is not calibrated on the images it is judged on); without
    one, a seeded shuffle of ``roots`` is cut in two. Both are capped at the counts given.
    """
    if not roots:
        return Selection()
    from training.data import DataError, load_samples
    from training.split import load_split

    try:
        samples = load_samples([Path(root) for root in roots])
    except DataError as error:
        raise ExportError(f"calibration data: {error}") from None
    validation: set[Any] = set()
    if (run_dir / "split.json").is_file():
        try:
            _, val = load_split(run_dir / "split.json")
        except DataError as error:
            logger.warning("ignoring %s: %s", run_dir / "split.json", error)
            val = []
        validation = {(s.dataset, s.id) for s in val} | {str(s.image_path.resolve()) for s in val}

    def is_validation(sample: Any) -> bool:
        return (sample.dataset, sample.id) in validation or str(sample.image_path.resolve()) in validation

    held_out = [s for s in samples if is_validation(s)]
    if held_out:
        rest = [s for s in samples if not is_validation(s)] or held_out
        order = np.random.default_rng(SELECTION_SEED).permutation(len(rest))
        return Selection(
            calibration=[rest[i] for i in order[:calibration_count]],
            evaluation=held_out[:evaluation_count],
            source=f"validation images of {run_dir / 'split.json'}",
            disjoint=rest is not held_out,
        )
    order = [samples[i] for i in np.random.default_rng(SELECTION_SEED).permutation(len(samples))]
    if len(order) == 1:
        return Selection(calibration=order, evaluation=order, source="the one image given", disjoint=False)
    evaluation = order[: min(evaluation_count, len(order) // 2)]
    calibration = order[len(evaluation) :][:calibration_count]
    return Selection(
        calibration, evaluation, source="a seeded draw from the calibration folders", disjoint=True
    )


def load_evaluation_images(samples: Sequence[Any], input_size: tuple[int, int]) -> EvaluationImages:
    if not samples:
        return EvaluationImages()
    images = [decode_image(sample.image_path) for sample in samples]
    truths = [load_mask(sample.mask_path) for sample in samples]
    for sample, image, truth in zip(samples, images, truths, strict=True):
        if truth.shape != image.shape[:2]:
            raise ExportError(f"{sample.mask_path}: mask is {truth.shape[::-1]}, image {image.shape[1::-1]}")
    batch = np.stack([preprocess(image, input_size) for image in images])
    return EvaluationImages(images=images, truths=truths, batch=batch)
