"""Section 3: the service's steps, in this process and without HTTP, and faster alternatives to some.

The steps are those of ``POST /segment`` (``service.routes.segment``): decode → preprocess → session →
postprocess → encode (mask and probability PNGs, base64). Each is timed alone on the photo, so the
HTTP figures can be read against them. The alternatives are candidates for the service, measured here
before anything is changed there: JPEG decoding with DCT scaling (Pillow's ``draft``), which decodes a
1024×768 JPEG at 1/2 or 1/4 size straight away, and PNG encoding at zlib level 1 instead of 6.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from bench.inputs import Photo
from bench.timing import Effort, Timing, measure
from service.config import Settings
from service.imaging import IMAGE_RESAMPLE, decode_image, encode_png
from service.inference import OnnxModel
from service.pipeline import postprocess, preprocess, probability_to_uint8

#: zlib level of the service's PNGs (DERMASEG_PNG_COMPRESS_LEVEL's default), and Pillow's own default,
#: which the service used before that setting.
SERVICE_PNG_LEVEL = Settings.model_fields["png_compress_level"].default
PILLOW_PNG_LEVEL = 6
EXIF_ORIENTATION = 0x0112


@dataclass
class Alternative:
    """A faster candidate for one or more steps, against the steps it would replace."""

    name: str
    replaces: str
    timing: Timing
    baseline_ms: float
    effect: str
    #: Whether the service now runs the alternative (then ``baseline_ms`` is how it ran before).
    adopted: bool = False

    @property
    def saving_ms(self) -> float:
        return self.baseline_ms - self.timing.p50


@dataclass
class PipelineResult:
    """Median time of each step of one request, and the alternatives."""

    steps: dict[str, Timing] = field(default_factory=dict)
    alternatives: list[Alternative] = field(default_factory=list)

    @property
    def total_ms(self) -> float:
        return sum(timing.p50 for timing in self.steps.values())


def decode_with_draft(data: bytes, input_size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """Decodes a JPEG at the smallest DCT scale still at least the network's input, then resizes to it.

    Returns the network-size uint8 RGB and the photo's full ``(height, width)`` (the mask's size), EXIF
    orientation applied like ``decode_image``.
    """
    height, width = input_size
    with Image.open(io.BytesIO(data)) as image:
        stored_width, stored_height = image.size
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
        image.draft("RGB", (max(height, width), max(height, width)))
        small = ImageOps.exif_transpose(image).convert("RGB")
    swapped = orientation in (5, 6, 7, 8)  # the EXIF rotations by 90° or 270°
    full_size = (stored_width, stored_height) if swapped else (stored_height, stored_width)
    resized = np.asarray(small.resize((width, height), IMAGE_RESAMPLE))
    return resized, full_size


def _encode(segmentation: Any, level: int) -> tuple[str, str]:
    """The two PNGs of a JSON answer, base64, at zlib ``level``."""
    mask = encode_png(segmentation.mask, level)
    probability = encode_png(probability_to_uint8(segmentation.probability), level)
    return base64.b64encode(mask).decode("ascii"), base64.b64encode(probability).decode("ascii")


def bench_pipeline(model: OnnxModel, photo: Photo, effort: Effort) -> PipelineResult:
    """Times each step of one request on ``photo`` (batch 1), and the alternatives."""
    input_size, threshold = model.info.input_size, model.info.threshold
    rgb = decode_image(photo.data)
    batch = preprocess(rgb, input_size)[np.newaxis]
    probability = model(batch)
    segmentation = postprocess(probability[0], rgb.shape[:2], threshold)
    calls: dict[str, Callable[[], Any]] = {
        "decode": lambda: decode_image(photo.data),
        "preprocess": lambda: preprocess(rgb, input_size)[np.newaxis],
        "inference": lambda: model(batch),
        "postprocess": lambda: postprocess(probability[0], rgb.shape[:2], threshold),
        "encode": lambda: _encode(segmentation, SERVICE_PNG_LEVEL),
    }
    result = PipelineResult(steps={name: measure(call, effort) for name, call in calls.items()})

    if photo.content_type == "image/jpeg":
        fast_input, _ = decode_with_draft(photo.data, input_size)
        difference = np.abs(fast_input.astype(np.float32) - preprocess(rgb, input_size))
        result.alternatives.append(
            Alternative(
                name="JPEG decode with DCT scaling (Pillow draft) + resize",
                replaces="decode + preprocess",
                timing=measure(lambda: decode_with_draft(photo.data, input_size), effort),
                baseline_ms=result.steps["decode"].p50 + result.steps["preprocess"].p50,
                effect=(
                    f"network input differs by {difference.mean():.2f} gray levels on average "
                    f"(max {difference.max():.0f}): needs a Dice check before use"
                ),
            )
        )
    before_sizes = [len(text) for text in _encode(segmentation, PILLOW_PNG_LEVEL)]
    after_sizes = [len(text) for text in _encode(segmentation, SERVICE_PNG_LEVEL)]
    if SERVICE_PNG_LEVEL != PILLOW_PNG_LEVEL:
        result.alternatives.append(
            Alternative(
                name=f"PNG at zlib level {SERVICE_PNG_LEVEL} instead of Pillow's {PILLOW_PNG_LEVEL}",
                replaces="encode",
                timing=result.steps["encode"],
                baseline_ms=measure(lambda: _encode(segmentation, PILLOW_PNG_LEVEL), effort).p50,
                effect=(
                    f"same pixels (lossless); answer's images {sum(after_sizes) / 1024:.0f} KiB "
                    f"instead of {sum(before_sizes) / 1024:.0f} KiB"
                ),
                adopted=True,
            )
        )
    return result
