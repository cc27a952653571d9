"""Shared test helpers: synthetic lesion images in every dataset layout, and the real data beside the repo."""

from __future__ import annotations

import csv
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from service.routes.deps import WARMING_UP

#: The real datasets (never copied into the repository): ``../shared/data`` beside the checkout.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

#: Layouts :func:`make_dataset` writes.
LAYOUTS = ("normalized", "ph2", "isic2016", "isic2017")
#: Diagnoses cycled through in the normalized layout.
DIAGNOSES = ("nevus", "melanoma", "seborrheic keratosis")
PH2_DIAGNOSES = ("common nevus", "atypical nevus", "melanoma")

SKIN_RGB = np.array([224.0, 176.0, 150.0])
LESION_RGB = np.array([110.0, 70.0, 55.0])


@pytest.fixture
def shared_data() -> Path:
    """The real datasets' folder (``ph2/``, ``isic2017_train/``, ``samples/``); skips the test without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (../shared/data beside the checkout)")
    return SHARED_DATA


def make_lesion(size: int | tuple[int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic dermoscopy-like photo: a darker ellipse on textured skin.

    Args:
        size: side of a square image, or ``(height, width)``.
        seed: seeds the texture and the ellipse.

    Returns:
        uint8 ``(H, W, 3)`` RGB and its bool ``(H, W)`` lesion mask (a non-empty ellipse inside the image).
    """
    height, width = (size, size) if isinstance(size, int) else size
    generator = np.random.default_rng(seed)
    rows, columns = np.mgrid[0:height, 0:width].astype(np.float64)
    center_row = height * generator.uniform(0.4, 0.6)
    center_column = width * generator.uniform(0.4, 0.6)
    radius_row = max(2.0, height * generator.uniform(0.15, 0.3))
    radius_column = max(2.0, width * generator.uniform(0.15, 0.3))
    angle = generator.uniform(0, np.pi)
    along = (rows - center_row) * np.cos(angle) + (columns - center_column) * np.sin(angle)
    across = -(rows - center_row) * np.sin(angle) + (columns - center_column) * np.cos(angle)
    mask = (along / radius_row) ** 2 + (across / radius_column) ** 2 <= 1.0
    mask[int(center_row), int(center_column)] = True  # never empty, however small the image

    # Skin: a smooth shading, a gentle waviness, and fine noise; the lesion: darker and browner.
    shading = 1.0 + 0.08 * np.sin(rows / height * np.pi * generator.uniform(1, 3) + generator.uniform(0, 6))
    waves = 6.0 * np.sin(columns / 3.0 + generator.uniform(0, 6)) * np.cos(rows / 4.0)
    image = SKIN_RGB * shading[..., None] + waves[..., None]
    image[mask] = LESION_RGB + generator.normal(0, 8, size=(int(mask.sum()), 3))
    image += generator.normal(0, 4, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), mask


