"""The ONNX model: its session on the providers asked for, what it says about itself, and its card.

:meth:`OnnxModel.pipeline` puts it in the :class:`service.pipeline.Pipeline` that `dermaseg evaluate`,
`dermaseg predict` and the service share. No TensorFlow is imported here.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from service.config import set_onnxruntime_environment
from service.pipeline import DEFAULT_THRESHOLD, Pipeline
from service.quality import QualityEstimator

logger = logging.getLogger(__name__)

#: Names of the ONNX contract (see docs and training/export/convert.py).
INPUT_NAME = "image"
OUTPUT_NAME = "probability"
#: Keys of the ONNX metadata_props written by the export.
META_PREFIX = "dermaseg."

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


class ModelLoadError(RuntimeError):
    """The model file is missing, unreadable, not a DermaSeg model, or cannot run on the providers asked."""


@dataclass(frozen=True)
class ModelInfo:
    """What a model says about itself (ONNX metadata_props written by `dermaseg export`)."""

    name: str
    version: str
    input_size: tuple[int, int]
    threshold: float
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def card(self) -> dict[str, Any]:
        """The model card embedded in the file (empty when there is none)."""
        raw = self.metadata.get(META_PREFIX + "card")
        return json.loads(raw) if raw else {}


def import_onnxruntime() -> ModuleType:
    """``import onnxruntime`` with its telemetry off (``service.config.ONNXRUNTIME_ENVIRONMENT``)."""
    set_onnxruntime_environment()
    import onnxruntime

    module: ModuleType = onnxruntime
    return module


def resolve_providers(requested: Sequence[str]) -> list[str]:
    """Maps short names (``cpu``, ``cuda``) to ONNX Runtime provider names, keeping order."""
    return [PROVIDER_ALIASES.get(name.lower(), name) for name in requested]


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file (a model's identity in its card, the service's model info and the benchmark)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class CardError(ValueError):
    """A model card that is unreadable or describes another file."""


def load_card(card_path: str | Path, sha256: str) -> dict[str, Any]:
    """A sidecar model card (``NAME.json``), checked to describe the file whose sha256 is given.

    Raises:
        CardError: unreadable, not a JSON object, or its ``sha256`` is another file's.
    """
    card_path = Path(card_path)
    try:
        card = json.loads(card_path.read_text())
    except (OSError, ValueError) as error:
        raise CardError(f"{card_path}: not a readable model card ({error})") from None
    if not isinstance(card, dict) or card.get("sha256") != sha256:
        found = card.get("sha256") if isinstance(card, dict) else None
        raise CardError(
            f"{card_path} describes a file with sha256 {str(found)[:12]}…, not the one with {sha256[:12]}…"
        )
    return card


#: ONNX Runtime's session config entry for intra-op thread spinning.
SPINNING_CONFIG_KEY = "session.intra_op.allow_spinning"


class OnnxModel:
    """An ONNX Runtime session on a DermaSeg model, with the providers it really runs on.

    Args:
        path: the ``.onnx`` file.
        providers: wanted providers in order of preference (``cuda``, ``cpu`` or full names); those
            that this ONNX Runtime build lacks are skipped, and CPU is always the last resort.
        require_providers: fail instead of falling back when the first wanted provider is not in use
            (ONNX Runtime falls back to CPU silently otherwise).
        intra_op_threads / inter_op_threads: ONNX Runtime thread pools (0 lets it choose).
        thread_spinning: whether idle intra-op threads spin waiting for work (None: ONNX Runtime's default,
            on). Spinning threads burn CPU that a busy process's other work (decoding, encoding, other
            requests) needs; docs/performance.md measures both.

    Raises:
        ModelLoadError: missing, unreadable or non-conforming model, or a refused fallback.
    """

    def __init__(
        self,
        path: str | Path,
        providers: Sequence[str] = ("cpu",),
        *,
        require_providers: bool = False,
        intra_op_threads: int = 0,
        inter_op_threads: int = 0,
        thread_spinning: bool | None = None,
    ) -> None:
        ort = import_onnxruntime()

        self.path = Path(path)
        if self.path.is_dir():
            raise ModelLoadError(f"model path is a folder, not an ONNX file: {self.path}")
        if not self.path.is_file():
            raise ModelLoadError(f"model file not found: {self.path}")
        wanted = resolve_providers(providers)
        available = ort.get_available_providers()
        usable = [name for name in wanted if name in available]
        if "CPUExecutionProvider" not in usable:
            usable.append("CPUExecutionProvider")
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = inter_op_threads
        options.log_severity_level = 3
        if thread_spinning is not None:
            options.add_session_config_entry(SPINNING_CONFIG_KEY, "1" if thread_spinning else "0")
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=options, providers=usable)
        except Exception as error:  # ONNX Runtime raises several unrelated types for a bad file
            raise ModelLoadError(f"cannot load model {self.path}: {error}") from None
        self.providers: list[str] = list(self.session.get_providers())
        if require_providers and wanted and wanted[0] not in self.providers:
            raise ModelLoadError(
                f"provider {wanted[0]} was required but the session runs on {self.providers} "
                f"(available in this ONNX Runtime: {available})"
            )
        inputs = self.session.get_inputs()
        outputs = self.session.get_outputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4 or len(outputs) != 1:
            raise ModelLoadError(
                f"{self.path} is not a DermaSeg model: expected one (N, H, W, 3) input and one output"
            )
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        self.input_dtype = np.float16 if inputs[0].type == "tensor(float16)" else np.float32
        self.info = self._read_info(inputs[0].shape)

    def _read_info(self, input_shape: Sequence[Any]) -> ModelInfo:
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        height, width = input_shape[1], input_shape[2]
        if META_PREFIX + "input_size" in meta:
            height, width = (int(v) for v in meta[META_PREFIX + "input_size"].split("x"))
        if not (isinstance(height, int) and isinstance(width, int)):
            raise ModelLoadError(f"{self.path}: input size is neither fixed in the graph nor in its metadata")
        try:
            threshold = float(meta.get(META_PREFIX + "threshold", DEFAULT_THRESHOLD))
        except ValueError:
            raise ModelLoadError(f"{self.path}: metadata threshold is not a number") from None
        return ModelInfo(
            name=meta.get(META_PREFIX + "name", self.path.stem),
            version=meta.get(META_PREFIX + "version", "unversioned"),
            input_size=(height, width),
            threshold=threshold,
            metadata=meta,
        )

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Runs the session on float32 ``(N, h, w, 3)`` RGB 0–255; returns float32 ``(N, h, w, 1)``."""
        feed = {self.input_name: np.ascontiguousarray(batch, dtype=self.input_dtype)}
        (output,) = self.session.run([self.output_name], feed)
        return np.asarray(output, dtype=np.float32)

    def pipeline(
        self,
        batch_size: int = 8,
        png_compress_level: int = 1,
        quality: QualityEstimator | None = None,
        review_below: float | None = None,
    ) -> Pipeline:
        """A :class:`Pipeline` on this session, with the model's own input size and threshold."""
        return Pipeline(
            self,
            self.info.input_size,
            self.info.threshold,
            batch_size=batch_size,
            png_compress_level=png_compress_level,
            quality=quality,
            review_below=review_below,
        )
