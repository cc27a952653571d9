"""Section 2: the same network in Keras, timed in a separate process, against ONNX Runtime.

TensorFlow is never imported into the process that times ONNX Runtime or the service (ONNX Runtime was
measured 1.7× slower with TensorFlow loaded beside it): the parent writes the network-size photo to a
``.npy`` file and runs ``python -m bench.keras_compare`` (this module's :func:`main`), which loads
TensorFlow and Keras, times ``model(x, training=False)`` (eager), a ``tf.function`` of it and
``model.predict_on_batch(x)`` at each batch size, and writes JSON.

Which Keras model: the ``.keras`` checkpoint given (by default the one the ONNX model was exported from,
named in its model card, else ``runs/release/best.keras``), provided that it computes what the ONNX model
computes on the photo (checked here, untimed). Otherwise the same architecture is built with random
weights at the ONNX model's input size and exported to ONNX in the scratch folder, and both sides are
timed on that pair; the report says which.

This module's top level imports neither TensorFlow nor ONNX Runtime, so the parent can import it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from bench.timing import Effort, Timing, measure

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
METHODS = ("eager", "tf.function", "predict_on_batch")
#: Keras and the ONNX model agree within this on the photo: the same network (export checks 1e-4).
SAME_NETWORK_TOLERANCE = 1e-3
RANDOM_SEED = 0


@dataclass(frozen=True)
class Architecture:
    """What to build when no checkpoint matches the ONNX model (``training.model.build_model`` options)."""

    arch: str = "resnet50v2-unet"
    decoder_filters: tuple[int, ...] = (256, 128, 64, 32, 16)
    unet_base_filters: int = 64

    @classmethod
    def from_card(cls, card: dict[str, Any], default: Architecture) -> Architecture:
        """The architecture recorded in a model card's training configuration, else ``default``."""
        config = (card.get("training") or {}).get("config") or {}
        return cls(
            arch=str(config.get("arch", default.arch)),
            decoder_filters=tuple(int(f) for f in config.get("decoder_filters", default.decoder_filters)),
            unet_base_filters=int(config.get("unet_base_filters", default.unet_base_filters)),
        )

    def describe(self) -> str:
        if self.arch == "unet":
            return f"unet, base filters {self.unet_base_filters}"
        return f"{self.arch}, decoder filters {list(self.decoder_filters)}"


@dataclass
class KerasResult:
    """Keras timings per method and batch size, and ONNX Runtime's on the same network."""

    mode: str = "not run"
    description: str = ""
    onnx_path: str = ""
    parity_max_abs_diff: float | None = None
    versions: dict[str, str] = field(default_factory=dict)
    keras: dict[str, dict[int, Timing]] = field(default_factory=dict)
    onnx: dict[int, Timing] = field(default_factory=dict)
    error: str | None = None

    def best_keras(self, batch: int) -> tuple[str, Timing] | None:
        """The fastest Keras method at ``batch`` (by median)."""
        candidates = [(m, t[batch]) for m, t in self.keras.items() if batch in t and t[batch].n]
        return min(candidates, key=lambda item: item[1].p50) if candidates else None


# ------------------------------------------------------------------------------------------------------------
# Parent side (no TensorFlow)