def _save_mask(mask: np.ndarray, path: Path, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").convert(mode).save(path)


def _save_image(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"quality": 95} if path.suffix == ".jpg" else {}
    Image.fromarray(image).save(path, **options)


def make_dataset(
    root: Path, layout: str = "normalized", n: int = 6, size: int | tuple[int, int] = 64, seed: int = 0
) -> Path:
    """Writes ``n`` synthetic image/mask pairs in one of the layouts ``training.data.discover`` reads.

    Layouts:
        ``normalized``: ``images/SYN_nnnn.jpg``, ``masks/SYN_nnnn.png``, ``manifest.csv``
            (``id,split,orig_width,orig_height,diagnosis``, diagnoses cycling through :data:`DIAGNOSES`).
        ``ph2``: ``PH2 Dataset images/IMDnnn/IMDnnn_Dermoscopic_Image/IMDnnn.bmp`` and
            ``IMDnnn_lesion/IMDnnn_lesion.bmp`` (RGB 0/255 BMP masks, as PH2 has them), and a ``||``-separated
            ``PH2_dataset.txt`` with clinical diagnosis codes cycling 0, 1, 2.
        ``isic2016``: images and ``ISIC_nnnnnnn_Segmentation.png`` masks in one folder
            ``ISBI2016_ISIC_Part1_Training_Data``, no diagnoses.
        ``isic2017``: ``ISIC-2017_Training_Data/ISIC_nnnnnnn.jpg`` (plus a ``_superpixels.png`` decoy each),
            ``ISIC-2017_Training_Part1_GroundTruth/ISIC_nnnnnnn_segmentation.png`` and
            ``ISIC-2017_Training_Part3_GroundTruth.csv`` (nevus, melanoma, seborrheic keratosis in turn).

    Args:
        root: the folder to write into (created); pass it to ``discover``.
        layout: one of :data:`LAYOUTS`.
        n: number of pairs.
        size: side of the square images, or ``(height, width)``.
        seed: pair ``i`` uses seed ``seed + i``.

    Returns:
        ``root``.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    pairs = [make_lesion(size, seed + index) for index in range(n)]
    if layout == "normalized":
        with (root / "manifest.csv").open("w", newline="") as stream:
            writer = csv.writer(stream)
            writer.writerow(["id", "split", "orig_width", "orig_height", "diagnosis"])
            for index, (image, mask) in enumerate(pairs):
                sample_id = f"SYN_{index:04d}"
                _save_image(image, root / "images" / f"{sample_id}.jpg")
                _save_mask(mask, root / "masks" / f"{sample_id}.png")
                writer.writerow([sample_id, "train", image.shape[1], image.shape[0], DIAGNOSES[index % 3]])
    elif layout == "ph2":
        lines = [
            "||   Name || Histological Diagnosis || Clinical Diagnosis || Asymmetry | Pigment Network ||"
        ]
        for index, (image, mask) in enumerate(pairs):
            sample_id = f"IMD{index + 2:03d}"
            case = root / "PH2 Dataset images" / sample_id
            _save_image(image, case / f"{sample_id}_Dermoscopic_Image" / f"{sample_id}.bmp")
            _save_mask(mask, case / f"{sample_id}_lesion" / f"{sample_id}_lesion.bmp", mode="RGB")
            lines.append(
                f"|| {sample_id} ||                        ||                  {index % 3} ||  0 |  T ||"
            )
        (root / "PH2_dataset.txt").write_text("\n".join(lines) + "\n")
    elif layout == "isic2016":
        folder = root / "ISBI2016_ISIC_Part1_Training_Data"
        for index, (image, mask) in enumerate(pairs):
            sample_id = f"ISIC_{index:07d}"
            _save_image(image, folder / f"{sample_id}.jpg")
            _save_mask(mask, folder / f"{sample_id}_Segmentation.png")
    else:
        rows = [["image_id", "melanoma", "seborrheic_keratosis"]]
        for index, (image, mask) in enumerate(pairs):
            sample_id = f"ISIC_{index:07d}"
            _save_image(image, root / "ISIC-2017_Training_Data" / f"{sample_id}.jpg")
            _save_image(image, root / "ISIC-2017_Training_Data" / f"{sample_id}_superpixels.png")
            _save_mask(mask, root / "ISIC-2017_Training_Part1_GroundTruth" / f"{sample_id}_segmentation.png")
            rows.append([sample_id, f"{float(index % 3 == 1)}", f"{float(index % 3 == 2)}"])
        with (root / "ISIC-2017_Training_Part3_GroundTruth.csv").open("w", newline="") as stream:
            csv.writer(stream).writerows(rows)
    return root


@pytest.fixture
def synthetic_dataset(tmp_path: Path) -> Path:
    """A small normalized-layout dataset: 6 pairs of 64 x 64 in ``tmp_path / "synthetic"``."""
    return make_dataset(tmp_path / "synthetic", "normalized", n=6, size=64, seed=0)


@contextmanager
def serving(app: FastAPI, timeout_s: float = 60.0) -> Iterator[TestClient]:
    """A TestClient of ``app`` once its start-up ran and its warm-up (in the background) is over.

    The app may still be not ready for another reason (a required provider missing); tests check that.
    """
    with TestClient(app) as client:
        deadline = time.monotonic() + timeout_s
        while app.state.not_ready_reason == WARMING_UP:
            if time.monotonic() > deadline:
                raise AssertionError(f"the app was still warming up after {timeout_s:.0f} s")
            time.sleep(0.005)
        yield client


def metric_value(text: str, metric: str, /, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == metric and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"no sample {metric} {labels}")
