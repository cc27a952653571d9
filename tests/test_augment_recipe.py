"""The release-recipe augmentation: colour jitter that leaves the mask alone, and rotation by any angle."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import make_lesion
from training.augment import augment_pair, build_augmentation

PHOTOMETRIC_ONLY = {"rotation_degrees": 0, "zoom": 0, "shear_degrees": 0, "flips": False, "photometric": True}


def test_photometric_changes_the_image_and_never_the_mask() -> None:
    image, mask = make_lesion(64, seed=5)
    transform = build_augmentation(**PHOTOMETRIC_ONLY)
    changed = 0
    for seed in range(12):
        augmented_image, augmented_mask = augment_pair(transform, image, mask, seed=seed)
        np.testing.assert_array_equal(augmented_mask, mask)
        assert augmented_image.shape == image.shape and augmented_image.dtype == np.uint8
        changed += not np.array_equal(augmented_image, image)
        # Moderate: the mean brightness moves by well under a quarter of the range.
        assert abs(float(augmented_image.mean()) - float(image.mean())) < 64
    # Each of three jitters applies with probability 1/2: 12 seeds all leaving the image alone is 1 in 2^36.
    assert changed >= 6


def test_photometric_draws_are_seeded() -> None:
    image, mask = make_lesion(64, seed=6)
    first = augment_pair(build_augmentation(photometric=True), image, mask, seed=21)
    again = augment_pair(build_augmentation(photometric=True), image, mask, seed=21)
    other = augment_pair(build_augmentation(photometric=True), image, mask, seed=22)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other[0])


def test_photometric_follows_the_same_geometry() -> None:
    """Colour jitter comes after the geometric transforms: the same seed moves the mask the same way."""
    image, mask = make_lesion(64, seed=7)
    for seed in range(4):
        _, plain_mask = augment_pair(build_augmentation(), image, mask, seed=seed)
        _, jittered_mask = augment_pair(build_augmentation(photometric=True), image, mask, seed=seed)
        np.testing.assert_array_equal(plain_mask, jittered_mask)


def test_full_rotation_reaches_angles_the_papers_30_degrees_never_does() -> None:
    """An arrow-shaped mask, rotated: with ±180° some draws point it backwards; with ±30° none do."""
    size = 65
    mask = np.zeros((size, size), dtype=bool)
    mask[30:35, 5:60] = True  # a bar pointing right ...
    mask[20:45, 50:60] = True  # ... with its head on the right
    image = np.where(mask[..., None], 220, 30).astype(np.uint8).repeat(3, axis=-1)

    def head_on_the_left(rotation: float, seed: int) -> bool:
        transform = build_augmentation(rotation_degrees=rotation, zoom=0, shear_degrees=0, flips=False)
        _, rotated = augment_pair(transform, image, mask, seed=seed)
        _, columns = np.nonzero(rotated)
        centre = columns.mean()
        return bool(rotated[:, : int(centre)].sum() > rotated[:, int(centre) :].sum())

    assert not any(head_on_the_left(30, seed) for seed in range(30))
    assert any(head_on_the_left(180, seed) for seed in range(30))


@pytest.mark.parametrize("rotation", [180.0, 360.0])
def test_any_rotation_keeps_the_mask_aligned(rotation: float) -> None:
    _, mask = make_lesion(96, seed=2)
    texture = np.random.default_rng(2).integers(-40, 41, size=(96, 96, 3))
    image = (np.where(mask[..., None], 215, 40) + texture).clip(0, 255).astype(np.uint8)
    transform = build_augmentation(rotation_degrees=rotation, zoom=0.3)
    for seed in range(4):
        augmented_image, augmented_mask = augment_pair(transform, image, mask, seed=seed)
        assert np.mean(augmented_mask == (augmented_image.mean(axis=-1) > 127)) > 0.99
