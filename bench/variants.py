"""Section 6: the float32, float16-stored and int8 variants: latency, size, and what they do to the masks.

The variants are the files ``dermaseg export`` writes beside the shipped model (``NAME.fp32.onnx``,
``NAME.fp16.onnx``, ``NAME.int8.onnx``); those missing are made here from the float32 model with the
export module's own ``write_float16_storage`` and ``quantize_int8`` (int8 only with photos to calibrate
on), into a scratch folder. Masks are compared at each validation photo's own size, with the same
pre- and post-processing as the service, through ``training.metrics`` (numpy only, no TensorFlow).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from bench.inputs import LabelledPhotos
from bench.raw import network_batch
from bench.timing import Effort, Timing, measure
from service.inference import META_PREFIX, OnnxModel, postprocess, preprocess

logger = logging.getLogger(__name__)

PRECISIONS = ("float32", "float16", "int8")
SUFFIXES = {"float32": ".fp32.onnx", "float16": ".fp16.onnx", "int8": ".int8.onnx"}
#: Photos per session call when computing the masks (a session's arena grows to its largest batch).
CHUNK = 8


@dataclass
class VariantResult:
    """One precision: where it came from, its size and latency, and its masks against float32 and truth."""

    precision: str
    path: Path
    origin: str
    size_bytes: int
    timing: Timing
    dice_vs_truth: float | None = None
    dice_vs_float32: float | None = None
    max_abs_diff_vs_float32: float | None = None


@dataclass
class VariantsResult:
    """All precisions found or made, and notes on those that could not be."""

    variants: list[VariantResult] = field(default_factory=list)
    photos: str = ""
    notes: list[str] = field(default_factory=list)

    def get(self, precision: str) -> VariantResult | None:
        return next((v for v in self.variants if v.precision == precision), None)


def model_precision(path: Path) -> str:
    """The precision the export wrote into the model's metadata (``dermaseg.precision``); float32 if none."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    for entry in proto.metadata_props:
        if entry.key == META_PREFIX + "precision" and entry.value in PRECISIONS:
            return entry.value
    return "float32"


def sibling(model_path: Path, precision: str) -> Path:
    """Where ``dermaseg export`` puts ``precision`` beside ``model_path`` (``NAME.fp16.onnx`` …)."""
    return model_path.with_name(model_path.name.removesuffix(".onnx") + SUFFIXES[precision])


def find_or_make_variants(
    model_path: Path, workdir: Path, calibration: list[np.ndarray], notes: list[str]
) -> dict[str, tuple[Path, str]]:
    """The three precisions' files, and for each where it came from; made in ``workdir`` where missing."""
    from training.export import quantize_int8, write_float16_storage

    found: dict[str, tuple[Path, str]] = {model_precision(model_path): (model_path, "the model benchmarked")}
    for precision in PRECISIONS:
        if precision not in found and sibling(model_path, precision).is_file():
            found[precision] = (sibling(model_path, precision), "beside the model")
    if "float32" not in found:
        notes.append("no float32 model found beside the model: the variants cannot be made or compared")
        return found
    float32 = found["float32"][0]
    if "float16" not in found:
        target = workdir / "variant.fp16.onnx"
        write_float16_storage(float32, target)
        found["float16"] = (target, "made here (write_float16_storage)")
    if "int8" not in found:
        if calibration:
            input_size = OnnxModel(float32).info.input_size
            target = workdir / "variant.int8.onnx"
            quantize_int8(float32, target, [preprocess(image, input_size) for image in calibration])
            found["int8"] = (target, f"made here (quantize_int8, calibrated on {len(calibration)} photos)")
        else:
            notes.append("int8 not measured: no photos to calibrate it on (give --data DIR)")
    return found


def _dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    from training.metrics import confusion_counts, metrics_from_counts

    return float(metrics_from_counts(*confusion_counts(prediction, truth))["dice"])


def _masks(model: OnnxModel, photos: LabelledPhotos, threshold: float) -> tuple[list[np.ndarray], np.ndarray]:
    batch = np.stack([preprocess(image, model.info.input_size) for image in photos.images])
    probabilities = np.concatenate(
        [model(batch[start : start + CHUNK]) for start in range(0, len(batch), CHUNK)]
    )
    masks = [
        postprocess(probability, image.shape[:2], threshold).mask
        for probability, image in zip(probabilities, photos.images, strict=True)
    ]
    return masks, probabilities


def bench_variants(
    model_path: Path, rgb: np.ndarray, photos: LabelledPhotos, effort: Effort, workdir: Path
) -> VariantsResult:
    """Batch-1 latency on the photo, size, and mean per-photo Dice (vs truth and vs float32) per precision."""
    result = VariantsResult(photos=photos.source)
    files = find_or_make_variants(model_path, workdir, photos.calibration, result.notes)
    reference_masks: list[np.ndarray] = []
    reference_probabilities: np.ndarray | None = None
    threshold = OnnxModel(files.get("float32", (model_path, ""))[0]).info.threshold
    for precision in (p for p in PRECISIONS if p in files):
        path, origin = files[precision]
        model = OnnxModel(path)
        batch = network_batch(rgb, model.info.input_size, 1)
        variant = VariantResult(
            precision,
            path,
            origin,
            path.stat().st_size,
            measure(partial(model, batch), effort),
        )
        if photos.images:
            masks, probabilities = _masks(model, photos, threshold)
            if precision == "float32":
                reference_masks, reference_probabilities = masks, probabilities
            variant.dice_vs_truth = float(
                np.mean([_dice(m, t) for m, t in zip(masks, photos.truths, strict=True)])
            )
            if reference_probabilities is not None:
                variant.dice_vs_float32 = float(
                    np.mean([_dice(m, r) for m, r in zip(masks, reference_masks, strict=True)])
                )
                variant.max_abs_diff_vs_float32 = float(
                    np.max(np.abs(probabilities - reference_probabilities))
                )
        logger.info("variant %s: p50 %.1f ms, Dice %s", precision, variant.timing.p50, variant.dice_vs_truth)
        result.variants.append(variant)
        del model
    return result
