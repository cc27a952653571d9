"""The inference core: decoded photo → network input → probabilities → mask the size of the photo.

Used by `dermaseg evaluate` (for ONNX models, and for Keras checkpoints through the same pre- and
post-processing), by `dermaseg predict` and by the service. No TensorFlow is imported here.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from scipy import ndimage

from service.config import set_onnxruntime_environment
from service.imaging import resize_image, resize_probability

logger = logging.getLogger(__name__)

#: Names of the ONNX contract (see docs and training/export.py).
INPUT_NAME = "image"
OUTPUT_NAME = "probability"
#: Keys of the ONNX metadata_props written by the export.
META_PREFIX = "dermaseg."
DEFAULT_THRESHOLD = 0.5

#: A function that maps a float32 batch ``(N, H, W, 3)`` of RGB 0–255 to probabilities ``(N, H, W[, 1])``.
PredictFn = Callable[[np.ndarray], np.ndarray]

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


@dataclass
class Segmentation:
    """The result for one photo, at the photo's own size.

    Attributes:
        mask: bool ``(H, W)`` lesion mask.
        probability: float32 ``(H, W)`` lesion probability.
        threshold: the threshold that made ``mask``.
    """

    mask: np.ndarray
    probability: np.ndarray
    threshold: float

    @property
    def area_px(self) -> int:
        return int(self.mask.sum())

    @property
    def area_fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    @property
    def found(self) -> bool:
        return self.area_px > 0

    @property
    def bbox(self) -> tuple[int, int, int, int] | None:
        """``(x, y, width, height)`` of the lesion in pixels, or None when nothing was found."""
        if not self.found:
            return None
        rows = np.flatnonzero(self.mask.any(axis=1))
        cols = np.flatnonzero(self.mask.any(axis=0))
        return int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)

    def area_mm2(self, pixel_spacing_mm: float | None) -> float | None:
        """Lesion area in mm² for a pixel of ``pixel_spacing_mm`` × ``pixel_spacing_mm``."""
        if pixel_spacing_mm is None:
            return None
        return self.area_px * pixel_spacing_mm * pixel_spacing_mm


def preprocess(rgb: np.ndarray, input_size: tuple[int, int]) -> np.ndarray:
    """Resizes a uint8 RGB photo to the network input; returns float32 ``(h, w, 3)`` RGB in 0–255.

    The network does its own scaling (it starts with a Rescaling layer), so this is only the resize.
    """
    return resize_image(rgb, input_size).astype(np.float32)


def keep_largest_component(mask: np.ndarray) -> np.ndarray:
    """Keeps the largest 8-connected region of a bool mask."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())


def postprocess(
    probability: np.ndarray,
    size: tuple[int, int],
    threshold: float,
    *,
    largest_component: bool = False,
    fill_holes: bool = False,
) -> Segmentation:
    """Brings a network-size probability map back to the photo's ``size = (H, W)`` and thresholds it.

    Args:
        probability: ``(h, w)`` or ``(h, w, 1)`` probabilities at the network's resolution.
        size: the photo's own ``(height, width)``.
        threshold: a pixel is lesion when its probability is at least this.
        largest_component: keep only the largest connected region (the ISIC rule: one lesion).
        fill_holes: fill holes inside the lesion (the ISIC rule: no holes).
    """
    probability = np.asarray(probability, dtype=np.float32)
    if probability.ndim == 3:
        probability = probability[..., 0]
    full = resize_probability(probability, size)
    mask = full >= threshold
    if largest_component:
        mask = keep_largest_component(mask)
    if fill_holes:
        mask = ndimage.binary_fill_holes(mask)
    return Segmentation(mask=mask, probability=full, threshold=threshold)


class Segmenter:
    """Pre-processing, a predict function and post-processing, batched.

    Args:
        predict: maps float32 ``(N, h, w, 3)`` RGB 0–255 to ``(N, h, w[, 1])`` probabilities.
        input_size: the network's ``(height, width)``.
        threshold: default threshold.
        batch_size: photos per call of ``predict``.
    """

    def __init__(
        self,
        predict: PredictFn,
        input_size: tuple[int, int],
        threshold: float = DEFAULT_THRESHOLD,
        batch_size: int = 8,
    ) -> None:
        self.predict = predict
        self.input_size = input_size
        self.threshold = threshold
        self.batch_size = batch_size

    def probabilities(self, batch: np.ndarray, flip_tta: bool = False) -> np.ndarray:
        """Runs the network on a preprocessed batch; returns ``(N, h, w)`` float32 probabilities.

        With ``flip_tta`` the batch is also run mirrored horizontally and vertically and the three
        probability maps are averaged.
        """
        probs = np.asarray(self.predict(batch), dtype=np.float32).reshape(batch.shape[:3])
        if flip_tta:
            horizontal = np.asarray(self.predict(batch[:, :, ::-1].copy()), dtype=np.float32)
            vertical = np.asarray(self.predict(batch[:, ::-1].copy()), dtype=np.float32)
            probs = (
                probs
                + horizontal.reshape(batch.shape[:3])[:, :, ::-1]
                + vertical.reshape(batch.shape[:3])[:, ::-1]
            ) / 3.0
        return probs

    def segment(
        self,
        images: Sequence[np.ndarray],
        threshold: float | None = None,
        *,
        flip_tta: bool = False,
        largest_component: bool = False,
        fill_holes: bool = False,
    ) -> list[Segmentation]:
        """Segments uint8 RGB photos of any size; each result is at its photo's own size."""
        threshold = self.threshold if threshold is None else threshold
        results: list[Segmentation] = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            batch = np.stack([preprocess(image, self.input_size) for image in chunk])
            probs = self.probabilities(batch, flip_tta=flip_tta)
            for image, prob in zip(chunk, probs, strict=True):
                results.append(
                    postprocess(
                        prob,
                        image.shape[:2],
                        threshold,
                        largest_component=largest_component,
                        fill_holes=fill_holes,
                    )
                )
        return results


def import_onnxruntime() -> ModuleType:
    """``import onnxruntime`` with its telemetry off (``service.config.ONNXRUNTIME_ENVIRONMENT``)."""
    set_onnxruntime_environment()
    import onnxruntime

    return onnxruntime


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

    def segmenter(self, batch_size: int = 8) -> Segmenter:
        """A :class:`Segmenter` on this session, with the model's own input size and threshold."""
        return Segmenter(self, self.info.input_size, self.info.threshold, batch_size=batch_size)
