"""The benchmark's inputs: the photo every section is measured on, the large photos, validation photos.

The photo is ``../shared/data/samples/images/ISIC_0009995.jpg`` (1024×768 JPEG) beside the checkout;
where it is absent, a synthetic 1024×768 JPEG of a dark ellipse on skin stands in (the report says which).
The large photos are the 6 MP and 12 MP samples beside it (sections 3 and 4 skip them when absent).
Validation photos (with expert masks) come from the run's ``split.json`` validation side when known,
otherwise from ``../shared/data/ph2``.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from service.imaging import decode_image, load_mask

logger = logging.getLogger(__name__)

#: ``../shared/data`` beside the checkout.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PHOTO_NAME = "ISIC_0009995.jpg"
DEFAULT_PHOTO = SHARED_DATA / "samples" / "images" / PHOTO_NAME
PHOTO_SIZE = (768, 1024)  # (height, width)
#: The sizes clinics send: 3008×2000 (6 MP) and 4288×2848 (12 MP) dermatoscope photos.
LARGE_PHOTOS = (
    SHARED_DATA / "samples" / "images" / "ISIC_0012099.jpg",
    SHARED_DATA / "samples" / "images" / "ISIC_0012383.jpg",
)
DEFAULT_VALIDATION_ROOT = SHARED_DATA / "ph2"
SELECTION_SEED = 0


@dataclass(frozen=True)
class Photo:
    """The encoded photo as a client sends it, its pixels, and where it came from."""

    data: bytes
    rgb: np.ndarray
    source: str
    content_type: str = "image/jpeg"
    filename: str = PHOTO_NAME

    @property
    def description(self) -> str:
        height, width = self.rgb.shape[:2]
        return f"{self.source} ({width}×{height}, {len(self.data) / 1024:.0f} KiB)"


def synthetic_photo(size: tuple[int, int] = PHOTO_SIZE, seed: int = 0) -> bytes:
    """A JPEG (quality 90) of a dark brown ellipse on textured skin, ``size = (height, width)``."""
    height, width = size
    generator = np.random.default_rng(seed)
    rows, columns = np.mgrid[0:height, 0:width].astype(np.float32)
    skin = np.array([224.0, 176.0, 150.0], dtype=np.float32)
    lesion = np.array([110.0, 70.0, 55.0], dtype=np.float32)
    inside = ((rows - height / 2) / (height * 0.25)) ** 2 + ((columns - width / 2) / (width * 0.2)) ** 2 <= 1
    image = np.where(inside[..., None], lesion, skin) + generator.normal(0, 6, (height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def load_photo(path: Path | None = None) -> Photo:
    """The photo at ``path`` (default :data:`DEFAULT_PHOTO`), or a synthetic one when that is absent.

    An explicit ``path`` that does not exist is an error; only the default falls back.
    """
    if path is not None:
        data = Path(path).read_bytes()
        return Photo(data, decode_image(data), _shown(Path(path)), filename=Path(path).name)
    if DEFAULT_PHOTO.is_file():
        data = DEFAULT_PHOTO.read_bytes()
        return Photo(data, decode_image(data), f"../shared/data/samples/images/{PHOTO_NAME}")
    logger.warning("%s not found: using a synthetic 1024×768 JPEG", DEFAULT_PHOTO)
    data = synthetic_photo()
    return Photo(data, decode_image(data), "synthetic 1024×768 JPEG (the sample photo was not found)")


def load_photos(paths: Sequence[Path]) -> tuple[list[Photo], list[str]]:
    """The photos at ``paths`` that exist, and a line for each one that does not."""
    photos, missing = [], []
    for path in paths:
        if Path(path).is_file():
            photos.append(load_photo(Path(path)))
        else:
            missing.append(f"{_shown(Path(path))} not found")
    return photos, missing


def _shown(path: Path) -> str:
    """``path`` as ``../shared/data/…`` when it is there (the report's way of naming the data)."""
    try:
        return f"../shared/data/{path.resolve().relative_to(SHARED_DATA.resolve())}"
    except ValueError:
        return str(path)


@dataclass
class LabelledPhotos:
    """Validation photos with their expert masks, and photos to calibrate int8 on (disjoint from them)."""

    images: list[np.ndarray] = field(default_factory=list)
    truths: list[np.ndarray] = field(default_factory=list)
    calibration: list[np.ndarray] = field(default_factory=list)
    source: str = "none"


def _pick(items: list, count: int, seed: int = SELECTION_SEED) -> list:
    order = np.random.default_rng(seed).permutation(len(items))
    return [items[index] for index in order[:count]]


def load_labelled_photos(
    split: Path | None, root: Path | None, validation_count: int, calibration_count: int
) -> LabelledPhotos:
    """Validation photos from ``split`` (its ``val`` side) or else ``root``; calibration from the rest.

    Missing data is not an error: the result is then empty and says why in ``source``.
    """
    from training.data import DataError, load_samples
    from training.split import load_split

    validation, rest, source = [], [], "none"
    if split is not None and split.is_file():
        try:
            train, val = load_split(split)
            validation = [s for s in val if s.image_path.is_file() and s.mask_path.is_file()]
            rest = [s for s in train if s.image_path.is_file()]
            source = f"validation side of {split}"
        except DataError as error:
            logger.warning("ignoring %s: %s", split, error)
    if not validation and root is not None and root.is_dir():
        try:
            samples = load_samples([root])
        except DataError as error:
            logger.warning("no validation photos from %s: %s", root, error)
            samples = []
        shuffled = _pick(samples, len(samples))
        validation, rest = shuffled[:validation_count], shuffled[validation_count:]
        source = f"a seeded draw of {root}"
    if not validation:
        return LabelledPhotos(source="no validation photos found (give --data DIR or a run's split.json)")
    chosen = _pick(validation, validation_count)
    photos = LabelledPhotos(source=f"{len(chosen)} photos, {source}")
    for sample in chosen:
        image = decode_image(sample.image_path)
        truth = load_mask(sample.mask_path)
        if truth.shape != image.shape[:2]:
            logger.warning("skipping %s: mask and image sizes differ", sample.image_path)
            continue
        photos.images.append(image)
        photos.truths.append(truth)
    photos.calibration = [decode_image(sample.image_path) for sample in _pick(rest, calibration_count)]
    return photos
