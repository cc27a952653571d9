"""Image decoding and resizing shared by training, evaluation and the service.

Everything that turns a file into the network's input, or the network's output back into a mask the size
of the photo, lives here, so that what `dermaseg evaluate` measures is exactly what `POST /segment` serves.
No TensorFlow: the service imports this module.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

#: Formats a client may upload (Pillow format names).
SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "TIFF"})
#: Formats whose extra frames are part of one photo (a phone's MPO holds the photo, then previews);
#: any other multi-frame image (a multi-page TIFF, an animated PNG) holds several pictures: refused.
FIRST_FRAME_FORMATS = frozenset({"MPO"})
#: Leading bytes of documents that clients send by mistake, told apart from images we cannot read.
DOCUMENT_SIGNATURES = {b"%PDF-": "PDF", b"PK\x03\x04": "ZIP/Office", b"{\\rtf": "RTF"}

#: Interpolation used to resize photos to the network's input, in training and in serving alike.
IMAGE_RESAMPLE = Image.Resampling.BILINEAR
#: Interpolation used to resize ground-truth masks (keeps them binary).
MASK_RESAMPLE = Image.Resampling.NEAREST

#: Formats whose decoder can scale by 1/2, 1/4 or 1/8 while decoding (libjpeg's DCT scaling).
DCT_SCALED_FORMATS = frozenset({"JPEG", "MPO"})
#: EXIF orientations that swap width and height when applied (rotations by 90° or 270°).
TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})
#: A resize to the network's input first shrinks by a whole factor with a box filter while the image stays
#: at least this many times the target (Pillow's ``reducing_gap``): 3 is "indistinguishable from a direct
#: resize" in Pillow's documentation, at a fraction of the cost on a 6–20 MP photo.
REDUCING_GAP = 3.0
#: PNG options (OpenCV's libpng), zlib level from the settings: masks are runs of 0 and 255, which run-length
#: coding packs best unfiltered; the confidence map is a smooth field that the "sub" filter turns into runs
#: of small differences, which run-length coding also packs: a third smaller than zlib's default strategy,
#: and no slower (the encode step of docs/performance.md, section 3).
_MASK_PNG = (
    cv2.IMWRITE_PNG_FILTER,
    cv2.IMWRITE_PNG_FILTER_NONE,
    cv2.IMWRITE_PNG_STRATEGY,
    cv2.IMWRITE_PNG_STRATEGY_RLE,
)
_MAP_PNG = (
    cv2.IMWRITE_PNG_FILTER,
    cv2.IMWRITE_PNG_FILTER_SUB,
    cv2.IMWRITE_PNG_STRATEGY,
    cv2.IMWRITE_PNG_STRATEGY_RLE,
)

#: Masks are binarized at this gray level (0–255).
MASK_THRESHOLD = 128

DEFAULT_MAX_PIXELS = 50_000_000


class ImageDecodeError(ValueError):
    """An image could not be turned into RGB pixels.

    Attributes:
        code: stable machine-readable reason: ``unsupported_media_type``, ``undecodable_image`` or
            ``image_too_large``.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _to_rgb(image: Image.Image) -> Image.Image:
    """Converts any Pillow mode (16-bit, palette, alpha, CMYK, gray) to 8-bit RGB."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        array = np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if image.mode == "F":
        array = np.clip(np.asarray(image, dtype=np.float64), 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels become white, like paper, rather than whatever colour they happen to hold.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


@dataclass(frozen=True)
class Photo:
    """A decoded photo: its pixels, perhaps reduced while decoding, and its own size.

    Attributes:
        pixels: uint8 RGB ``(h, w, 3)``, EXIF orientation applied; smaller than ``size`` when the decoder
            scaled it down (see :func:`decode_photo`).
        size: the photo's own ``(height, width)`` after EXIF orientation: the size of the mask it gets.
    """

    pixels: np.ndarray
    size: tuple[int, int]


def decode_image(source: bytes | str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decodes a photo at full size into an ``(H, W, 3)`` uint8 RGB array, EXIF orientation applied.

    Args:
        source: the encoded bytes, or a path to the file.
        max_pixels: larger images are refused (Pillow's decompression-bomb guard, made an error).

    Raises:
        ImageDecodeError: the bytes are no image, a format we do not take, truncated, or too large.
    """
    return decode_photo(source, max_pixels).pixels


