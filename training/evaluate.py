"""Evaluation: a model (Keras checkpoint or ONNX) against expert masks, at each image's own size.

Decode, pre- and post-processing are those of `service.pipeline` — the same code the service runs — so a
Keras checkpoint and its ONNX export are measured through one path and differ only in the network runner.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from service.imaging import decode_image, load_mask
from service.inference import OnnxModel
from service.pipeline import DEFAULT_THRESHOLD, Pipeline, Segmentation
from training.data import DataError, Sample, load_samples
from training.metrics import MetricAccumulator
from training.split import load_split

logger = logging.getLogger(__name__)


def load_pipeline(model_path: Path, batch_size: int = 8, providers: Sequence[str] = ("cpu",)) -> Pipeline:
    """A :class:`Pipeline` for an ``.onnx`` model (ONNX Runtime) or a ``.keras`` checkpoint (Keras).

    Keras is imported only for a checkpoint, so evaluating an ONNX model needs no TensorFlow.
    """
    model_path = Path(model_path)
    if model_path.suffix == ".onnx":
        return OnnxModel(model_path, providers=providers).pipeline(batch_size=batch_size)
    if model_path.suffix != ".keras":
        raise DataError(f"{model_path}: expected a .keras checkpoint or an .onnx model")
    import keras

    from training.model import load_network

    model = load_network(model_path)
    height, width = model.input_shape[1:3]

    def predict(batch: np.ndarray) -> np.ndarray:
        return np.asarray(keras.ops.convert_to_numpy(model(batch, training=False)), dtype=np.float32)

    return Pipeline(predict, (int(height), int(width)), DEFAULT_THRESHOLD, batch_size=batch_size)


def save_overlay(path: Path, image: np.ndarray, truth: np.ndarray, result: Segmentation, title: str) -> None:
    """Writes an image / ground truth / prediction figure (the paper's Table 2 layout)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(9, 3.2))
    axes[0].imshow(image)
    axes[0].set_title("image")
    axes[1].imshow(truth, cmap="gray")
    axes[1].set_title("ground truth")
    axes[2].imshow(image)
    axes[2].contour(truth, levels=[0.5], colors="lime", linewidths=1.2)
    axes[2].contour(result.mask, levels=[0.5], colors="red", linewidths=1.2)
    axes[2].set_title("prediction (red) vs truth (green)")
    for axis in axes:
        axis.set_axis_off()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def evaluate(
    model_path: Path,
    roots: Sequence[Path],
    *,
    out: Path | None = None,
    split: Path | None = None,
    threshold: float | None = None,
    overlays: Path | None = None,
    batch_size: int = 8,
    providers: Sequence[str] = ("cpu",),
    flip_tta: bool = False,
    largest_component: bool = False,
    fill_holes: bool = False,
    samples: Sequence[Sample] | None = None,
) -> dict[str, Any]:
    """Scores a model on every image of ``roots`` (or the validation side of ``split``).

    Args:
        model_path: ``.keras`` checkpoint or ``.onnx`` model.
        roots: dataset folders (any supported layout).
        out: where to write ``metrics.json``.
        split: a run's ``split.json``: evaluate only its validation images.
        threshold: probability threshold (default: the model's own, 0.5 for a checkpoint).
        overlays: folder for one figure per image.
        samples: the images to score, instead of discovering ``roots``.

    Returns:
        ``n_images``, ``threshold``, ``mean``, ``pooled``, ``thresholded_jaccard``, ``per_image``,
        ``per_dataset`` (the same figures for each source, without the per-image rows) and what was
        evaluated.
    """
    if samples is None:
        if split is not None:
            _, samples = load_split(Path(split))
        else:
            samples = load_samples([Path(root) for root in roots])
    if not samples:
        raise DataError("nothing to evaluate: no images")
    pipeline = load_pipeline(Path(model_path), batch_size=batch_size, providers=providers)
    threshold = pipeline.threshold if threshold is None else threshold
    if overlays is not None:
        overlays.mkdir(parents=True, exist_ok=True)

    accumulator = MetricAccumulator()
    by_dataset: dict[str, MetricAccumulator] = defaultdict(MetricAccumulator)
    progress = tqdm(total=len(samples), desc="evaluate", unit="img")
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        images = [pipeline.decode(sample.image_path) for sample in chunk]
        results = pipeline.segment(
            images, threshold, flip_tta=flip_tta, largest_component=largest_component, fill_holes=fill_holes
        )
        for sample, photo, result in zip(chunk, images, results, strict=True):
            truth = load_mask(sample.mask_path)
            if truth.shape != result.mask.shape:
                raise DataError(
                    f"{sample.mask_path}: mask is {truth.shape[::-1]} but image {photo.size[::-1]} (w, h)"
                )
            scores = accumulator.add(sample.id, result.mask, truth)
            by_dataset[sample.dataset].add(sample.id, result.mask, truth)
            if overlays is not None:
                title = f"{sample.id}  Dice {scores['dice']:.3f}"
                full = decode_image(sample.image_path)  # the figure shows the photo at its own size
                save_overlay(overlays / f"{sample.id}.png", full, truth, result, title)
        progress.update(len(chunk))
    progress.close()

    summary = accumulator.summary()
    summary.update(
        {
            "per_dataset": {
                dataset: _without_rows(by_dataset[dataset].summary()) for dataset in sorted(by_dataset)
            },
            "threshold": threshold,
            "model": str(model_path),
            "data": [str(root) for root in roots] if split is None else [f"validation split of {split}"],
            "postprocess": {
                "flip_tta": flip_tta,
                "largest_component": largest_component,
                "fill_holes": fill_holes,
            },
            "input_size": list(pipeline.input_size),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
        }
    )
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _without_rows(summary: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in summary.items() if key != "per_image"}


def record_in_card(card_path: Path, model_path: Path, summary: dict[str, Any], label: str) -> dict[str, Any]:
    """Adds an evaluation (without its per-image rows) to a model card's ``evaluation`` list.

    The card must describe this very file: its ``sha256`` has to match the model's, so a card never carries
    numbers measured on another export. An entry with the same label and data replaces the older one.

    Returns:
        The entry written.

    Raises:
        DataError: the card is unreadable or belongs to another file.
    """
    from service.inference import CardError, load_card, sha256_file

    card_path, model_path = Path(card_path), Path(model_path)
    try:
        card = load_card(card_path, sha256_file(model_path))
    except CardError as error:
        raise DataError(f"{error} ({model_path}): evaluate the model the card belongs to") from None
    entry = {key: value for key, value in summary.items() if key != "per_image"}
    entry["label"] = label
    entry["model"] = model_path.name
    entries = [
        existing
        for existing in card.get("evaluation", [])
        if (existing.get("label"), existing.get("data")) != (label, entry["data"])
    ]
    card["evaluation"] = [*entries, entry]
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    return entry
