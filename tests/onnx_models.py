"""Tiny but real DermaSeg ONNX models for tests, built with ``onnx.helper`` (no TensorFlow).

The "darkness" model follows the DermaSeg ONNX contract (docs/design.md): input ``image`` float32
``(N, H, W, 3)`` RGB 0–255, output ``probability`` float32 ``(N, H, W, 1)``, and the ``dermaseg.*``
metadata. It calls a pixel lesion when it is darker than ``gray_level``:
``probability = sigmoid(steepness · (gray_level − mean(R, G, B)))`` — lesions are darker than skin, so it
even roughly works on dermoscopic photos.

Run ``python -m tests.onnx_models models/dermaseg.onnx`` to write one (e.g. for a container smoke test).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

TINY_NAME = "dermaseg-test-darkness"
TINY_VERSION = "0.0.1-test"
TINY_CARD: dict[str, Any] = {
    "name": TINY_NAME,
    "version": TINY_VERSION,
    "intended_use": "tests only: a pixel is lesion when it is darker than a gray level",
    "input": {"name": "image", "dtype": "float32", "layout": "NHWC", "range": [0, 255]},
    "output": {"name": "probability", "dtype": "float32", "range": [0, 1]},
}


def build_darkness_model(
    input_size: tuple[int, int] = (64, 64),
    *,
    gray_level: float = 128.0,
    steepness: float = 0.1,
    threshold: float = 0.5,
    name: str = TINY_NAME,
    version: str = TINY_VERSION,
    card: dict[str, Any] | None = None,
    metadata: bool = True,
) -> onnx.ModelProto:
    """An ONNX model (opset 17, IR 9) that calls dark pixels lesion; ``input_size = (height, width)``."""
    height, width = input_size
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", height, width, 3])
    probability = helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["N", height, width, 1])
    constants = [
        helper.make_tensor("gray_level", TensorProto.FLOAT, [], [gray_level]),
        helper.make_tensor("steepness", TensorProto.FLOAT, [], [steepness]),
    ]
    nodes = [
        helper.make_node("ReduceMean", ["image"], ["gray"], axes=[3], keepdims=1),
        helper.make_node("Sub", ["gray_level", "gray"], ["darkness"]),
        helper.make_node("Mul", ["darkness", "steepness"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["probability"]),
    ]
    graph = helper.make_graph(nodes, "darkness", [image], [probability], initializer=constants)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="dermaseg-tests", ir_version=9
    )
    if metadata:
        props = {
            "dermaseg.name": name,
            "dermaseg.version": version,
            "dermaseg.input_size": f"{height}x{width}",
            "dermaseg.threshold": str(threshold),
            "dermaseg.card": json.dumps(card if card is not None else TINY_CARD),
        }
        helper.set_model_props(model, props)
    onnx.checker.check_model(model)
    return model


def write_darkness_model(path: str | Path, **kwargs: Any) -> Path:
    """Writes :func:`build_darkness_model` to ``path`` (folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(build_darkness_model(**kwargs), str(path))
    return path


def darkness_reference(batch: np.ndarray, gray_level: float = 128.0, steepness: float = 0.1) -> np.ndarray:
    """What the darkness model computes, in numpy: ``(N, H, W, 3)`` → ``(N, H, W, 1)``."""
    gray = np.asarray(batch, dtype=np.float32).mean(axis=3, keepdims=True)
    probability: np.ndarray = (1.0 / (1.0 + np.exp(-steepness * (gray_level - gray)))).astype(np.float32)
    return probability


def write_not_a_dermaseg_model(path: str | Path) -> Path:
    """A valid ONNX file that breaks the contract (a 2-D input): loading it must fail clearly."""
    vector = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    graph = helper.make_graph([helper.make_node("Sigmoid", ["x"], ["y"])], "vector", [vector], [output])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    path = Path(path)
    onnx.save(model, str(path))
    return path


if __name__ == "__main__":
    target = write_darkness_model(sys.argv[1] if len(sys.argv) > 1 else "models/dermaseg.onnx")
    print(f"wrote {target}")
