"""What a clinic's integration may send to ``POST /segment``, good and bad, and what each must get back.

A corpus built here, in memory, from synthetic photos: wrong bodies, wrong files, hostile images, odd but
valid images and invalid options. Each :class:`Case` is a complete request (body, content type, query) and
its documented answer: a status and error code, or 200 with the photo's own size. The bad-input tests
send every case; the load run (``tests/load_run.py``) mixes them with good photos.

The service settings the expectations assume are :data:`CORPUS_LIMITS` (small limits, so that the
oversized cases stay cheap to build and send).
"""

from __future__ import annotations

import base64
import functools
import io
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from tests.conftest import make_lesion

#: Settings the corpus's expected answers are written for.
CORPUS_LIMITS: dict[str, Any] = {"max_upload_bytes": 2 * 1024 * 1024, "max_pixels": 4_000_000}

BOUNDARY = "dermaseg-corpus-boundary-7f3a9c"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


@dataclass(frozen=True)
class Part:
    """One part of a multipart body; ``filename`` and ``name`` are raw bytes (they may be any bytes)."""

    name: bytes
    data: bytes
    filename: bytes | None = b"photo"
    content_type: str | None = "application/octet-stream"


def multipart(*parts: Part, boundary: str = BOUNDARY, close: bool = True) -> bytes:
    """A ``multipart/form-data`` body of ``parts`` (``close=False`` leaves the closing boundary out)."""
    body = bytearray()
    for part in parts:
        disposition = b'form-data; name="' + part.name + b'"'
        if part.filename is not None:
            disposition += b'; filename="' + part.filename + b'"'
        body += f"--{boundary}\r\n".encode() + b"Content-Disposition: " + disposition + b"\r\n"
        if part.content_type is not None:
            body += f"Content-Type: {part.content_type}\r\n".encode()
        body += b"\r\n" + part.data + b"\r\n"
    if close:
        body += f"--{boundary}--\r\n".encode()
    return bytes(body)


def photo_part(data: bytes, filename: bytes = b"photo.jpg", content_type: str = "image/jpeg") -> Part:
    return Part(b"file", data, filename, content_type)


@dataclass(frozen=True)
class Case:
    """One request and its documented answer.

    Attributes:
        name: what it is (unique).
        body: the request body.
        status: the answer's status.
        code: the error code, or None for a valid photo (answered 200).
        content_type: the request's Content-Type.
        query: the query string (without ``?``).
        size: for a valid photo, the ``(width, height)`` the answer must report (EXIF orientation applied).
    """

    name: str
    body: bytes
    status: int
    code: str | None
    content_type: str = MULTIPART
    query: str = ""
    size: tuple[int, int] | None = None

    @property
    def valid(self) -> bool:
        return self.code is None

    @property
    def path(self) -> str:
        return f"/segment?{self.query}" if self.query else "/segment"

    @property
    def headers(self) -> dict[str, str]:
        return {"Content-Type": self.content_type}


def encode(image: Image.Image | np.ndarray, fmt: str, **options: Any) -> bytes:
    picture = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    buffer = io.BytesIO()
    picture.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def lesion(size: tuple[int, int] = (120, 160), seed: int = 0) -> np.ndarray:
    """A synthetic photo, ``size = (height, width)``."""
    return make_lesion(size, seed)[0]


def good_photos() -> list[Case]:
    """Ordinary valid uploads of a few sizes and formats (the load run's bread and butter)."""
    cases = []
    for index, (height, width, fmt) in enumerate(
        [(240, 320, "JPEG"), (300, 300, "PNG"), (180, 260, "JPEG"), (256, 192, "BMP"), (200, 150, "TIFF")]
    ):
        data = encode(lesion((height, width), seed=index), fmt, **({"quality": 92} if fmt == "JPEG" else {}))
        cases.append(
            Case(f"good {fmt} {width}x{height}", multipart(photo_part(data)), 200, None, size=(width, height))
        )
    return cases


