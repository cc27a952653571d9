"""The segmentation pipeline: decode → preprocess → infer → postprocess → encode, each step timed.

One :class:`Pipeline` serves ``POST /segment`` and the V2 inference route, ``dermaseg predict`` and
``dermaseg evaluate``, so what evaluation measures is exactly what the service answers. Each step is a
method; :meth:`Pipeline.run` chains them for one uploaded photo and :meth:`Pipeline.segment` for a batch of
decoded photos. Both record the milliseconds each step took in a :class:`StepTimes`. No TensorFlow here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from service.imaging import (
    DEFAULT_MAX_PIXELS,
    Photo,
    decode_photo,
    encode_png,
    probability_to_uint8,
    resize_image,
    resize_probability,
)
from service.quality import QualityAssessment, QualityEstimator

DEFAULT_THRESHOLD = 0.5

#: A function that maps a float32 batch ``(N, H, W, 3)`` of RGB 0–255 to probabilities ``(N, H, W[, 1])``.
PredictFn = Callable[[np.ndarray], np.ndarray]

#: A JPEG is decoded at the smallest DCT scale that keeps it at least this many times the network's input.
#: At 1× (a 512 px PH2 photo decoded at half scale, then resized by 1.3) 28 of 180 photos' masks disagreed
#: with the full decode's beyond Dice 0.995; the resize from twice the input smooths as the full one does
#: (bench/decode_check.py, docs/performance.md section 8).
DECODE_MARGIN = 2

#: The steps in the order a photo goes through them (the names of ``timings_ms`` and Server-Timing).
STEPS = ("decode", "preprocess", "inference", "postprocess", "encode")


class StepTimes:
    """Milliseconds spent in each pipeline step, summed over the photos that went through it."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Times the body of a ``with`` block as step ``name``."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - started) * 1000.0


@dataclass
class Segmentation:
    """The result for one photo, at the photo's own size.

    Attributes:
        mask: bool ``(H, W)`` lesion mask.
        probability: float32 ``(H, W)`` lesion probability.
        threshold: the threshold that made ``mask``.
        quality: the estimated Jaccard and review flag (None when the pipeline has no estimator).
    """

    mask: np.ndarray
    probability: np.ndarray
    threshold: float
    quality: QualityAssessment | None = None

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


@dataclass
class Encoded:
    """The PNG answers for one photo (None where not asked for)."""

    mask_png: bytes | None = None
    probability_png: bytes | None = None


@dataclass
class PhotoResult:
    """One photo through the whole pipeline: its segmentation, its PNGs and where the time went."""

    segmentation: Segmentation
    encoded: Encoded
    times: StepTimes = field(default_factory=StepTimes)

    @property
    def height(self) -> int:
        return int(self.segmentation.mask.shape[0])

    @property
    def width(self) -> int:
        return int(self.segmentation.mask.shape[1])


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
    return np.asarray(labels == int(sizes.argmax()))


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
        mask = np.asarray(ndimage.binary_fill_holes(mask))
    return Segmentation(mask=mask, probability=full, threshold=threshold)


