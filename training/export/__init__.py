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

from training.export.card import INTENDED_USE, build_card, tool_versions
from training.export.convert import (
    MAX_OPSET,
    MIN_OPSET,
    apply_contract_names,
    as_float32,
    convert_keras_to_onnx,
)
from training.export.errors import ExportError
from training.export.exporter import MAX_SHIPPED_BYTES, export_cli, export_model
from training.export.parity import (
    LATENCY_RUNS,
    PARITY_TOLERANCE,
    mean_dice,
    measure_variants,
    predict_masks,
    verify_parity,
)
from training.export.photos import CALIBRATION_IMAGES, EVALUATION_IMAGES, SELECTION_SEED
from training.export.triton import (
    TRITON_MAX_BATCH_SIZE,
    TRITON_MAX_QUEUE_DELAY_US,
    TRITON_MODEL_NAME,
    TRITON_PREFERRED_BATCH_SIZES,
    triton_config,
    write_triton_repository,
)
from training.export.variants import (
    BYTES_PER_WEIGHT,
    FLOAT16_MAX,
    FLOAT16_MIN_ELEMENTS,
    PRECISIONS,
    VARIANT_SUFFIXES,
    quantize_int8,
    write_float16_storage,
)

__all__ = [
    "BYTES_PER_WEIGHT",
    "CALIBRATION_IMAGES",
    "EVALUATION_IMAGES",
    "FLOAT16_MAX",
    "FLOAT16_MIN_ELEMENTS",
    "INTENDED_USE",
    "LATENCY_RUNS",
    "MAX_OPSET",
    "MAX_SHIPPED_BYTES",
    "MIN_OPSET",
    "PARITY_TOLERANCE",
    "PRECISIONS",
    "SELECTION_SEED",
    "TRITON_MAX_BATCH_SIZE",
    "TRITON_MAX_QUEUE_DELAY_US",
    "TRITON_MODEL_NAME",
    "TRITON_PREFERRED_BATCH_SIZES",
    "VARIANT_SUFFIXES",
    "ExportError",
    "apply_contract_names",
    "as_float32",
    "build_card",
    "convert_keras_to_onnx",
    "export_cli",
    "export_model",
    "mean_dice",
    "measure_variants",
    "predict_masks",
    "quantize_int8",
    "tool_versions",
    "triton_config",
    "verify_parity",
    "write_float16_storage",
    "write_triton_repository",
]
