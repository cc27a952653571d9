"""Keras checkpoint → verified ONNX model that describes itself, its smaller variants and a Triton layout.

``dermaseg export`` converts a ``.keras`` checkpoint with tf2onnx, proves the result (Keras and ONNX Runtime
agree within :data:`PARITY_TOLERANCE` on real and random inputs, at batch 1 and 3), writes the model card
into the file (``metadata_props``, read back by :class:`service.inference.OnnxModel`) and beside it
(``NAME.json``, with the file's sha256), and optionally:

* a **float16** variant: weights stored as float16 and cast back to float32 when the session loads (ONNX
  Runtime folds the casts), so it is half the size and runs at float32 speed on every provider;
* an **int8** variant: static QDQ quantization calibrated on real photos (never on noise, which destroys
  the masks), with the probability head kept in float32;
* a **Triton** model repository (``DIR/dermaseg/config.pbtxt`` and ``DIR/dermaseg/1/model.onnx``).

Each variant's size, batch-1 latency and Dice against the float32 masks and the expert masks go into the
card. ``--ship`` chooses which precision is written to ``--out``; it must fit :data:`MAX_SHIPPED_BYTES`.

TensorFlow, Keras, tf2onnx and onnx are imported inside the functions that need them, so that
``training.cli`` can import :class:`ExportError` without loading any of them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from service.imaging import decode_image, load_mask
from service.inference import INPUT_NAME, META_PREFIX, OUTPUT_NAME, OnnxModel, sha256_file
from service.pipeline import DEFAULT_THRESHOLD, postprocess, preprocess

logger = logging.getLogger(__name__)

PRECISIONS = ("float32", "float16", "int8")
#: File name endings of the precisions that are not shipped (the shipped one is written to ``--out``).
VARIANT_SUFFIXES = {"float32": ".fp32.onnx", "float16": ".fp16.onnx", "int8": ".int8.onnx"}
#: Bytes per weight, for the size estimate made before converting.
BYTES_PER_WEIGHT = {"float32": 4, "float16": 2, "int8": 1}
#: tf2onnx 1.17 converts up to opset 18; 17 is the oldest with everything the network needs.
MIN_OPSET, MAX_OPSET = 17, 18
#: Largest absolute difference allowed between Keras and ONNX Runtime probabilities.
PARITY_TOLERANCE = 1e-4
#: The shipped model is committed to git: at most 64 MiB.
MAX_SHIPPED_BYTES = 64 * 2**20
#: Photos used to calibrate int8 and to compare the variants' masks (at most).
CALIBRATION_IMAGES = 64
EVALUATION_IMAGES = 32
#: Timed runs for the batch-1 latency (after one warm-up run).
LATENCY_RUNS = 10
#: Float initializers with fewer elements stay float32 in the float16 variant (a Cast each is not worth it).
FLOAT16_MIN_ELEMENTS = 1024
FLOAT16_MAX = 65504.0

TRITON_MODEL_NAME = "dermaseg"
TRITON_MAX_BATCH_SIZE = 16
TRITON_PREFERRED_BATCH_SIZES = (4, 8, 16)
TRITON_MAX_QUEUE_DELAY_US = 2000

INTENDED_USE = "research use, not for diagnosis"
#: Seed of the calibration / evaluation draw when the run has no split.json.
SELECTION_SEED = 0


class ExportError(ValueError):
    """The export cannot be done (bad arguments, missing files) or its result failed a check."""


# ------------------------------------------------------------------------------------------------------------
# Entry points


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
    samples = _select_samples(calibration_roots, run_dir, calibration_images, evaluation_images)

    model = _load_checkpoint(checkpoint)
    input_size = _check_model(model)
    _check_estimated_size(model, ship, max_bytes)
    out.parent.mkdir(parents=True, exist_ok=True)

    evaluation = _load_evaluation_images(samples.evaluation, input_size)
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
            normalization=_describe_normalization(_load_checkpoint_config(run_dir)),
            samples=samples,
            calibration_roots=calibration_roots,
        )
        files = {precision: _final_path(out, precision, ship) for precision in paths}
        card["variants"] = {
            precision: {"file": files[precision].name, **measured[precision]} for precision in paths
        }
        for precision in paths:
            if precision != ship:
                _write_with_metadata(paths[precision], files[precision], card, precision)
        _write_with_metadata(paths[ship], work / "shipped.onnx", card, ship)
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
    sidecar = _sidecar(card, files)
    out.with_suffix(".json").write_text(
        json.dumps(sidecar, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    if triton_dir is not None:
        write_triton_repository(Path(triton_dir), out, input_size)
    logger.info("wrote %s (%s) and its card %s", out, ship, out.with_suffix(".json"))
    return sidecar


# ------------------------------------------------------------------------------------------------------------
# Checks


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


def _load_checkpoint(checkpoint: Path) -> Any:
    """Loads a ``.keras`` checkpoint without its optimizer state, as a float32 model."""
    import keras

    import training.losses  # noqa: F401  (registers the focal loss, which a compiled checkpoint names)

    try:
        model = keras.models.load_model(checkpoint, compile=False)
    except Exception as error:  # Keras raises ValueError, OSError, TypeError … for unreadable files
        raise ExportError(f"cannot load the checkpoint {checkpoint}: {error}") from None
    return as_float32(model)


def as_float32(model: Any) -> Any:
    """Rebuilds a model trained under a mixed-precision policy with float32 layers (same weights).

    An ONNX graph with float16 / bfloat16 compute runs slowly or not at all on the CPU provider, and the
    service expects float32 throughout; the variables of a mixed-precision model are float32 already.
    """
    if all(getattr(layer.dtype_policy, "name", "float32") == "float32" for layer in model.layers):
        return model

    def to_float32(node: Any) -> Any:
        if isinstance(node, dict):
            if node.get("class_name") in ("DTypePolicy", "FloatDTypePolicy") and isinstance(
                node.get("config"), dict
            ):
                return {**node, "config": {**node["config"], "name": "float32"}}
            return {key: to_float32(value) for key, value in node.items()}
        if isinstance(node, list):
            return [to_float32(value) for value in node]
        if isinstance(node, str) and node.startswith("mixed_"):
            return "float32"
        return node

    rebuilt = model.__class__.from_config(to_float32(model.get_config()))
    rebuilt.set_weights(model.get_weights())
    logger.info("rebuilt the mixed-precision model with float32 layers for export")
    return rebuilt


def _check_model(model: Any) -> tuple[int, int]:
    """Checks the network against the ONNX contract; returns its ``(height, width)``."""
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ExportError(
            f"expected one input and one output, the model has {len(model.inputs)} and {len(model.outputs)}"
        )
    input_shape = tuple(model.inputs[0].shape)
    output_shape = tuple(model.outputs[0].shape)
    if len(input_shape) != 4 or input_shape[3] != 3 or not all(isinstance(s, int) for s in input_shape[1:3]):
        raise ExportError(f"expected an (N, H, W, 3) input of fixed size, not {input_shape}")
    height, width = int(input_shape[1]), int(input_shape[2])
    if output_shape[1:] != (height, width, 1):
        raise ExportError(f"expected an (N, {height}, {width}, 1) output, not {output_shape}")
    return height, width


def _check_estimated_size(model: Any, ship: str, max_bytes: int | None) -> None:
    """Fails before the (long) conversion when the shipped precision cannot fit ``max_bytes``."""
    if max_bytes is None:
        return
    weights = model.count_params()
    estimate = weights * BYTES_PER_WEIGHT[ship]
    if estimate > max_bytes * 1.02:  # the estimate ignores the graph itself; leave it a little room
        fitting = [p for p in PRECISIONS if weights * BYTES_PER_WEIGHT[p] <= max_bytes]
        estimates = ", ".join(f"{p} ≈ {weights * BYTES_PER_WEIGHT[p] / 2**20:.0f} MiB" for p in PRECISIONS)
        raise ExportError(
            f"{weights:,} weights do not fit {max_bytes / 2**20:.0f} MiB as {ship} ({estimates}); "
            + (
                f"ship {' or '.join(fitting)} instead"
                if fitting
                else "no precision fits: use a narrower decoder"
            )
            + (" (--ship int8 --calibration-data DIR)" if "int8" in fitting else "")
        )


# ------------------------------------------------------------------------------------------------------------
# Conversion


def convert_keras_to_onnx(model: Any, path: Path, input_size: tuple[int, int], opset: int) -> str:
    """Converts a Keras model to an ONNX file that keeps the DermaSeg contract; returns the converter used.

    tf2onnx first (``from_keras`` with an explicit input signature: Keras 3 models lack the attributes
    tf2onnx guessed the signature from, tensorflow-onnx #2329 / #2348 / #2448); Keras' own
    ``model.export(format="onnx")`` only if tf2onnx fails. Either way the input is renamed ``image``, the
    output ``probability``, and the batch dimension ``N``.
    """
    import tensorflow as tf

    height, width = input_size
    signature = (tf.TensorSpec((None, height, width, 3), tf.float32, name=INPUT_NAME),)
    try:
        _convert_with_tf2onnx(model, signature, opset, path)
        converter = "tf2onnx"
    except Exception as error:  # tf2onnx raises anything from its converters and optimizers
        logger.warning(
            "tf2onnx failed (%s: %s); exporting with keras model.export instead", type(error).__name__, error
        )
        try:
            model.export(
                str(path), format="onnx", input_signature=list(signature), opset_version=opset, verbose=False
            )
        except Exception as fallback_error:
            raise ExportError(
                f"ONNX conversion failed: tf2onnx: {error}; keras model.export: {fallback_error}"
            ) from None
        converter = "keras.export"
    import onnx

    proto = onnx.load(str(path))
    apply_contract_names(proto)
    versions = {entry.domain: entry.version for entry in proto.opset_import}
    if versions.get("", versions.get("ai.onnx")) != opset:
        raise ExportError(f"asked for opset {opset}, the converter wrote {versions}")
    onnx.save(proto, str(path))
    return converter


def _convert_with_tf2onnx(model: Any, signature: tuple[Any, ...], opset: int, path: Path) -> None:
    import tf2onnx

    logging.getLogger("tf2onnx").setLevel(logging.WARNING)
    try:
        with _lean_tf2onnx():
            tf2onnx.convert.from_keras(model, input_signature=signature, opset=opset, output_path=str(path))
    except Exception as error:
        logger.warning("tf2onnx with the memory workaround failed (%s); retrying it unpatched", error)
        tf2onnx.convert.from_keras(model, input_signature=signature, opset=opset, output_path=str(path))


@contextlib.contextmanager
def _lean_tf2onnx() -> Iterator[None]:
    """Keeps tf2onnx's graph optimizers from holding a copy of all weights per pass (7–9 GB → under 3 GB).

    Two things grow memory by one copy of the weights per optimizer pass (12 optimizers × 3 iterations):
    ``optimize_graph`` deep-copies the graph before each optimizer so that it can skip one that raises
    (``TF2ONNX_CATCH_ERRORS=FALSE`` turns that off: a failing optimizer then fails the conversion, and
    :func:`_convert_with_tf2onnx` retries without this workaround), and ``Node.update_proto`` rewrites the
    attributes of each NodeProto in place, where protobuf's upb backend keeps the replaced tensors alive in
    the message's arena until the message dies. Building a fresh NodeProto per update lets the old one go.
    The converted graph is the same, node for node.
    """
    from onnx import NodeProto
    from tf2onnx import graph as tf2onnx_graph

    def update_proto(self: Any, external_tensor_storage: Any = None) -> None:
        old = self._op
        proto = NodeProto(name=old.name, op_type=old.op_type, domain=old.domain, doc_string=old.doc_string)
        proto.input.extend(self.input)
        proto.output.extend(self.output)
        for attr_name, sub_graph in (self.get_body_graphs() or {}).items():
            graph_proto = sub_graph.make_graph(
                f"graph for {self.name} {attr_name}", external_tensor_storage=external_tensor_storage
            )
            self.set_attr(attr_name, graph_proto)
        proto.attribute.extend(self.get_onnx_attrs(external_tensor_storage).values())
        self._op = proto

    original = tf2onnx_graph.Node.update_proto
    previous = os.environ.get("TF2ONNX_CATCH_ERRORS")
    tf2onnx_graph.Node.update_proto = update_proto
    os.environ["TF2ONNX_CATCH_ERRORS"] = "FALSE"
    try:
        yield
    finally:
        tf2onnx_graph.Node.update_proto = original
        if previous is None:
            os.environ.pop("TF2ONNX_CATCH_ERRORS", None)
        else:
            os.environ["TF2ONNX_CATCH_ERRORS"] = previous


def apply_contract_names(proto: Any) -> None:
    """Renames the graph's one input ``image`` and one output ``probability``, and the batch axis ``N``."""
    graph = proto.graph
    initializers = {init.name for init in graph.initializer}
    inputs = [value for value in graph.input if value.name not in initializers]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise ExportError(
            f"the converted graph has {len(inputs)} inputs and {len(graph.output)} outputs, not 1 and 1"
        )
    for value, wanted in ((inputs[0], INPUT_NAME), (graph.output[0], OUTPUT_NAME)):
        if value.name != wanted:
            _rename_value(graph, value.name, wanted)
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].Clear()
            dims[0].dim_param = "N"