def png_bomb(width: int = 20_000, height: int = 20_000) -> bytes:
    """A real decompression bomb: a valid gray PNG of zeros (20000² inflates to 400 MB; 0.4 MB sent)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte 0, then the row's pixels
    deflated = bytearray()
    for _ in range(height):
        deflated += compressor.compress(row)
    deflated += compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", bytes(deflated)) + chunk(b"IEND", b"")
    )


def _bmp_with_size(width: int, height: int) -> bytes:
    """A genuine 20 × 10 BMP whose header then claims ``width × height`` (its pixel data stays 20 × 10)."""
    data = bytearray(encode(lesion((10, 20)), "BMP"))
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def _exif_rotated_jpeg() -> bytes:
    image = Image.fromarray(lesion((90, 160), seed=3))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90° clockwise: portrait
    return encode(image, "JPEG", exif=exif.tobytes(), quality=92)


def _animated_gif() -> bytes:
    frames = [Image.fromarray(lesion((60, 60), seed=seed)).convert("P") for seed in range(3)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _multipage_tiff() -> bytes:
    pages = [Image.fromarray(lesion((60, 80), seed=seed)) for seed in range(3)]
    return encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])


def _pdf() -> bytes:
    return encode(Image.fromarray(lesion((60, 80))), "PDF")


@functools.cache
def corpus() -> tuple[Case, ...]:
    """Every case: bad inputs of more than twenty kinds, odd-but-valid images, and the good photos."""
    photo = encode(lesion((150, 200), seed=7), "JPEG", quality=92)
    png = encode(lesion((150, 200), seed=8), "PNG")
    rgb = lesion((120, 90), seed=9)
    gray16 = (np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    photo_multipart = multipart(photo_part(photo))

    def bad(name: str, body: bytes, status: int, code: str, **kwargs: Any) -> Case:
        return Case(name, body, status, code, **kwargs)

    def image(name: str, data: bytes, status: int, code: str | None, **kwargs: Any) -> Case:
        return Case(name, multipart(photo_part(data)), status, code, **kwargs)

    cases: list[Case] = [
        # The request itself is wrong.
        bad("empty body", b"", 400, "malformed_request"),
        bad("multipart without a boundary", photo_multipart, 400, "malformed_request",
            content_type="multipart/form-data"),
        bad("multipart cut before its closing boundary", multipart(photo_part(photo), close=False), 400,
            "malformed_request"),
        bad("multipart with another boundary", multipart(photo_part(photo), boundary="other"), 400,
            "malformed_request"),
        bad("missing file field", multipart(Part(b"threshold", b"0.5", None, None)), 422, "validation_error"),
        bad("file under another name", multipart(Part(b"image", photo, b"a.jpg", "image/jpeg")), 422,
            "validation_error"),
        bad("two files", multipart(photo_part(photo), photo_part(png, b"b.png", "image/png")), 422,
            "validation_error"),
        bad("photo sent raw, not multipart", photo, 415, "unsupported_media_type", content_type="image/jpeg"),
        bad("JSON body", b'{"file": "aGVsbG8="}', 415, "unsupported_media_type",
            content_type="application/json"),
        bad("URL-encoded form", b"file=photo.jpg", 415, "unsupported_media_type",
            content_type="application/x-www-form-urlencoded"),
        bad("body over the byte limit", multipart(photo_part(bytes(3 * 1024 * 1024))), 413,
            "payload_too_large"),
        # The file is not a photo we take.
        image("zero-length file", b"", 400, "undecodable_image"),
        image("text sent as an image", b"Patient notes: nothing to see here.\n" * 20, 400,
              "undecodable_image"),
        image("HTML sent as an image", b"<!doctype html><html><body>photo</body></html>", 400,
              "undecodable_image"),
        image("PDF sent as an image", _pdf(), 415, "unsupported_media_type"),
        image("ZIP sent as an image", b"PK\x03\x04" + bytes(100), 415, "unsupported_media_type"),
        image("truncated JPEG", photo[: len(photo) // 2], 400, "undecodable_image"),
        image("truncated PNG", png[: len(png) // 2], 400, "undecodable_image"),
        image("JPEG header only", photo[:200], 400, "undecodable_image"),
        image("animated GIF", _animated_gif(), 415, "unsupported_media_type"),
        image("WebP", encode(rgb, "WEBP"), 415, "unsupported_media_type"),
        image("multi-page TIFF", _multipage_tiff(), 415, "unsupported_media_type"),
        image("PNG decompression bomb (20000 x 20000)", png_bomb(), 413, "image_too_large"),
        image("image over the pixel limit", encode(np.full((2000, 2100, 3), 200, np.uint8), "JPEG"), 413,
              "image_too_large"),
        image("BMP whose header claims 30000 x 30000", _bmp_with_size(30_000, 30_000), 413,
              "image_too_large"),
        image("BMP whose header claims more rows than it holds", _bmp_with_size(400, 300), 400,
              "undecodable_image"),
        image("BMP whose header claims a zero width", _bmp_with_size(0, 10), 400, "undecodable_image"),
        # Odd but valid: answered like any photo, at the photo's own size.
        image("1 x 1 PNG", encode(np.full((1, 1, 3), 90, np.uint8), "PNG"), 200, None, size=(1, 1)),
        image("10 x 100000 PNG", encode(np.full((100_000, 10, 3), 150, np.uint8), "PNG"), 200, None,
              size=(10, 100_000)),
        image("16-bit grayscale PNG", encode(Image.fromarray(gray16), "PNG"), 200, None, size=(90, 120)),
        image("16-bit grayscale TIFF", encode(Image.fromarray(gray16), "TIFF"), 200, None, size=(90, 120)),
        image("CMYK JPEG", encode(Image.fromarray(rgb).convert("CMYK"), "JPEG"), 200, None, size=(90, 120)),
        image("palette PNG", encode(Image.fromarray(rgb).convert("P"), "PNG"), 200, None, size=(90, 120)),
        image("RGBA PNG", encode(Image.fromarray(rgb).convert("RGBA"), "PNG"), 200, None, size=(90, 120)),
        image("grayscale JPEG", encode(Image.fromarray(rgb).convert("L"), "JPEG"), 200, None, size=(90, 120)),
        image("grayscale + alpha PNG", encode(Image.fromarray(rgb).convert("LA"), "PNG"), 200, None,
              size=(90, 120)),
        image("EXIF-rotated JPEG", _exif_rotated_jpeg(), 200, None, size=(90, 160)),
        Case("non-UTF-8 filename", multipart(photo_part(photo, b"\xff\xfe\x81 photo \xe9.jpg")), 200, None,
             size=(200, 150)),
        Case("JPEG labelled as a PDF", multipart(photo_part(photo, b"x.pdf", "application/pdf")), 200, None,
             size=(200, 150)),
        # Options out of range or of the wrong type.
        Case("threshold above 1", photo_multipart, 422, "validation_error", query="threshold=1.5"),
        Case("threshold below 0", photo_multipart, 422, "validation_error", query="threshold=-0.1"),
        Case("threshold not a number", photo_multipart, 422, "validation_error", query="threshold=high"),
        Case("threshold NaN", photo_multipart, 422, "validation_error", query="threshold=nan"),
        Case("negative pixel spacing", photo_multipart, 422, "validation_error",
             query="pixel_spacing_mm=-0.1"),
        Case("unknown output", photo_multipart, 422, "validation_error", query="outputs=mask,xray"),
        Case("unknown answer format", photo_multipart, 422, "validation_error", query="format=gif"),
        Case("option as a form field out of range",
             multipart(photo_part(photo), Part(b"threshold", b"7", None, None)), 422, "validation_error"),
        Case("option both in the query and the form",
             multipart(photo_part(photo), Part(b"threshold", b"0.4", None, None)), 422, "validation_error",
             query="threshold=0.4"),
    ]  # fmt: skip
    cases.extend(good_photos())
    names = [case.name for case in cases]
    assert len(names) == len(set(names)), "case names must be unique"
    return tuple(cases)


def mask_of(answer: dict[str, Any]) -> np.ndarray:
    """The mask of a JSON answer of ``POST /segment`` (its base64 PNG) as a uint8 array."""
    with Image.open(io.BytesIO(base64.b64decode(answer["mask_png"]))) as image:
        return np.asarray(image)


def bad_cases() -> Sequence[Case]:
    return [case for case in corpus() if not case.valid]


def valid_cases() -> Sequence[Case]:
    return [case for case in corpus() if case.valid]