def run_keras_comparison(
    model_path: Path,
    network_input: np.ndarray,
    batches: Sequence[int],
    effort: Effort,
    workdir: Path,
    checkpoint: Path | None,
    architecture: Architecture,
    timeout_s: float,
) -> KerasResult:
    """Runs the Keras side in a subprocess; the ONNX Runtime side of the pair is timed by the caller.

    Args:
        model_path: the ONNX model benchmarked.
        network_input: the photo at the network's input size, float32 ``(h, w, 3)``.
        batches: batch sizes.
        effort: repetitions.
        workdir: scratch folder (the input, the result, and a random-weight export if one is needed).
        checkpoint: the ``.keras`` file to try first, or None to build ``architecture`` at once.
        architecture: what to build with random weights when the checkpoint is absent or another network.
        timeout_s: the subprocess is stopped after this long.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    input_path, output_path = workdir / "keras-input.npy", workdir / "keras-result.json"
    np.save(input_path, np.asarray(network_input, dtype=np.float32))
    command = [
        sys.executable,
        "-m",
        "bench.keras_compare",
        "--input",
        str(input_path),
        "--onnx",
        str(Path(model_path).resolve()),
        "--batches",
        ",".join(map(str, batches)),
        "--effort",
        json.dumps(asdict(effort)),
        "--workdir",
        str(workdir),
        "--out",
        str(output_path),
        "--arch",
        architecture.arch,
        "--decoder-filters",
        ",".join(map(str, architecture.decoder_filters)),
        "--unet-base-filters",
        str(architecture.unet_base_filters),
    ]
    if checkpoint is not None:
        command += ["--checkpoint", str(checkpoint)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    log_path = workdir / "keras.log"
    try:
        with log_path.open("wb") as log:
            completed = subprocess.run(
                command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s
            )
    except subprocess.TimeoutExpired:
        return KerasResult(error=f"the Keras process took over {timeout_s:.0f} s and was stopped")
    if completed.returncode != 0 or not output_path.is_file():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-12:])
        return KerasResult(error=f"the Keras process failed ({completed.returncode}): {tail}")
    document = json.loads(output_path.read_text())
    return KerasResult(
        mode=document["mode"],
        description=document["description"],
        onnx_path=document["onnx_path"],
        parity_max_abs_diff=document["parity_max_abs_diff"],
        versions=document["versions"],
        keras={
            method: {int(batch): Timing(samples) for batch, samples in per_batch.items()}
            for method, per_batch in document["keras"].items()
        },
    )


# ------------------------------------------------------------------------------------------------------------
# Child side (imports TensorFlow)


def _load_checkpoint(checkpoint: Path, workdir: Path) -> Any:
    """Loads a copy of the checkpoint (a training run may rewrite the original meanwhile) in float32."""
    from training.export import as_float32
    from training.model import load_network

    copy = workdir / "checkpoint-copy.keras"
    shutil.copyfile(checkpoint, copy)
    try:
        return as_float32(load_network(copy))
    finally:
        copy.unlink(missing_ok=True)


def _max_abs_diff(model: Any, onnx_path: Path, single: np.ndarray) -> float:
    """Keras against ONNX Runtime on the photo (run once, untimed: ONNX Runtime is only timed elsewhere)."""
    import keras

    from service.inference import OnnxModel

    batch = single[np.newaxis]
    expected = np.asarray(keras.ops.convert_to_numpy(model(batch, training=False)), dtype=np.float32)
    got = OnnxModel(onnx_path)(batch)
    if got.shape != expected.shape:
        return float("inf")
    return float(np.max(np.abs(got - expected)))


def _choose_model(args: argparse.Namespace, single: np.ndarray) -> tuple[Any, dict[str, Any]]:
    """The checkpoint when it is the ONNX model's network, else a random-weight build exported here."""
    import keras

    from training.export import convert_keras_to_onnx
    from training.model import build_model

    input_size = (int(single.shape[0]), int(single.shape[1]))
    onnx_path, workdir = Path(args.onnx), Path(args.workdir)
    why_not = "no checkpoint given or found"
    if args.checkpoint:
        checkpoint = Path(args.checkpoint)
        try:
            model = _load_checkpoint(checkpoint, workdir)
            shape = tuple(model.inputs[0].shape[1:3])
            if shape != input_size:
                why_not = f"{checkpoint} takes {shape}, the ONNX model {input_size} (height, width)"
            else:
                diff = _max_abs_diff(model, onnx_path, single)
                if diff <= SAME_NETWORK_TOLERANCE:
                    return model, {
                        "mode": "checkpoint",
                        "description": f"checkpoint {checkpoint} (its output matches the ONNX model's "
                        f"within {diff:.1e} on the photo: the same network)",
                        "onnx_path": str(onnx_path),
                        "parity_max_abs_diff": diff,
                    }
                why_not = f"{checkpoint} is another network (outputs differ by {diff:.2f} on the photo)"
        except Exception as error:  # Keras raises many types for unreadable or half-written files
            why_not = f"cannot load {checkpoint}: {type(error).__name__}: {error}"
    keras.utils.set_random_seed(RANDOM_SEED)
    decoder_filters = tuple(int(f) for f in args.decoder_filters.split(","))
    model = build_model(
        args.arch,
        input_size,
        encoder_weights="none",
        decoder_filters=decoder_filters,
        unet_base_filters=args.unet_base_filters,
    )
    random_onnx = workdir / "keras-random.onnx"
    convert_keras_to_onnx(model, random_onnx, input_size, 17)
    diff = _max_abs_diff(model, random_onnx, single)
    built = f"{args.arch}" + (
        f", base filters {args.unet_base_filters}"
        if args.arch == "unet"
        else f", decoder {list(decoder_filters)}"
    )
    return model, {
        "mode": "random",
        "description": f"random weights: {built} built at {input_size[0]}×{input_size[1]} with "
        f"training.model.build_model and exported with training.export.convert_keras_to_onnx; both sides "
        f"timed on that pair (agreeing within {diff:.1e}). Why not a checkpoint: {why_not}",
        "onnx_path": str(random_onnx),
        "parity_max_abs_diff": diff,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.keras_compare``: times the Keras model and writes JSON (run by the parent)."""
    parser = argparse.ArgumentParser(prog="python -m bench.keras_compare", description=__doc__)
    parser.add_argument("--input", type=Path, required=True, help="the photo at network size, .npy")
    parser.add_argument("--onnx", type=Path, required=True, help="the ONNX model the Keras one must match")
    parser.add_argument("--batches", default="1,4,8,16")
    parser.add_argument("--effort", required=True, help="bench.timing.Effort as JSON")
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--arch", default=Architecture.arch)
    parser.add_argument("--decoder-filters", default=",".join(map(str, Architecture.decoder_filters)))
    parser.add_argument("--unet-base-filters", type=int, default=Architecture.unet_base_filters)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    effort = Effort(**json.loads(args.effort))
    single = np.load(args.input).astype(np.float32)
    model, document = _choose_model(args, single)
    height, width = single.shape[:2]
    signature = [tf.TensorSpec((None, height, width, 3), tf.float32)]
    graph_call = tf.function(lambda x: model(x, training=False), input_signature=signature)
    calls = {
        "eager": lambda x: keras.ops.convert_to_numpy(model(x, training=False)),
        "tf.function": lambda x: graph_call(x).numpy(),
        "predict_on_batch": lambda x: model.predict_on_batch(x),
    }
    timings: dict[str, dict[str, list[float]]] = {method: {} for method in METHODS}
    for batch_size in (int(b) for b in args.batches.split(",")):
        batch = np.ascontiguousarray(np.repeat(single[np.newaxis], batch_size, axis=0))
        for method in METHODS:
            timing = measure(partial(calls[method], batch), effort)
            timings[method][str(batch_size)] = timing.samples_ms
            logging.info("keras %s batch %d: p50 %.1f ms (n=%d)", method, batch_size, timing.p50, timing.n)
    document["keras"] = timings
    document["versions"] = {"tensorflow": tf.__version__, "keras": keras.__version__}
    args.out.write_text(json.dumps(document, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
