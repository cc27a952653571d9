"""What release 1.0.0 ran for each step, kept as the benchmark's baseline, and the full-decode pipeline.

Release 1.0.0 decoded every photo at full size, resized it to the network's input with Pillow's bilinear
filter in one pass, upsampled the probability map with Pillow (mode F, bilinear) and encoded both PNGs
with Pillow at the service's zlib level. The service now runs faster code for each (``service.imaging``);
the old code lives on here, unchanged but for Pillow's own API, so that section 3 of the benchmark times
*before* and *after* side by side in one run. Nothing here is served.

:class:`FullDecodePipeline` is the served pipeline with one change, the full-size decode; the decode
check (``bench.decode_check``) compares its masks with the served ones.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from service.imaging import DEFAULT_MAX_PIXELS, IMAGE_RESAMPLE, Photo, decode_photo
from service.pipeline import Encoded, Pipeline, Segmentation

#: The label the report gives these implementations.
RELEASE = "1.0.0"


def resize_image_1_0(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """1.0.0's resize to the network's input: Pillow bilinear in one pass (no ``reducing_gap``)."""
    height, width = size
    if rgb.shape[:2] == (height, width):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((width, height), IMAGE_RESAMPLE))


def resize_probability_1_0(probability: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """1.0.0's upsampling of the probability map: Pillow mode F, bilinear, then ``np.clip``."""
    height, width = size
    probability = np.asarray(probability, dtype=np.float32)
    if probability.shape == (height, width):
        return probability
    resized = Image.fromarray(probability).resize((width, height), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def probability_to_uint8_1_0(probability: np.ndarray) -> np.ndarray:
    """1.0.0's confidence-map pixels: numpy's round(clip(p) × 255)."""
    return np.rint(np.clip(probability, 0.0, 1.0) * 255.0).astype(np.uint8)


def encode_png_1_0(array: np.ndarray, compress_level: int) -> bytes:
    """1.0.0's PNG: Pillow, 8-bit grayscale, its adaptive filtering, at zlib ``compress_level``."""
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(
        buffer, format="PNG", compress_level=compress_level
    )
    return buffer.getvalue()


class FullDecodePipeline(Pipeline):
    """The served pipeline, but every photo decoded at full size (no DCT scaling): the decode check's
    reference, and 1.0.0's decode."""

    def decode(self, source: bytes | str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Photo:
        return decode_photo(source, max_pixels=max_pixels)


class Release100Pipeline(FullDecodePipeline):
    """Every step as release 1.0.0 ran it (see the module docstring), chained by :meth:`Pipeline.run` so
    that each step is timed exactly as the served pipeline's are. The inference is the same session."""

    def preprocess(self, photos: list[Photo | np.ndarray]) -> np.ndarray:  # type: ignore[override]
        return np.stack(
            [
                resize_image_1_0(photo.pixels if isinstance(photo, Photo) else photo, self.input_size).astype(
                    np.float32
                )
                for photo in photos
            ]
        )

    def postprocess(
        self,
        probability: np.ndarray,
        size: tuple[int, int],
        threshold: float | None = None,
        *,
        largest_component: bool = False,
        fill_holes: bool = False,
    ) -> Segmentation:
        if largest_component or fill_holes:
            raise NotImplementedError("the baseline times the service's default answer only")
        probability = np.asarray(probability, dtype=np.float32)
        if probability.ndim == 3:
            probability = probability[..., 0]
        full = resize_probability_1_0(probability, size)
        threshold = self.threshold if threshold is None else threshold
        return Segmentation(mask=full >= threshold, probability=full, threshold=threshold)

    def encode(self, segmentation: Segmentation, *, mask: bool = True, probability: bool = False) -> Encoded:
        level = self.png_compress_level
        return Encoded(
            mask_png=encode_png_1_0(segmentation.mask, level) if mask else None,
            probability_png=(
                encode_png_1_0(probability_to_uint8_1_0(segmentation.probability), level)
                if probability
                else None
            ),
        )
