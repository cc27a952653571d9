"""Parity: Keras and ONNX Runtime agree on the same inputs; the variants' masks measured against float32."""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from service.inference import OnnxModel
from service.pipeline import postprocess
from training.export.errors import ExportError
from training.export.photos import EvaluationImages
from training.export.variants import PRECISIONS

logger = logging.getLogger(__name__)

#: Largest absolute difference allowed between Keras and ONNX Runtime probabilities.
PARITY_TOLERANCE = 1e-4
#: Timed runs for the batch-1 latency (after one warm-up run).
LATENCY_RUNS = 10


def _parity_batches(input_size: tuple[int, int], real: np.ndarray | None) -> dict[str, np.ndarray]:
    """Random photos at batch 1 and 3 (the dynamic batch), flat colours, and up to 4 real photos."""
    height, width = input_size
    generator = np.random.default_rng(1)
    batches = {
        "random batch 1": generator.uniform(0, 255, (1, height, width, 3)).astype(np.float32),
        "random batch 3": generator.uniform(0, 255, (3, height, width, 3)).astype(np.float32),
        "black, grey and white": np.stack(
            [np.full((height, width, 3), value, np.float32) for value in (0.0, 127.5, 255.0)]
        ),
    }
    if real is not None and len(real):
        batches[f"{min(len(real), 4)} validation photos"] = real[:4]
    return batches


def verify_parity(
    model: Any, path: Path, input_size: tuple[int, int], real: np.ndarray | None = None
) -> dict[str, Any]:
    """Runs Keras and ONNX Runtime on the same inputs; fails when they differ by more than the tolerance.

    Raises:
        ExportError: different shapes, or a difference over :data:`PARITY_TOLERANCE`.
    """
    import keras

    session = OnnxModel(path)
    diffs: dict[str, float] = {}
    for label, batch in _parity_batches(input_size, real).items():
        expected = np.asarray(keras.ops.convert_to_numpy(model(batch, training=False)), dtype=np.float32)
        got = session(batch)
        if got.shape != expected.shape:
            raise ExportError(f"{label}: ONNX Runtime gave shape {got.shape}, Keras {expected.shape}")
        diffs[label] = float(np.max(np.abs(got - expected)))
    worst = max(diffs, key=diffs.__getitem__)
    if diffs[worst] > PARITY_TOLERANCE:
        raise ExportError(
            f"the ONNX model differs from Keras by {diffs[worst]:.2e} on {worst} "
            f"(tolerance {PARITY_TOLERANCE:.0e})"
        )
    return {"max_abs_diff": diffs[worst], "tolerance": PARITY_TOLERANCE, "per_input": diffs}


def mean_dice(predictions: Sequence[np.ndarray], truths: Sequence[np.ndarray]) -> float:
    """Mean per-image Dice of masks against reference masks of the same sizes."""
    from training.metrics import confusion_counts, metrics_from_counts

    return float(
        np.mean(
            [
                metrics_from_counts(*confusion_counts(prediction, truth))["dice"]
                for prediction, truth in zip(predictions, truths, strict=True)
            ]
        )
    )


def predict_masks(
    model: OnnxModel, images: Sequence[np.ndarray], batch: np.ndarray, threshold: float
) -> tuple[list[np.ndarray], np.ndarray]:
    """Each photo's mask at its own size, and the network-size probabilities ``(N, h, w, 1)``.

    ``batch`` is ``images`` preprocessed; it runs a few photos at a time, since a session's memory arena
    grows to the largest batch it has seen.
    """
    probabilities = np.concatenate([model(batch[start : start + 8]) for start in range(0, len(batch), 8)])
    masks = [
        postprocess(probability, image.shape[:2], threshold).mask
        for probability, image in zip(probabilities, images, strict=True)
    ]
    return masks, probabilities


def measure_variants(
    paths: dict[str, Path], evaluation: EvaluationImages, threshold: float
) -> dict[str, dict[str, Any]]:
    """Size, batch-1 latency and masks of each precision, the masks compared with float32's and the truth.

    Dice values are per-image means over the evaluation photos at their own size; they are None without
    photos. ``max_abs_diff_vs_float32`` compares the probability maps at the network's resolution.
    """
    results: dict[str, dict[str, Any]] = {}
    reference_masks: list[np.ndarray] = []
    reference_probabilities: np.ndarray | None = None
    for precision in ("float32", *(p for p in PRECISIONS if p != "float32" and p in paths)):
        model = OnnxModel(paths[precision])
        height, width = model.info.input_size
        if evaluation.batch is not None:
            sample = evaluation.batch[:1]
        else:
            sample = np.random.default_rng(2).uniform(0, 255, (1, height, width, 3)).astype(np.float32)
        model(sample)  # warm-up: the first run allocates
        timings = []
        for _ in range(LATENCY_RUNS):
            start = time.perf_counter()
            model(sample)
            timings.append((time.perf_counter() - start) * 1000.0)
        result: dict[str, Any] = {
            "precision": precision,
            "size_bytes": paths[precision].stat().st_size,
            "latency_ms_batch1": round(statistics.median(timings), 3),
            "latency_runs": LATENCY_RUNS,
            "provider": model.providers[0],
            "dice_vs_float32": None,
            "dice_vs_truth": None,
            "max_abs_diff_vs_float32": None,
            "n_images": len(evaluation.images),
        }
        if evaluation.images and evaluation.batch is not None:
            masks, probabilities = predict_masks(model, evaluation.images, evaluation.batch, threshold)
            if precision == "float32":
                reference_masks, reference_probabilities = masks, probabilities
            result["dice_vs_float32"] = round(mean_dice(masks, reference_masks), 6)
            result["dice_vs_truth"] = round(mean_dice(masks, evaluation.truths), 6)
            result["max_abs_diff_vs_float32"] = float(np.max(np.abs(probabilities - reference_probabilities)))
        del model  # each session keeps its memory arena: one at a time
        results[precision] = result
        logger.info("%s: %s", precision, {k: v for k, v in result.items() if k != "precision"})
    return results
