"""The smaller precisions: float16 weight storage and int8 quantization calibrated on real photos."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from service.inference import INPUT_NAME
from training.export.errors import ExportError

logger = logging.getLogger(__name__)

PRECISIONS = ("float32", "float16", "int8")
#: File name endings of the precisions that are not shipped (the shipped one is written to ``--out``).
VARIANT_SUFFIXES = {"float32": ".fp32.onnx", "float16": ".fp16.onnx", "int8": ".int8.onnx"}
#: Bytes per weight, for the size estimate made before converting.
BYTES_PER_WEIGHT = {"float32": 4, "float16": 2, "int8": 1}
#: Float initializers with fewer elements stay float32 in the float16 variant (a Cast each is not worth it).
FLOAT16_MIN_ELEMENTS = 1024
FLOAT16_MAX = 65504.0


def variant_path(out: Path, precision: str, ship: str) -> Path:
    """Where a precision's file goes: ``out`` for the shipped one, ``NAME.fp32.onnx`` etc. beside it."""
    if precision == ship:
        return out
    return out.with_name(out.name.removesuffix(".onnx") + VARIANT_SUFFIXES[precision])


def check_estimated_size(model: Any, ship: str, max_bytes: int | None) -> None:
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
