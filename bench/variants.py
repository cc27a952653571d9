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
from service.inference import META_PREFIX, ModelInfo, OnnxModel
from service.pipeline import preprocess
from training.export import mean_dice, predict_masks

logger = logging.getLogger(__name__)

PRECISIONS = ("float32", "float16", "int8")
SUFFIXES = {"float32": ".fp32.onnx", "float16": ".fp16.onnx", "int8": ".int8.onnx"}


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


def model_precision(info: ModelInfo) -> str:
    """The precision the export wrote into the model's metadata (``dermaseg.precision``); float32 if none."""
    precision = info.metadata.get(META_PREFIX + "precision", "float32")
    return precision if precision in PRECISIONS else "float32"


def sibling(model_path: Path, precision: str) -> Path:
    """Where ``dermaseg export`` puts ``precision`` beside ``model_path`` (``NAME.fp16.onnx`` …)."""
    return model_path.with_name(model_path.name.removesuffix(".onnx") + SUFFIXES[precision])


def find_or_make_variants(
    model_path: Path, precision: str, workdir: Path, calibration: list[np.ndarray], notes: list[str]
) -> dict[str, tuple[Path, str]]:
    """The three precisions' files, and for each where it came from; made in ``workdir`` where missing."""
    from training.export import quantize_int8, write_float16_storage

    found: dict[str, tuple[Path, str]] = {precision: (model_path, "the model benchmarked")}
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


def bench_variants(
    model_path: Path, precision: str, rgb: np.ndarray, photos: LabelledPhotos, effort: Effort, workdir: Path
) -> VariantsResult:
    """Batch-1 latency on the photo, size, and mean per-photo Dice (vs truth and vs float32) per precision.

    ``precision`` is the benchmarked model's own (:func:`model_precision`).
    """
    result = VariantsResult(photos=photos.source)
    files = find_or_make_variants(model_path, precision, workdir, photos.calibration, result.notes)
    info = OnnxModel(model_path).info  # every variant carries the same metadata (input size, threshold)
    single = network_batch(rgb, info.input_size, 1)
    validation = (
        np.stack([preprocess(image, info.input_size) for image in photos.images]) if photos.images else None
    )
    reference_masks: list[np.ndarray] = []
    reference_probabilities: np.ndarray | None = None
    for variant_precision in (p for p in PRECISIONS if p in files):
        path, origin = files[variant_precision]
        model = OnnxModel(path)
        variant = VariantResult(
            variant_precision, path, origin, path.stat().st_size, measure(partial(model, single), effort)
        )
        if validation is not None:
            masks, probabilities = predict_masks(model, photos.images, validation, info.threshold)
            if variant_precision == "float32":
                reference_masks, reference_probabilities = masks, probabilities
            variant.dice_vs_truth = mean_dice(masks, photos.truths)
            if reference_probabilities is not None:
                variant.dice_vs_float32 = mean_dice(masks, reference_masks)
                variant.max_abs_diff_vs_float32 = float(
                    np.max(np.abs(probabilities - reference_probabilities))
                )
        logger.info(
            "variant %s: p50 %.1f ms, Dice %s", variant_precision, variant.timing.p50, variant.dice_vs_truth
        )
        result.variants.append(variant)
        del model
    return result
