"""``export_model`` and ``dermaseg export``: convert, verify, make the variants, write the card and files."""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from service.imaging import decode_image
from service.pipeline import DEFAULT_THRESHOLD, preprocess
from training.export.card import (
    build_card,
    build_sidecar,
    describe_normalization,
    load_checkpoint_config,
    write_with_metadata,
)
from training.export.convert import MAX_OPSET, MIN_OPSET, check_model, convert_keras_to_onnx, load_checkpoint
from training.export.errors import ExportError
from training.export.parity import PARITY_TOLERANCE, measure_variants, verify_parity
from training.export.photos import (
    CALIBRATION_IMAGES,
    EVALUATION_IMAGES,
    load_evaluation_images,
    select_samples,
)
from training.export.triton import write_triton_repository
from training.export.variants import (
    PRECISIONS,
    check_estimated_size,
    quantize_int8,
    variant_path,
    write_float16_storage,
)

logger = logging.getLogger(__name__)

#: The shipped model is committed to git: at most 64 MiB.
MAX_SHIPPED_BYTES = 64 * 2**20


def export_cli(args: argparse.Namespace) -> int:
    """Runs ``dermaseg export`` from parsed arguments; prints where the model went and what it measured.

    Returns:
        0 on success (failures raise :class:`ExportError`).
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter
    max_size_mib = getattr(args, "max_size_mib", MAX_SHIPPED_BYTES / 2**20)
    card = export_model(
        Path(args.checkpoint),
        Path(args.out),
        opset=args.opset,
        name=args.name,
        version=args.version,
        variants=tuple(args.variants or ()),
        ship=args.ship or "float32",
        calibration_roots=tuple(Path(root) for root in args.calibration_data or ()),
        triton_dir=args.triton,
        threshold=getattr(args, "threshold", None) or DEFAULT_THRESHOLD,
        max_bytes=int(max_size_mib * 2**20) if max_size_mib else None,
    )
    shipped = card["variants"][card["precision"]]
    print(
        f"{args.out}: {card['precision']}, {shipped['size_bytes'] / 2**20:.1f} MiB, "
        f"sha256 {card['sha256'][:12]}…, Keras parity {card['export']['verification']['max_abs_diff']:.2e}; "
        f"card {Path(args.out).with_suffix('.json')}"
    )
    for precision, variant in card["variants"].items():
        print(f"  {precision:8s} {_describe_variant(variant)}")
    return 0


def _describe_variant(variant: dict[str, Any]) -> str:
    parts = [
        variant["file"],
        f"{variant['size_bytes'] / 2**20:.1f} MiB",
        f"{variant['latency_ms_batch1']:.1f} ms",
    ]
    if variant.get("dice_vs_float32") is not None:
        parts.append(f"Dice vs float32 {variant['dice_vs_float32']:.4f}")
    if variant.get("dice_vs_truth") is not None:
        parts.append(f"Dice vs truth {variant['dice_vs_truth']:.4f}")
    return ", ".join(parts)


def export_model(
    checkpoint: Path,
    out: Path,
    *,
    opset: int = 17,
    name: str | None = None,
    version: str = "0.1.0",
    variants: Sequence[str] = (),
    ship: str = "float32",
    calibration_roots: Sequence[Path] = (),
    triton_dir: Path | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    max_bytes: int | None = MAX_SHIPPED_BYTES,
    calibration_images: int = CALIBRATION_IMAGES,
    evaluation_images: int = EVALUATION_IMAGES,
) -> dict[str, Any]:
    """Exports a Keras checkpoint to ONNX, verifies it, and writes its variants, model card and Triton layout.

    Args:
        checkpoint: ``RUN_DIR/best.keras``; ``config.json``, ``split.json``, ``summary.json`` and
            ``eval_*.json`` / ``metrics.json`` beside it go into the model card.
        out: the ``.onnx`` file of the shipped precision; the card goes to ``out.with_suffix(".json")``
            and the other precisions beside it as ``NAME.fp32.onnx``, ``NAME.fp16.onnx``,
            ``NAME.int8.onnx``.
        opset: ONNX opset, :data:`MIN_OPSET` to :data:`MAX_OPSET`.
        name: model name (default: ``out``'s stem).
        version: model version.
        variants: ``float16`` and/or ``int8``, written beside the float32 model (``ship`` is added).
        ship: the precision written to ``out``: ``float32``, ``float16`` or ``int8``.
        calibration_roots: dataset folders: photos to calibrate int8 on, and validation photos (with masks)
            for the parity check and the variants' Dice. With a ``split.json`` beside the checkpoint, its
            validation images are the evaluation set and calibration uses the others.
        triton_dir: also write a Triton model repository here.
        threshold: the lesion threshold written into the model.
        max_bytes: the largest shipped file allowed (None: no limit, only a warning over 64 MiB).
        calibration_images: at most this many photos for int8 calibration.
        evaluation_images: at most this many photos for the parity check and the Dice comparison.

    Returns:
        The model card as written to the sidecar JSON (with ``sha256``).

    Raises:
        ExportError: bad arguments, a missing or unloadable checkpoint, a model that breaks the I/O
            contract, a parity failure, or a shipped file over ``max_bytes``.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    wanted = _check_arguments(checkpoint, out, opset, variants, ship, calibration_roots, threshold, version)
    run_dir = checkpoint.parent
    name = name or out.name.removesuffix(".onnx")
    samples = select_samples(calibration_roots, run_dir, calibration_images, evaluation_images)

    model = load_checkpoint(checkpoint)
    input_size = check_model(model)
    check_estimated_size(model, ship, max_bytes)
    out.parent.mkdir(parents=True, exist_ok=True)

    evaluation = load_evaluation_images(samples.evaluation, input_size)
    with tempfile.TemporaryDirectory(prefix=f".{name}-export-", dir=out.parent) as work_name:
        work = Path(work_name)
        paths = {"float32": work / "float32.onnx"}
        converter = convert_keras_to_onnx(model, paths["float32"], input_size, opset)
        verification = verify_parity(model, paths["float32"], input_size, evaluation.batch)
        logger.info(
            "Keras and ONNX Runtime agree within %.2e (tolerance %.0e)",
            verification["max_abs_diff"],
            PARITY_TOLERANCE,
        )
        if "float16" in wanted:
            paths["float16"] = work / "float16.onnx"
            write_float16_storage(paths["float32"], paths["float16"])
        if "int8" in wanted:
            paths["int8"] = work / "int8.onnx"
            calibration = [
                preprocess(decode_image(sample.image_path), input_size) for sample in samples.calibration
            ]
            quantize_int8(paths["float32"], paths["int8"], calibration)
        measured = measure_variants(paths, evaluation, threshold)
        del model  # the Keras model is no longer needed; free it before writing the files

        card = build_card(
            name=name,
            version=version,
            input_size=input_size,
            threshold=threshold,
            checkpoint=checkpoint,
            opset=opset,
            converter=converter,
            verification=verification,
            normalization=describe_normalization(load_checkpoint_config(run_dir)),
            samples=samples,
            calibration_roots=calibration_roots,
        )
        files = {precision: variant_path(out, precision, ship) for precision in paths}
        card["variants"] = {
            precision: {"file": files[precision].name, **measured[precision]} for precision in paths
        }
        for precision in paths:
            if precision != ship:
                write_with_metadata(paths[precision], files[precision], card, precision)
        write_with_metadata(paths[ship], work / "shipped.onnx", card, ship)
        size = (work / "shipped.onnx").stat().st_size
        if max_bytes is not None and size > max_bytes:
            others = ", ".join(str(files[p]) for p in paths if p != ship) or "none"
            raise ExportError(
                f"the {ship} model is {size / 2**20:.1f} MiB, over the {max_bytes / 2**20:.0f} MiB allowed "
                f"for the shipped model; {out} was not written (other precisions written: {others})"
            )
        if size > MAX_SHIPPED_BYTES:
            logger.warning(
                "%s is %.1f MiB, over the 64 MiB a model committed to git may have", out, size / 2**20
            )
        os.replace(work / "shipped.onnx", out)

    card["precision"] = ship
    sidecar = build_sidecar(card, files)
    out.with_suffix(".json").write_text(
        json.dumps(sidecar, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    if triton_dir is not None:
        write_triton_repository(Path(triton_dir), out, input_size)
    logger.info("wrote %s (%s) and its card %s", out, ship, out.with_suffix(".json"))
    return sidecar


def _check_arguments(
    checkpoint: Path,
    out: Path,
    opset: int,
    variants: Sequence[str],
    ship: str,
    calibration_roots: Sequence[Path],
    threshold: float,
    version: str,
) -> set[str]:
    """Validates everything that can be checked before loading TensorFlow; returns the precisions to make."""
    if not checkpoint.exists():
        raise ExportError(f"checkpoint not found: {checkpoint}")
    if out.suffix != ".onnx":
        raise ExportError(f"the output must be an .onnx file, not {out}")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(
            f"opset must be between {MIN_OPSET} and {MAX_OPSET} (what tf2onnx supports), not {opset}"
        )
    unknown = [variant for variant in (*variants, ship) if variant not in PRECISIONS]
    if unknown:
        raise ExportError(f"unknown precision {unknown[0]!r}: choose from {', '.join(PRECISIONS)}")
    if not 0.0 < threshold < 1.0:
        raise ExportError(f"threshold must be between 0 and 1, not {threshold}")
    if not version.strip():
        raise ExportError("version must not be empty")
    for root in calibration_roots:
        if not Path(root).is_dir():
            raise ExportError(f"calibration data folder not found: {root}")
    wanted = {"float32", ship, *variants}
    if "int8" in wanted and not calibration_roots:
        raise ExportError(
            "int8 needs real photos to calibrate on (--calibration-data DIR): calibrated on random noise the "
            "quantized network loses the lesions entirely"
        )
    return wanted
