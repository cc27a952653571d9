"""Image decoding and resizing shared by training, evaluation and the service.

Everything that turns a file into the network's input, or the network's output back into a mask the size
of the photo, lives here, so that what `dermaseg evaluate` measures is exactly what `POST /segment` serves.
No TensorFlow: the service imports this module.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

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
#: Interpolation used to bring the probability map back to the photo's own size (before thresholding).
PROBABILITY_RESAMPLE = Image.Resampling.BILINEAR

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


def decode_image(source: bytes | str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decodes a photo into an ``(H, W, 3)`` uint8 RGB array, EXIF orientation applied.

    Args:
        source: the encoded bytes, or a path to the file.
        max_pixels: larger images are refused (Pillow's decompression-bomb guard, made an error).

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
    return np.asarray(rgb, dtype=np.uint8)


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
    return np.asarray(Image.fromarray(rgb).resize((width, height), IMAGE_RESAMPLE))


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
    resized = Image.fromarray(probability, mode="F").resize((width, height), PROBABILITY_RESAMPLE)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def encode_png(array: np.ndarray, compress_level: int = 6) -> bytes:
    """Encodes a bool or uint8 ``(H, W)`` array as an 8-bit grayscale PNG (bool becomes 0/255).

    ``compress_level`` is zlib's 0–9 (Pillow's default 6). For a 1024 × 768 confidence map level 1 encodes
    about 4× faster than 6 for a file about 30 % larger (docs/performance.md has the service-level figures).
    """
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8), mode="L").save(
        buffer, format="PNG", compress_level=compress_level
    )
    return buffer.getvalue()
