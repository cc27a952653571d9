"""The geometric augmentation: image and mask stay aligned, the mask binary, and every draw reproducible."""

from __future__ import annotations

import random

import numpy as np
import pytest

from tests.conftest import make_lesion
from training.augment import augment_pair, build_augmentation


def _mask_encoding_image(size: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A mask, and an image that spells it out: bright where the mask is, dark elsewhere, plus texture."""
    _, mask = make_lesion(size, seed)
    texture = np.random.default_rng(seed).integers(-40, 41, size=(size, size, 3))
    image = np.where(mask[..., None], 215, 40) + texture
    return image.clip(0, 255).astype(np.uint8), mask


def _flip_candidates(array: np.ndarray) -> list[np.ndarray]:
    return [array, np.fliplr(array), np.flipud(array), np.flipud(np.fliplr(array))]


@pytest.mark.parametrize("seed", range(8))
def test_mask_stays_aligned_with_the_image(seed: int) -> None:
    image, mask = _mask_encoding_image(seed=seed)
    transform = build_augmentation()

    augmented_image, augmented_mask = augment_pair(transform, image, mask, seed=seed)

    assert augmented_image.shape == image.shape and augmented_image.dtype == np.uint8
    assert augmented_mask.shape == mask.shape and augmented_mask.dtype == bool
    agreement = np.mean(augmented_mask == (augmented_image.mean(axis=-1) > 127))
    assert agreement > 0.99
    assert not np.array_equal(augmented_mask, mask), "the transform did nothing"
    # Rotation, zoom up to 20% and shear up to 10° keep the lesion's area within a factor of 1.2² or so.
    assert 0.6 < augmented_mask.sum() / mask.sum() < 1.6


def test_mask_is_resampled_nearest_so_it_stays_binary() -> None:
    image, mask = _mask_encoding_image()
    transform = build_augmentation()

    for seed in range(5):
        transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
        raw_mask = transform(image=image, mask=mask.astype(np.uint8) * 255)["mask"]
        assert set(np.unique(raw_mask)) <= {0, 255}


def test_flips_only_are_exact_and_all_four_occur() -> None:
    image, mask = _mask_encoding_image(size=40)
    transform = build_augmentation(rotation_degrees=0, zoom=0, shear_degrees=0, flips=True)
    seen = set()

    for seed in range(32):
        augmented_image, augmented_mask = augment_pair(transform, image, mask, seed=seed)
        matches = [
            index
            for index, (candidate_image, candidate_mask) in enumerate(
                zip(_flip_candidates(image), _flip_candidates(mask), strict=True)
            )
            if np.array_equal(augmented_image, candidate_image)
            and np.array_equal(augmented_mask, candidate_mask)
        ]
        assert matches, f"seed {seed}: not an exact flip"
        seen.add(matches[0])

    # Compose.set_random_seed would give both flips the same draw: only "none" and "both" would occur.
    assert seen == {0, 1, 2, 3}


def test_horizontal_flip_equals_numpy_fliplr() -> None:
    image, mask = _mask_encoding_image(size=40)
    transform = build_augmentation(rotation_degrees=0, zoom=0, shear_degrees=0, flips=True)
    seed = next(
        seed
        for seed in range(64)
        if np.array_equal(augment_pair(transform, image, mask, seed=seed)[1], np.fliplr(mask))
    )

    augmented_image, augmented_mask = augment_pair(transform, image, mask, seed=seed)

    np.testing.assert_array_equal(augmented_image, np.fliplr(image))
    np.testing.assert_array_equal(augmented_mask, np.fliplr(mask))


def test_same_seed_same_result_different_seed_different_result() -> None:
    image, mask = make_lesion(64, seed=3)

    first = augment_pair(build_augmentation(), image, mask, seed=11)
    again = augment_pair(build_augmentation(), image, mask, seed=11)
    other = augment_pair(build_augmentation(), image, mask, seed=12)

    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other[0])


def test_reused_transform_is_reproducible_per_seed() -> None:
    """A transform used for other seeds in between still gives seed 5 the same result."""
    image, mask = make_lesion(64, seed=4)
    transform = build_augmentation()

    first = augment_pair(transform, image, mask, seed=5)
    augment_pair(transform, image, mask, seed=6)
    augment_pair(transform, image, mask)
    again = augment_pair(transform, image, mask, seed=5)

    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])


def test_augmentation_off_is_the_identity() -> None:
    image, mask = make_lesion(48, seed=1)
    transform = build_augmentation(rotation_degrees=0, zoom=0, shear_degrees=0, flips=False)

    augmented_image, augmented_mask = augment_pair(transform, image, mask, seed=0)

    np.testing.assert_array_equal(augmented_image, image)
    np.testing.assert_array_equal(augmented_mask, mask)
    assert augmented_mask.dtype == bool


def test_input_arrays_are_not_modified() -> None:
    image, mask = make_lesion(48, seed=2)
    image_before, mask_before = image.copy(), mask.copy()

    augment_pair(build_augmentation(), image, mask, seed=0)

    np.testing.assert_array_equal(image, image_before)
    np.testing.assert_array_equal(mask, mask_before)


@pytest.mark.parametrize(
    "options", [{"rotation_degrees": -1.0}, {"zoom": 1.0}, {"zoom": -0.1}, {"shear_degrees": -5.0}]
)
def test_invalid_options(options: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="rotation and shear"):
        build_augmentation(**options)
