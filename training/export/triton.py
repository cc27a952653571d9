"""The Triton model repository: ``DIR/dermaseg/config.pbtxt`` and ``DIR/dermaseg/1/model.onnx``."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from service.inference import INPUT_NAME, OUTPUT_NAME

logger = logging.getLogger(__name__)

TRITON_MODEL_NAME = "dermaseg"
TRITON_MAX_BATCH_SIZE = 16
TRITON_PREFERRED_BATCH_SIZES = (4, 8, 16)
TRITON_MAX_QUEUE_DELAY_US = 2000


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