def _rename_value(graph: Any, old: str, new: str) -> None:
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.name == old:
            value.name = new
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name == old:
                node.input[index] = new
        for index, name in enumerate(node.output):
            if name == old:
                node.output[index] = new


# ------------------------------------------------------------------------------------------------------------
# Verification and measurement


@dataclass
class _Selection:
    """Photos drawn from the calibration folders."""

    calibration: list[Any] = field(default_factory=list)
    evaluation: list[Any] = field(default_factory=list)
    source: str = "none"
    disjoint: bool = True


@dataclass
class _EvaluationImages:
    """Decoded validation photos, their masks, and the network-size batch made of them."""

    images: list[np.ndarray] = field(default_factory=list)
    truths: list[np.ndarray] = field(default_factory=list)
    batch: np.ndarray | None = None


def _select_samples(
    roots: Sequence[Path], run_dir: Path, calibration_count: int, evaluation_count: int
) -> _Selection:
    """Chooses calibration and evaluation photos: the run's validation images for evaluation when known.

    With ``RUN_DIR/split.json``, evaluation photos are those of its validation side found in ``roots`` and
    calibration photos are the others (so int8 is not calibrated on the images it is judged on); without
    one, a seeded shuffle of ``roots`` is cut in two. Both are capped at the counts given.
    """
    if not roots:
        return _Selection()
    from training.data import DataError, load_samples, load_split

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
        return _Selection(
            calibration=[rest[i] for i in order[:calibration_count]],
            evaluation=held_out[:evaluation_count],
            source=f"validation images of {run_dir / 'split.json'}",
            disjoint=rest is not held_out,
        )
    order = [samples[i] for i in np.random.default_rng(SELECTION_SEED).permutation(len(samples))]
    if len(order) == 1:
        return _Selection(calibration=order, evaluation=order, source="the one image given", disjoint=False)
    evaluation = order[: min(evaluation_count, len(order) // 2)]
    calibration = order[len(evaluation) :][:calibration_count]
    return _Selection(
        calibration, evaluation, source="a seeded draw from the calibration folders", disjoint=True
    )


def _load_evaluation_images(samples: Sequence[Any], input_size: tuple[int, int]) -> _EvaluationImages:
    if not samples:
        return _EvaluationImages()
    images = [decode_image(sample.image_path) for sample in samples]
    truths = [load_mask(sample.mask_path) for sample in samples]
    for sample, image, truth in zip(samples, images, truths, strict=True):
        if truth.shape != image.shape[:2]:
            raise ExportError(f"{sample.mask_path}: mask is {truth.shape[::-1]}, image {image.shape[1::-1]}")
    batch = np.stack([preprocess(image, input_size) for image in images])
    return _EvaluationImages(images=images, truths=truths, batch=batch)


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
    paths: dict[str, Path], evaluation: _EvaluationImages, threshold: float
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


# ------------------------------------------------------------------------------------------------------------
# Variants


def write_float16_storage(source: Path, target: Path, min_elements: int = FLOAT16_MIN_ELEMENTS) -> int:
    """Writes a copy of ``source`` whose large float32 weights are stored as float16 (half the file).

    Each converted initializer ``w`` becomes a float16 initializer ``w_fp16`` and a ``Cast(to=float)`` node
    whose output keeps the name ``w``, so the rest of the graph is untouched and still computes in float32;
    ONNX Runtime folds the casts when it loads the model (upcast at load), so it runs at float32 speed on
    the CPU provider, which has few float16 kernels. Weights outside the float16 range stay float32.

    Returns:
        The number of initializers converted.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    proto = onnx.load(str(source))
    graph = proto.graph
    graph_inputs = {value.name for value in graph.input}
    kept, casts = [], []
    for initializer in graph.initializer:
        size = int(np.prod(initializer.dims)) if initializer.dims else 1
        if (
            initializer.data_type != TensorProto.FLOAT
            or size < min_elements
            or initializer.name in graph_inputs
        ):
            kept.append(initializer)
            continue
        weights = numpy_helper.to_array(initializer)
        if not np.all(np.isfinite(weights)) or np.max(np.abs(weights)) > FLOAT16_MAX:
            kept.append(initializer)
            continue
        stored = f"{initializer.name}_fp16"
        kept.append(numpy_helper.from_array(weights.astype(np.float16), stored))
        casts.append(
            helper.make_node(
                "Cast", [stored], [initializer.name], to=TensorProto.FLOAT, name=f"{initializer.name}_upcast"
            )
        )
    graph.ClearField("initializer")
    graph.initializer.extend(kept)
    nodes = [*casts, *graph.node]
    graph.ClearField("node")
    graph.node.extend(nodes)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(target))
    logger.info("float16 storage: %d weight tensors converted", len(casts))
    return len(casts)


class _CalibrationReader:
    """Feeds preprocessed photos one at a time to ONNX Runtime's calibrator."""

    def __init__(self, images: Sequence[np.ndarray]) -> None:
        self.images = list(images)
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.images):
            return None
        image = self.images[self.position]
        self.position += 1
        return {INPUT_NAME: image[None].astype(np.float32)}

    def rewind(self) -> None:
        self.position = 0


def _probability_head_nodes(proto: Any) -> list[str]:
    """Names of the nodes from the output back to (and including) the last Conv: kept in float32."""
    producers = {output: node for node in proto.graph.node for output in node.output}
    names: list[str] = []
    tensor = proto.graph.output[0].name
    while tensor in producers:
        node = producers[tensor]
        names.append(node.name)
        if node.op_type == "Conv" or not node.input:
            break
        tensor = node.input[0]
    return names


def quantize_int8(source: Path, target: Path, calibration: Sequence[np.ndarray]) -> None:
    """Static int8 quantization (QDQ, per-channel weights), calibrated on preprocessed real photos.

    The graph is prepared with ``quant_pre_process`` (shape inference and fusions), activations are
    calibrated by min–max over ``calibration``, and the probability head (last Conv and sigmoid) stays
    float32 so that the probabilities near the threshold keep their resolution.

    Raises:
        ExportError: no calibration photos.
    """
    if not calibration:
        raise ExportError("int8 quantization needs calibration photos; none were found")
    if len(calibration) < 16:
        logger.warning(
            "calibrating int8 on %d photos only; 50 or more give steadier ranges", len(calibration)
        )
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = target.with_name(target.stem + ".prepared.onnx")
    quant_pre_process(str(source), str(prepared))
    head = _probability_head_nodes(onnx.load(str(prepared), load_external_data=False))

    class Reader(_CalibrationReader, CalibrationDataReader):
        pass

    quantize_static(
        str(prepared),
        str(target),
        Reader(calibration),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        nodes_to_exclude=head,
        # No CalibMaxIntermediateOutputs: in onnxruntime ≤ 1.32 it drops each full chunk of photos without
        # computing its ranges (microsoft/onnxruntime#18893). Not needed either: the min-max calibrator keeps
        # only each tensor's ReduceMin / ReduceMax per photo, not the tensors themselves.
    )
    prepared.unlink(missing_ok=True)
    logger.info("int8: calibrated on %d photos; kept in float32: %s", len(calibration), ", ".join(head))


# ------------------------------------------------------------------------------------------------------------
# Model card


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        logger.warning("ignoring %s: %s", path, error)
        return None


def _load_checkpoint_config(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "config.json"
    config = _read_json(path) if path.is_file() else None
    return config if isinstance(config, dict) else None


def _describe_normalization(config: dict[str, Any] | None) -> str:
    arch = (config or {}).get("arch", "resnet50v2-unet")
    inside = "x/255" if arch == "unet" else "x/127.5−1"
    return f"RGB 0–255 float32; the network rescales internally {inside}"


def _training_section(run_dir: Path) -> dict[str, Any]:
    """The run's configuration, data, split and summary, from the files beside the checkpoint."""
    config = _load_checkpoint_config(run_dir)
    section: dict[str, Any] = {"run_dir": str(run_dir.resolve()), "config": config}
    data: dict[str, Any] = {"roots": (config or {}).get("data", [])}
    split_path = run_dir / "split.json"
    split = _read_json(split_path) if split_path.is_file() else None
    if (
        isinstance(split, dict)
        and isinstance(split.get("train"), list)
        and isinstance(split.get("val"), list)
    ):
        data.update(
            {
                "split_seed": split.get("seed"),
                "val_fraction": split.get("val_fraction"),
                "train_count": len(split["train"]),
                "val_count": len(split["val"]),
                "datasets": sorted({str(entry.get("dataset")) for entry in split["train"] + split["val"]}),
                "val_ids": [f"{entry.get('dataset')}/{entry.get('id')}" for entry in split["val"]],
            }
        )
    section["data"] = data
    summary_path = run_dir / "summary.json"
    summary = _read_json(summary_path) if summary_path.is_file() else None
    if isinstance(summary, dict):
        section["summary"] = {
            key: summary[key]
            for key in ("best_epoch", "best_val_loss", "best_val_metrics", "epochs")
            if key in summary
        }
    return section


def _evaluation_section(run_dir: Path) -> list[dict[str, Any]]:
    """Evaluation results beside the checkpoint (``eval_*.json``, ``metrics.json``), minus per-image rows."""
    results = []
    for path in [*sorted(run_dir.glob("eval_*.json")), run_dir / "metrics.json"]:
        document = _read_json(path) if path.is_file() else None
        if isinstance(document, dict):
            entry = {key: value for key, value in document.items() if key != "per_image"}
            entry["file"] = path.name
            entry.setdefault("data", None)
            entry.setdefault("date", None)
            results.append(entry)
    return results


def _git_commit() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit or "unknown"


def tool_versions() -> dict[str, str]:
    """Versions of the tools that made the model."""
    import keras
    import onnx
    import onnxruntime
    import tensorflow as tf
    import tf2onnx

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "tf2onnx": tf2onnx.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
    }


def build_card(
    *,
    name: str,
    version: str,
    input_size: tuple[int, int],
    threshold: float,
    checkpoint: Path,
    opset: int,
    converter: str,
    verification: dict[str, Any],
    normalization: str,
    samples: _Selection,
    calibration_roots: Sequence[Path],
) -> dict[str, Any]:
    """The model card (MONAI-bundle style): what the model is, how it was made and measured, and for what."""
    height, width = input_size
    run_dir = checkpoint.parent
    return {
        "name": name,
        "version": version,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "intended_use": INTENDED_USE,
        "input": {
            "name": INPUT_NAME,
            "dtype": "float32",
            "shape": ["N", height, width, 3],
            "layout": "NHWC",
            "channels": "RGB",
            "range": [0, 255],
        },
        "output": {
            "name": OUTPUT_NAME,
            "dtype": "float32",
            "shape": ["N", height, width, 1],
            "layout": "NHWC",
            "meaning": "lesion probability",
            "range": [0, 1],
        },
        "input_size": f"{height}x{width}",
        "threshold": threshold,
        "normalization": normalization,
        "postprocess": "resize the probability back to the photo's size (bilinear), then threshold (≥)",
        "training": _training_section(run_dir),
        "evaluation": _evaluation_section(run_dir),
        "export": {
            "checkpoint": str(checkpoint.resolve()),
            "converter": converter,
            "opset": opset,
            "verification": verification,
            "photos": {
                "roots": [str(Path(root).resolve()) for root in calibration_roots],
                "calibration_count": len(samples.calibration),
                "evaluation_count": len(samples.evaluation),
                "evaluation_source": samples.source,
                "disjoint": samples.disjoint,
            },
            "git_commit": _git_commit(),
            "tools": tool_versions(),
            "host": platform.platform(),
        },
    }


def _final_path(out: Path, precision: str, ship: str) -> Path:
    if precision == ship:
        return out
    return out.with_name(out.name.removesuffix(".onnx") + VARIANT_SUFFIXES[precision])


def _write_with_metadata(source: Path, target: Path, card: dict[str, Any], precision: str) -> None:
    """Copies an ONNX file, writing the contract's metadata_props and this file's card into it."""
    import onnx

    proto = onnx.load(str(source))
    file_card = {**card, "precision": precision}
    metadata = {
        "name": card["name"],
        "version": card["version"],
        "input_size": card["input_size"],
        "threshold": repr(float(card["threshold"])),
        "precision": precision,
        "card": json.dumps(file_card, ensure_ascii=False, separators=(",", ":")),
    }
    kept = [entry for entry in proto.metadata_props if not entry.key.startswith(META_PREFIX)]
    proto.ClearField("metadata_props")
    proto.metadata_props.extend(kept)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = META_PREFIX + key, value
    proto.producer_name = "dermaseg"
    proto.model_version = _integer_version(card["version"])
    proto.doc_string = (
        f"{card['name']} {card['version']} ({precision}): skin-lesion segmentation, {INTENDED_USE}"
    )
    onnx.save(proto, str(target))


def _integer_version(version: str) -> int:
    """ONNX's model_version is an integer: ``1.2.3`` → 1002003, anything else → 0."""
    parts = version.split(".")
    if len(parts) == 3 and all(part.isdigit() for part in parts):
        return int(parts[0]) * 1_000_000 + int(parts[1]) * 1_000 + int(parts[2])
    return 0


def _sidecar(card: dict[str, Any], files: dict[str, Path]) -> dict[str, Any]:
    """The card as written beside the model: plus the sha256 of the shipped file and of each variant."""
    sidecar = json.loads(json.dumps(card))
    shipped = files[card["precision"]]
    sidecar["file"] = shipped.name
    sidecar["sha256"] = sha256_file(shipped)
    for precision, path in files.items():
        sidecar["variants"][precision]["sha256"] = sha256_file(path)
    return sidecar


# ------------------------------------------------------------------------------------------------------------
# Triton


def triton_config(input_size: tuple[int, int]) -> str:
    """``config.pbtxt`` of the ONNX model in a Triton model repository (batch axis left to Triton)."""
    height, width = input_size
    preferred = ", ".join(str(size) for size in TRITON_PREFERRED_BATCH_SIZES)
    return (
        f'name: "{TRITON_MODEL_NAME}"\n'
        'platform: "onnxruntime_onnx"\n'
        f"max_batch_size: {TRITON_MAX_BATCH_SIZE}\n"
        "input [\n"
        "  {\n"
        f'    name: "{INPUT_NAME}"\n'
        "    data_type: TYPE_FP32\n"
        f"    dims: [ {height}, {width}, 3 ]\n"
        "  }\n"
        "]\n"
        "output [\n"
        "  {\n"
        f'    name: "{OUTPUT_NAME}"\n'
        "    data_type: TYPE_FP32\n"
        f"    dims: [ {height}, {width}, 1 ]\n"
        "  }\n"
        "]\n"
        "dynamic_batching {\n"
        f"  preferred_batch_size: [ {preferred} ]\n"
        f"  max_queue_delay_microseconds: {TRITON_MAX_QUEUE_DELAY_US}\n"
        "}\n"
    )


def write_triton_repository(directory: Path, model_path: Path, input_size: tuple[int, int]) -> Path:
    """Writes ``directory/dermaseg/1/model.onnx`` and ``directory/dermaseg/config.pbtxt``.

    Returns:
        The model's folder, ``directory/dermaseg``.
    """
    model_dir = Path(directory) / TRITON_MODEL_NAME
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_path, model_dir / "1" / "model.onnx")
    (model_dir / "config.pbtxt").write_text(triton_config(input_size), encoding="utf-8")
    logger.info("wrote the Triton model repository %s", model_dir)
    return model_dir