class Pipeline:
    """Decode, preprocess, a predict function, postprocess and encode: a photo in, its mask out.

    Args:
        predict: maps float32 ``(N, h, w, 3)`` RGB 0–255 to ``(N, h, w[, 1])`` probabilities.
        input_size: the network's ``(height, width)``.
        threshold: default threshold.
        batch_size: photos per call of ``predict`` in :meth:`segment`.
        png_compress_level: zlib level of the PNGs :meth:`encode` writes.
        quality: the outline-quality estimator calibrated on this network (``service.quality``); with it,
            every segmentation carries an estimated Jaccard and a review flag.
        review_below: flag answers whose estimated Jaccard is below this (None: the estimator's own).
    """

    def __init__(
        self,
        predict: PredictFn,
        input_size: tuple[int, int],
        threshold: float = DEFAULT_THRESHOLD,
        batch_size: int = 8,
        png_compress_level: int = 1,
        quality: QualityEstimator | None = None,
        review_below: float | None = None,
    ) -> None:
        self.predict = predict
        self.input_size = input_size
        self.threshold = threshold
        self.batch_size = batch_size
        self.png_compress_level = png_compress_level
        self.quality = quality
        self.review_below = review_below

    # --- the steps --------------------------------------------------------------------------------------

    def decode(self, source: bytes | str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Photo:
        """The photo; a JPEG decoded only as large as the network's input needs (:data:`DECODE_MARGIN`)."""
        height, width = self.input_size
        return decode_photo(source, max_pixels, at_least=(DECODE_MARGIN * height, DECODE_MARGIN * width))

    def preprocess(self, photos: Sequence[Photo | np.ndarray]) -> np.ndarray:
        """The network's float32 input batch ``(N, h, w, 3)`` for photos of any size."""
        return np.stack(
            [
                preprocess(photo.pixels if isinstance(photo, Photo) else photo, self.input_size)
                for photo in photos
            ]
        )

    def infer(self, batch: np.ndarray, flip_tta: bool = False) -> np.ndarray:
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

    def postprocess(
        self,
        probability: np.ndarray,
        size: tuple[int, int],
        threshold: float | None = None,
        *,
        largest_component: bool = False,
        fill_holes: bool = False,
    ) -> Segmentation:
        """The mask at the photo's ``size`` (see :func:`postprocess`); the model's threshold by default.

        With an estimator, its quality too, read from ``probability`` at the network's resolution (about a
        millisecond: docs/quality.md).
        """
        threshold = self.threshold if threshold is None else threshold
        segmentation = postprocess(
            probability, size, threshold, largest_component=largest_component, fill_holes=fill_holes
        )
        if self.quality is not None:
            segmentation.quality = self.quality.assess_map(probability, threshold, self.review_below)
        return segmentation

    def encode(self, segmentation: Segmentation, *, mask: bool = True, probability: bool = False) -> Encoded:
        """The mask (0/255) and the confidence map (round(p × 255)) as 8-bit grayscale PNGs."""
        level = self.png_compress_level
        return Encoded(
            mask_png=encode_png(segmentation.mask, level) if mask else None,
            probability_png=(
                encode_png(probability_to_uint8(segmentation.probability), level) if probability else None
            ),
        )

    # --- the steps chained ------------------------------------------------------------------------------

    def run(
        self,
        source: bytes | str | Path,
        threshold: float | None = None,
        *,
        flip_tta: bool = False,
        largest_component: bool = False,
        fill_holes: bool = False,
        mask: bool = True,
        probability: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> PhotoResult:
        """One encoded photo through every step, each timed.

        Raises:
            ImageDecodeError: the bytes are no photo we take (see :func:`decode_image`).
        """
        times = StepTimes()
        with times.step("decode"):
            photo = self.decode(source, max_pixels)
        with times.step("preprocess"):
            batch = self.preprocess([photo])
        with times.step("inference"):
            probabilities = self.infer(batch, flip_tta=flip_tta)
        with times.step("postprocess"):
            segmentation = self.postprocess(
                probabilities[0],
                photo.size,
                threshold,
                largest_component=largest_component,
                fill_holes=fill_holes,
            )
        with times.step("encode"):
            encoded = self.encode(segmentation, mask=mask, probability=probability)
        return PhotoResult(segmentation, encoded, times)

    def segment(
        self,
        photos: Sequence[Photo | np.ndarray],
        threshold: float | None = None,
        *,
        flip_tta: bool = False,
        largest_component: bool = False,
        fill_holes: bool = False,
        times: StepTimes | None = None,
    ) -> list[Segmentation]:
        """Segments decoded photos (or uint8 RGB arrays) of any size in batches, each at its own size."""
        times = times or StepTimes()
        results: list[Segmentation] = []
        for start in range(0, len(photos), self.batch_size):
            chunk = photos[start : start + self.batch_size]
            with times.step("preprocess"):
                batch = self.preprocess(chunk)
            with times.step("inference"):
                probs = self.infer(batch, flip_tta=flip_tta)
            with times.step("postprocess"):
                for photo, prob in zip(chunk, probs, strict=True):
                    results.append(
                        self.postprocess(
                            prob,
                            photo.size if isinstance(photo, Photo) else photo.shape[:2],
                            threshold,
                            largest_component=largest_component,
                            fill_holes=fill_holes,
                        )
                    )
        return results
