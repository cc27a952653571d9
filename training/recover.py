"""Recovers a trainable Keras checkpoint from an exported ONNX model, for a warm start.

A release ships as ONNX only; its ``.keras`` checkpoint lives in ``runs/``, which is not kept. To start a
new release from the weights of the shipped one (``dermaseg train --init-from``), this module reads them
back out of the ONNX file.

The export changed the weights' form, never their function, and this undoes it:

- tf2onnx folded each batch normalization that follows a convolution into that convolution (kernel
  scaled, the shift as a bias), and wrote the pre-activation ones (``*_preact_bn``, ``post_bn``) as a
  multiply and an add; all in NCHW / OIHW order, stored as float16.
- Here each convolution gets the folded kernel back (HWIO), and each batch normalization becomes the
  affine map it was at inference: ``y = scale · x + shift``.
- A batch normalization trains on batch statistics, so the affine map alone would train as a different
  function. The running statistics are therefore measured on real photos (one forward pass), and
  ``gamma`` / ``beta`` chosen so that normalizing by them gives the same map:
  ``gamma = scale · sqrt(var + ε)``, ``beta = shift + scale · mean``. The network then computes what the
  ONNX file computes both at inference and, up to batch noise, in training.

:func:`recover_checkpoint` checks the result against ONNX Runtime on the same photos and refuses a
checkpoint whose probabilities differ by more than ``tolerance``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import onnx
from onnx import numpy_helper

from service.imaging import decode_image
from service.inference import OnnxModel
from training.model import build_model

logger = logging.getLogger(__name__)

#: The Keras layer a tf2onnx tensor name belongs to: ``<model>_1/<layer>_1/...``.
_LAYER = re.compile(r"^[^/]+/(?P<layer>[A-Za-z0-9_]+?)_1/")


class RecoverError(ValueError):
    """The ONNX file is not an export of a network this code builds, or the recovery does not match it."""


@dataclass
class _Affine:
    """A batch normalization as the ONNX file computes it: ``scale · x + shift`` per channel."""

    scale: np.ndarray
    shift: np.ndarray


def _layer_of(tensor_name: str) -> str | None:
    match = _LAYER.match(tensor_name)
    return match.group("layer") if match else None


def read_onnx_weights(path: Path) -> tuple[dict[str, list[np.ndarray]], dict[str, _Affine]]:
    """Reads the convolution weights (Keras layout) and batch-normalization maps out of an ONNX export.

    Returns:
        ``(convolutions, batch_norms)``: Keras layer name → ``[kernel]`` or ``[kernel, bias]``; and batch
        normalization layer name → its affine map. A bias that tf2onnx took from a folded batch
        normalization is returned as that layer's shift (scale 1), not as a convolution bias.
    """
    graph = onnx.load(str(path)).graph
    constants = {
        tensor.name: numpy_helper.to_array(tensor).astype(np.float32) for tensor in graph.initializer
    }
    # Cast nodes turn the float16 initializers into float32 inputs: follow them back.
    for node in graph.node:
        if node.op_type == "Cast" and node.input[0] in constants:
            constants[node.output[0]] = constants[node.input[0]]
    producers = {output: node for node in graph.node for output in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    convolutions: dict[str, list[np.ndarray]] = {}
    batch_norms: dict[str, _Affine] = {}
    for node in graph.node:
        if node.op_type in ("Conv", "ConvTranspose"):
            weight_name = _source_name(node.input[1], producers)
            layer = _layer_of(weight_name)
            if layer is None or node.input[1] not in constants:
                raise RecoverError(f"cannot tell which layer the ONNX node {node.name} belongs to")
            kernel = constants[node.input[1]].transpose(2, 3, 1, 0)  # OIHW / IOHW → HWIO / HWOI
            bias = constants[node.input[2]].reshape(-1) if len(node.input) > 2 else None
            if "merged_input" in weight_name:  # a folded batch normalization: its shift is the bias
                bias_layer = _layer_of(_source_name(node.input[2], producers))
                if bias_layer is None or bias is None:
                    raise RecoverError(f"the folded convolution {layer} has no batch-normalization shift")
                batch_norms[bias_layer] = _Affine(np.ones_like(bias), bias)
                convolutions[layer] = [kernel]
            else:
                convolutions[layer] = [kernel] if bias is None else [kernel, bias]
        elif node.op_type == "Mul" and node.name.endswith("/batchnorm/mul_1"):
            layer = _layer_of(node.name + "/")
            (add,) = consumers.get(node.output[0], [])
            if layer is None or node.input[1] not in constants or add.op_type != "Add":
                raise RecoverError(f"unexpected batch-normalization form at {node.name}")
            batch_norms[layer] = _Affine(
                constants[node.input[1]].reshape(-1), constants[add.input[1]].reshape(-1)
            )
    return convolutions, batch_norms


def _source_name(tensor: str, producers: dict[str, onnx.NodeProto]) -> str:
    """The name of the initializer behind ``tensor`` (through a Cast), or ``tensor`` itself."""
    node = producers.get(tensor)
    return node.input[0] if node is not None and node.op_type == "Cast" else tensor


def _assign(
    model: keras.Model, convolutions: dict[str, list[np.ndarray]], batch_norms: dict[str, _Affine]
) -> None:
    """Puts the ONNX weights into ``model``, every batch normalization as its affine map (no statistics)."""
    missing = []
    for layer in model.layers:
        if not layer.weights:
            continue
        if isinstance(layer, keras.layers.BatchNormalization):
            affine = batch_norms.get(layer.name)
            if affine is None:
                missing.append(layer.name)
                continue
            ones = np.ones_like(affine.scale)
            layer.set_weights([affine.scale, affine.shift, np.zeros_like(affine.scale), ones - layer.epsilon])
        elif layer.name in convolutions:
            weights = convolutions[layer.name]
            if len(layer.weights) == 2 and len(weights) == 1:  # a bias the export dropped as zero
                weights = [weights[0], np.zeros(layer.weights[1].shape, np.float32)]
            expected = [tuple(weight.shape) for weight in layer.weights]
            if [w.shape for w in weights] != expected:
                raise RecoverError(
                    f"layer {layer.name}: the ONNX file holds {[w.shape for w in weights]}, this network "
                    f"needs {expected}; recover with the card's architecture and widths"
                )
            layer.set_weights(weights)
        else:
            missing.append(layer.name)
    if missing:
        raise RecoverError(
            f"the ONNX file has no weights for {len(missing)} layers, e.g. {', '.join(missing[:3])}"
        )


def _calibrate_statistics(model: keras.Model, batch: np.ndarray) -> None:
    """Gives every batch normalization running statistics measured on ``batch``, keeping its function."""
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    probe = keras.Model(model.input, [layer.input for layer in norms])
    sums: list[Any] = [0.0] * len(norms)
    squares: list[Any] = [0.0] * len(norms)
    counts = [0] * len(norms)
    for start in range(0, len(batch), 8):
        for index, tensor in enumerate(probe(batch[start : start + 8], training=False)):
            values = keras.ops.convert_to_numpy(tensor).astype(np.float64)
            values = values.reshape(-1, values.shape[-1])
            sums[index] = sums[index] + values.sum(axis=0)
            squares[index] = squares[index] + (values**2).sum(axis=0)
            counts[index] += values.shape[0]
    for layer, total, square, count in zip(norms, sums, squares, counts, strict=True):
        mean = total / count
        variance = np.maximum(square / count - mean**2, 0.0)
        scale, shift = (keras.ops.convert_to_numpy(weight) for weight in layer.weights[:2])
        gamma = scale * np.sqrt(variance + layer.epsilon)
        beta = shift + scale * mean
        layer.set_weights([np.float32(gamma), np.float32(beta), np.float32(mean), np.float32(variance)])


def recover_checkpoint(
    onnx_path: Path,
    card_path: Path,
    out: Path,
    photos: Sequence[Path],
    tolerance: float = 0.02,
) -> dict[str, Any]:
    """Writes ``out`` (``.keras``): the network of ``onnx_path``'s card, with the ONNX file's weights.

    Args:
        onnx_path: An export of `training.export`.
        card_path: Its card (``NAME.json``): the architecture and widths to build.
        out: The checkpoint to write.
        photos: Photos to measure the batch-normalization statistics on and to compare the two on (a few
            dozen of the training photos).
        tolerance: The largest allowed difference between the two networks' probabilities.

    Returns:
        What was done: the card's architecture and input size, the photos used, the largest and mean
        probability difference against ONNX Runtime.

    Raises:
        RecoverError: the file is not an export of a network this code builds, or the recovered network
            computes something else than the file.
    """
    onnx_model = OnnxModel(onnx_path, providers=["cpu"])
    card = json.loads(Path(card_path).read_text())
    config = card["training"]["config"]
    input_size = onnx_model.info.input_size
    if not photos:
        raise RecoverError("recovering needs photos to measure the batch-normalization statistics on")
    keras.mixed_precision.set_global_policy("float32")
    model = build_model(
        config["arch"],
        input_size,
        encoder_weights=None,
        decoder_filters=config["decoder_filters"],
        unet_base_filters=config.get("unet_base_filters", 64),
        dropout_rate=config["dropout_rate"],
        color_constancy=config.get("color_constancy", False),
    )
    convolutions, batch_norms = read_onnx_weights(onnx_path)
    _assign(model, convolutions, batch_norms)
    pipeline = onnx_model.pipeline()
    batch = pipeline.preprocess([decode_image(path) for path in photos])
    _calibrate_statistics(model, batch)

    expected = pipeline.infer(batch)
    found = keras.ops.convert_to_numpy(model.predict(batch, batch_size=8, verbose=0))[..., 0]
    difference = np.abs(expected - found)
    report = {
        "onnx": str(onnx_path),
        "version": card.get("version"),
        "arch": config["arch"],
        "input_size": list(input_size),
        "photos": len(batch),
        "max_difference": float(difference.max()),
        "mean_difference": float(difference.mean()),
        "mask_agreement": float(np.mean((expected >= 0.5) == (found >= 0.5))),
    }
    if report["max_difference"] > tolerance:
        raise RecoverError(
            f"the recovered network differs from {onnx_path} by up to {report['max_difference']:.4f} in "
            f"probability (tolerance {tolerance}); not written"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save(out)
    logger.info("recovered %s from %s (largest difference %.4f)", out, onnx_path, report["max_difference"])
    return report
