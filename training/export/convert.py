"""Keras checkpoint → ONNX with tf2onnx, under the DermaSeg contract's input and output names."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from service.inference import INPUT_NAME, OUTPUT_NAME
from training.export.errors import ExportError

logger = logging.getLogger(__name__)

#: tf2onnx 1.17 converts up to opset 18; 17 is the oldest with everything the network needs.
MIN_OPSET, MAX_OPSET = 17, 18


def load_checkpoint(checkpoint: Path) -> Any:
    """Loads a ``.keras`` checkpoint without its optimizer state, as a float32 model."""
    from training.model import load_network

    try:
        model = load_network(checkpoint)
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


def check_model(model: Any) -> tuple[int, int]:
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