def decode_photo(
    source: bytes | str | Path,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    at_least: tuple[int, int] | None = None,
) -> Photo:
    """Decodes a photo, EXIF orientation applied; a JPEG only as large as ``at_least`` needs.

    With ``at_least = (height, width)`` a JPEG is decoded at the smallest DCT scale (1/8, 1/4, 1/2 or 1)
    that keeps both sides at least that large: for the network's input that is 8–64 times fewer pixels to
    decode on a 6–20 MP photo, and the resize to the input that follows then averages fewer of them.
    Other formats have no such scaling and are decoded whole. The checks (formats, frames, the pixel
    limit, the decompression-bomb guard) are made on the stored size, before anything is decoded.

    Args:
        source: the encoded bytes, or a path to the file.
        max_pixels: larger images are refused (Pillow's decompression-bomb guard, made an error).
        at_least: the size the caller will resize to, or None for the full size.

    Raises:
        ImageDecodeError: the bytes are no image, a format we do not take, truncated, or too large.
    """
    name = str(source) if isinstance(source, str | Path) else "upload"
    stream = open(source, "rb") if isinstance(source, str | Path) else io.BytesIO(source)  # noqa: SIM115
    try:
        head = stream.read(8)
        stream.seek(0)
        if not head:
            raise ImageDecodeError("undecodable_image", f"{name}: the file is empty")
        for signature, kind in DOCUMENT_SIGNATURES.items():
            if head.startswith(signature):
                raise ImageDecodeError(
                    "unsupported_media_type",
                    f"{name}: a {kind} document, not a photo (JPEG, PNG, BMP or TIFF)",
                )
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            previous_limit = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = max_pixels
            try:
                image = Image.open(stream)
                if image.format not in SUPPORTED_FORMATS:
                    raise ImageDecodeError(
                        "unsupported_media_type",
                        f"{name}: format {image.format} is not supported (JPEG, PNG, BMP or TIFF)",
                    )
                frames = int(getattr(image, "n_frames", 1))
                if frames > 1 and image.format not in FIRST_FRAME_FORMATS:
                    raise ImageDecodeError(
                        "unsupported_media_type",
                        f"{name}: a {image.format} of {frames} frames or pages; send one photo",
                    )
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageDecodeError(
                        "image_too_large",
                        f"{name}: {width}x{height} pixels is over the limit of {max_pixels} pixels",
                    )
                orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
                size = (width, height) if orientation in TRANSPOSING_ORIENTATIONS else (height, width)
                if at_least is not None and image.format in DCT_SCALED_FORMATS:
                    # Square request: the scale then holds whichever way the EXIF orientation turns it.
                    side = max(at_least)
                    image.draft(image.mode, (side, side))
                image.load()
                rgb = _to_rgb(ImageOps.exif_transpose(image))
            finally:
                Image.MAX_IMAGE_PIXELS = previous_limit
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageDecodeError("image_too_large", f"{name}: {error}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError("undecodable_image", f"{name}: not a readable image") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageDecodeError("undecodable_image", f"{name}: cannot decode image ({error})") from None
    finally:
        stream.close()
    return Photo(np.asarray(rgb, dtype=np.uint8), size)


def load_mask(path: str | Path) -> np.ndarray:
    """Reads a ground-truth mask (any mode), binarized at :data:`MASK_THRESHOLD`; returns bool ``(H, W)``."""
    with Image.open(path) as image:
        gray = np.asarray(image.convert("L"))
    return gray >= MASK_THRESHOLD


def resize_image(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resizes an ``(H, W, 3)`` uint8 RGB array to ``size = (height, width)``; returns uint8."""
    height, width = size
    if rgb.shape[:2] == (height, width):
        return rgb
    image = Image.fromarray(rgb)
    return np.asarray(image.resize((width, height), IMAGE_RESAMPLE, reducing_gap=REDUCING_GAP))


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resizes a bool ``(H, W)`` mask to ``size = (height, width)`` with nearest-neighbour; returns bool."""
    height, width = size
    if mask.shape == (height, width):
        return mask
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(image.resize((width, height), MASK_RESAMPLE)) >= MASK_THRESHOLD


def resize_probability(probability: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resizes a float ``(h, w)`` probability map to ``size = (height, width)``; returns float32 in [0, 1]."""
    height, width = size
    probability = np.asarray(probability, dtype=np.float32)
    if probability.shape == (height, width):
        return probability
    # OpenCV's bilinear upsampling samples pixel centres as Pillow's does (same values to 1e-7 on the 192²
    # map), 25× faster on a 6 MP photo (docs/performance.md).
    resized = cv2.resize(probability, (width, height), interpolation=cv2.INTER_LINEAR)
    return np.clip(resized, 0.0, 1.0, out=resized)


def encode_png(array: np.ndarray, compress_level: int = 6) -> bytes:
    """Encodes a bool or uint8 ``(H, W)`` array as an 8-bit grayscale PNG (bool becomes 0/255).

    ``compress_level`` is zlib's 0–9. A bool mask is written with run-length coding and no row filter, a
    uint8 map with the "sub" filter and run-length coding: on a 6 MP photo both encode several times faster
    than Pillow's adaptive filtering, for files no larger (docs/performance.md).
    """
    options = _MASK_PNG if array.dtype == bool else _MAP_PNG
    if array.dtype == bool:
        array = array.view(np.uint8) * np.uint8(255)
    pixels = np.ascontiguousarray(array, dtype=np.uint8)
    ok, encoded = cv2.imencode(".png", pixels, [cv2.IMWRITE_PNG_COMPRESSION, compress_level, *options])
    if not ok:  # only for shapes that are no image, which callers never pass
        raise ValueError(f"cannot encode an array of shape {pixels.shape} as PNG")
    return encoded.tobytes()


def probability_to_uint8(probability: np.ndarray) -> np.ndarray:
    """The confidence map's pixels: round(probability × 255) as uint8, for probabilities in [0, 1].

    OpenCV's saturating conversion, 10× faster than numpy's rint-and-cast on a 6 MP map.
    """
    pixels: np.ndarray = cv2.convertScaleAbs(probability, alpha=255.0)
    return pixels
