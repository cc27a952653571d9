"""Decoding every kind of upload, and the resize and encode helpers shared by training and serving."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.imaging import (
    ImageDecodeError,
    decode_image,
    decode_photo,
    encode_png,
    load_mask,
    probability_to_uint8,
    resize_image,
    resize_mask,
    resize_probability,
)

EXIF_ORIENTATION = 0x0112


def encode(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def quadrants(height: int, width: int) -> np.ndarray:
    """Four flat colours, one per quadrant, so that rotations and flips are told apart after JPEG."""
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[: height // 2, : width // 2] = (255, 0, 0)  # top left: red
    rgb[: height // 2, width // 2 :] = (0, 255, 0)  # top right: green
    rgb[height // 2 :, : width // 2] = (0, 0, 255)  # bottom left: blue
    rgb[height // 2 :, width // 2 :] = (255, 255, 0)  # bottom right: yellow
    return rgb


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR claiming ``width`` × ``height``, without pixel data: a tiny 'bomb'."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


# --- decode_image -------------------------------------------------------------------------------------------


def test_exif_orientation_6_rotates_the_pixels_and_swaps_width_and_height():
    stored = quadrants(40, 60)  # landscape as stored; orientation 6: display rotated 90° clockwise
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    data = encode(Image.fromarray(stored), "JPEG", exif=exif.tobytes(), quality=95)

    decoded = decode_image(data)

    assert decoded.shape == (60, 40, 3)
    expected = np.rot90(stored, k=-1)  # clockwise
    assert np.abs(decoded.astype(int) - expected.astype(int)).mean() < 8
    # The stored top-left (red) quadrant is now at the top right.
    assert tuple(decoded[5, -5]) == pytest.approx((255, 0, 0), abs=30)


def test_sixteen_bit_png_is_scaled_to_eight_bits():
    values = np.array([[0, 257 * 128, 65535]], dtype=np.uint16).repeat(4, axis=0)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    data = encode(image, "PNG")
    with Image.open(io.BytesIO(data)) as reread:
        assert reread.mode.startswith("I")  # Pillow reads a 16-bit gray PNG as I;16 (or I)

    decoded = decode_image(data)

    assert decoded.dtype == np.uint8
    assert decoded.shape == (4, 3, 3)
    assert decoded[0, :, 0].tolist() == [0, 128, 255]
    assert (decoded[..., 0] == decoded[..., 2]).all()


def test_cmyk_jpeg_becomes_rgb():
    data = encode(Image.new("CMYK", (16, 12), (0, 255, 255, 0)), "JPEG", quality=95)  # pure red

    decoded = decode_image(data)

    assert decoded.shape == (12, 16, 3)
    assert tuple(decoded[6, 8]) == pytest.approx((255, 0, 0), abs=12)


def test_palette_png_with_transparency_turns_transparent_pixels_white():
    image = Image.new("P", (8, 4))
    image.putpalette([0, 0, 255, 200, 30, 40] + [0] * (256 * 3 - 6))
    pixels = np.zeros((4, 8), np.uint8)
    pixels[:, 4:] = 1
    image.putdata(pixels.ravel().tolist())
    data = encode(image, "PNG", transparency=0)  # palette index 0 (blue) is transparent

    decoded = decode_image(data)

    assert (decoded[:, :4] == 255).all()
    assert (decoded[:, 4:] == (200, 30, 40)).all()


def test_rgba_png_composites_on_white():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = (0, 0, 0)
    rgba[0, 0, 3] = 255  # one opaque black pixel, the rest transparent
    decoded = decode_image(encode(Image.fromarray(rgba, mode="RGBA"), "PNG"))
    assert tuple(decoded[0, 0]) == (0, 0, 0)
    assert (decoded[1, 1] == 255).all()


def test_grayscale_is_repeated_over_three_channels():
    decoded = decode_image(encode(Image.new("L", (5, 3), 77), "PNG"))
    assert decoded.shape == (3, 5, 3)
    assert (decoded == 77).all()


def test_decodes_from_a_path_too(tmp_path: Path):
    path = tmp_path / "photo.png"
    Image.fromarray(quadrants(8, 10)).save(path)
    assert (decode_image(path) == quadrants(8, 10)).all()
    assert (decode_image(str(path)) == quadrants(8, 10)).all()


@pytest.mark.parametrize("max_pixels", [1_000_000, 300_000_000])
def test_a_header_claiming_a_huge_image_is_refused_before_decoding(max_pixels: int):
    # 20000 × 20000 = 4e8 pixels: over twice 1e6 (Pillow's bomb error) and between 1× and 2× 3e8 (its
    # warning): both must end as image_too_large, without allocating anything.
    data = png_header_only(20_000, 20_000)
    assert len(data) < 100

    with pytest.raises(ImageDecodeError) as caught:
        decode_image(data, max_pixels=max_pixels)

    assert caught.value.code == "image_too_large"
    assert "20000x20000" in caught.value.message or "pixels" in caught.value.message


def test_the_bomb_guard_is_restored_after_decoding():
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageDecodeError):
        decode_image(png_header_only(20_000, 20_000), max_pixels=1000)
    assert before == Image.MAX_IMAGE_PIXELS


def test_an_image_within_the_limit_decodes():
    data = encode(Image.new("RGB", (100, 100), (1, 2, 3)), "PNG")
    assert decode_image(data, max_pixels=10_000).shape == (100, 100, 3)
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(data, max_pixels=9_999)
    assert caught.value.code == "image_too_large"


def test_truncated_jpeg_is_undecodable():
    data = encode(Image.fromarray(quadrants(64, 64)), "JPEG", quality=95)
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(data[: len(data) // 2])
    assert caught.value.code == "undecodable_image"


def test_gif_is_an_unsupported_media_type():
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(encode(Image.new("P", (4, 4)), "GIF"))
    assert caught.value.code == "unsupported_media_type"
    assert "GIF" in caught.value.message


def test_random_bytes_are_undecodable():
    data = np.random.default_rng(0).integers(0, 256, 2048, dtype=np.uint8).tobytes()
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(data)
    assert caught.value.code == "undecodable_image"


def test_errors_name_the_file(tmp_path: Path):
    path = tmp_path / "broken-photo.jpg"
    path.write_bytes(b"not an image at all")
    with pytest.raises(ImageDecodeError, match=r"broken-photo\.jpg"):
        decode_image(path)


def test_decode_error_is_a_value_error_with_a_code():
    error = ImageDecodeError("undecodable_image", "upload: nope")
    assert isinstance(error, ValueError)
    assert (error.code, error.message, str(error)) == ("undecodable_image", "upload: nope", "upload: nope")


# --- resize and encode --------------------------------------------------------------------------------------


def test_resize_image_gives_uint8_of_the_asked_height_and_width():
    rgb = quadrants(30, 40)
    resized = resize_image(rgb, (64, 48))
    assert resized.shape == (64, 48, 3)
    assert resized.dtype == np.uint8
    assert tuple(resized[2, 2]) == (255, 0, 0)  # the quadrants stay where they were
    assert tuple(resized[-3, -3]) == (255, 255, 0)
    assert resize_image(rgb, (30, 40)) is rgb


def test_resize_mask_stays_binary_and_nearest():
    mask = np.array([[True, False], [False, True]])
    resized = resize_mask(mask, (4, 6))
    assert resized.dtype == bool
    assert resized.shape == (4, 6)
    expected = np.array([[1, 1, 1, 0, 0, 0]] * 2 + [[0, 0, 0, 1, 1, 1]] * 2, dtype=bool)
    assert (resized == expected).all()

    rng = np.random.default_rng(0)
    noisy = rng.random((37, 53)) > 0.5
    down = resize_mask(noisy, (16, 20))
    assert down.dtype == bool and set(np.unique(down)) <= {False, True}


def test_resize_probability_is_float32_within_zero_and_one():
    probability = np.array([[0.0, 1.0], [1.0, 0.0]], np.float32)
    resized = resize_probability(probability, (8, 8))
    assert resized.shape == (8, 8)
    assert resized.dtype == np.float32
    assert resized.min() >= 0.0 and resized.max() <= 1.0
    assert 0.0 < resized[3, 3] < 1.0  # bilinear: intermediate values in between
    same = resize_probability(probability.astype(np.float64), (2, 2))
    assert same.dtype == np.float32


def test_encode_png_round_trips_bool_and_uint8():
    mask = np.zeros((5, 7), bool)
    mask[1:3, 2:6] = True
    with Image.open(io.BytesIO(encode_png(mask))) as image:
        assert image.mode == "L"
        decoded = np.asarray(image)
    assert set(np.unique(decoded)) == {0, 255}
    assert ((decoded == 255) == mask).all()

    gray = np.arange(35, dtype=np.uint8).reshape(5, 7) * 7
    with Image.open(io.BytesIO(encode_png(gray))) as image:
        assert (np.asarray(image) == gray).all()


def test_load_mask_binarizes_at_128(tmp_path: Path):
    values = np.array([[0, 127, 128, 255]], np.uint8)
    Image.fromarray(values, mode="L").save(tmp_path / "gray.png")
    Image.fromarray(np.repeat(values[..., None], 3, axis=2), mode="RGB").save(tmp_path / "rgb.bmp")
    for name in ("gray.png", "rgb.bmp"):
        mask = load_mask(tmp_path / name)
        assert mask.dtype == bool
        assert mask.tolist() == [[False, False, True, True]]


# --- decode_photo: a JPEG decoded only as large as the network needs ---------------------------------------


def test_jpeg_is_decoded_at_the_smallest_dct_scale_that_still_covers_the_input():
    data = encode(Image.fromarray(quadrants(400, 640)), "JPEG", quality=95)

    photo = decode_photo(data, at_least=(48, 48))

    assert photo.size == (400, 640)
    # 640 // 48 = 13, 400 // 48 = 8: libjpeg's largest scale is 1/8.
    assert photo.pixels.shape == (50, 80, 3)
    assert tuple(photo.pixels[10, 10]) == pytest.approx((255, 0, 0), abs=30)
    assert tuple(photo.pixels[40, 70]) == pytest.approx((255, 255, 0), abs=30)
    # Without a target, or for a target as large as the photo, nothing is reduced.
    assert decode_photo(data).pixels.shape == (400, 640, 3)
    assert decode_photo(data, at_least=(400, 400)).pixels.shape == (400, 640, 3)


def test_reduced_jpeg_keeps_the_exif_orientation_and_the_rotated_size():
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # stored rotated: display turns it 90° clockwise
    data = encode(Image.fromarray(quadrants(320, 480)), "JPEG", exif=exif.tobytes(), quality=95)

    photo = decode_photo(data, at_least=(40, 40))

    assert photo.size == (480, 320)
    assert photo.pixels.shape == (60, 40, 3)
    np.testing.assert_array_equal(decode_photo(data).pixels.shape, (480, 320, 3))
    assert tuple(photo.pixels[5, -5]) == pytest.approx((255, 0, 0), abs=30)


def test_formats_without_dct_scaling_decode_whole_and_keep_the_guards():
    png = encode(Image.fromarray(quadrants(100, 160)), "PNG")
    photo = decode_photo(png, at_least=(16, 16))
    assert photo.pixels.shape == (100, 160, 3)
    assert photo.size == (100, 160)
    jpeg = encode(Image.fromarray(quadrants(100, 160)), "JPEG")
    with pytest.raises(ImageDecodeError) as caught:
        decode_photo(jpeg, max_pixels=15_999, at_least=(16, 16))
    assert caught.value.code == "image_too_large"


def test_probability_to_uint8_rounds_like_numpy():
    probability = np.random.default_rng(4).random((64, 64), dtype=np.float32)
    probability[0, :4] = (0.0, 1.0, 0.5 / 255, 1.5 / 255)
    expected = np.rint(probability * 255.0).astype(np.uint8)
    np.testing.assert_array_equal(probability_to_uint8(probability), expected)


def test_resize_probability_matches_pillows_bilinear_upsampling():
    probability = np.random.default_rng(5).random((12, 12), dtype=np.float32)
    pillow = np.asarray(Image.fromarray(probability, mode="F").resize((100, 75), Image.Resampling.BILINEAR))
    np.testing.assert_allclose(resize_probability(probability, (75, 100)), np.clip(pillow, 0, 1), atol=1e-5)
