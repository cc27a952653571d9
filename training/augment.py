"""On-the-fly geometric augmentation of image/mask pairs: the paper's rotation, flips, zoom and shear.

Every transform moves the image and its mask together (same parameters, same reflected border), the image
with bilinear and the mask with nearest-neighbour interpolation, so the mask stays binary and aligned.

Reproducibility: :func:`augment_pair` takes a seed and draws every random choice of the call from it, so a
given (seed, epoch, sample) always gets the same transform, whichever worker thread or process runs it.
"""

from __future__ import annotations

import random

import albumentations as A
import cv2
import numpy as np

# Mirror the image at its edges (…c b | a b c…, OpenCV's default reflection) instead of padding with black:
# a black wedge would be a cue that dermoscopy photos do not have.
BORDER_MODE = cv2.BORDER_REFLECT_101


def build_augmentation(
    rotation_degrees: float = 30.0,
    zoom: float = 0.2,
    shear_degrees: float = 10.0,
    flips: bool = True,
) -> A.Compose:
    """Builds the training augmentation: random rotation, zoom and shear, then horizontal and vertical flips.

    Args:
        rotation_degrees: rotation drawn uniformly from ``[-rotation_degrees, rotation_degrees]``.
        zoom: isotropic scale drawn uniformly from ``[1 - zoom, 1 + zoom]``.
        shear_degrees: horizontal shear drawn uniformly from ``[-shear_degrees, shear_degrees]`` (one shear
            angle, as Keras' ``ImageDataGenerator(shear_range=...)``; rotation and flips vary its direction).
        flips: flip left-right and up-down, each with probability 1/2.

    Returns:
        An albumentations pipeline taking ``image=`` (uint8 RGB) and ``mask=`` (uint8); with every option off
        it is the identity.
    """
    if rotation_degrees < 0 or shear_degrees < 0 or not 0 <= zoom < 1:
        raise ValueError(
            "rotation and shear must be >= 0 and zoom in [0, 1), "
            f"not {rotation_degrees}, {shear_degrees}, {zoom}"
        )
    transforms: list[A.BasicTransform] = []
    if rotation_degrees or zoom or shear_degrees:
        transforms.append(
            A.Affine(
                rotate=(-rotation_degrees, rotation_degrees),
                scale=(1.0 - zoom, 1.0 + zoom),
                keep_ratio=True,
                shear={"x": (-shear_degrees, shear_degrees), "y": (0.0, 0.0)},
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                border_mode=BORDER_MODE,
                p=1.0,
            )
        )
    if flips:
        transforms += [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
    return A.Compose(transforms)


def augment_pair(
    transform: A.Compose, image: np.ndarray, mask: np.ndarray, seed: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Applies one random draw of ``transform`` to an image and its mask alike.

    Not thread-safe for a shared ``transform`` (albumentations keeps per-call state in it): give each thread
    its own, e.g. one :func:`build_augmentation` per batch.

    Args:
        transform: from :func:`build_augmentation`.
        image: uint8 ``(H, W, 3)`` RGB.
        mask: bool ``(H, W)``.
        seed: draws every random choice of this call from this seed; None continues the transform's own
            random stream.

    Returns:
        ``(image, mask)``: uint8 ``(H, W, 3)`` and bool ``(H, W)``.
    """
    if seed is not None:
        # One generator shared by all the transforms: Compose.set_random_seed would seed each transform with
        # the same value, and then both flips draw the same number and happen together or not at all.
        transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
    result = transform(image=image, mask=mask.astype(np.uint8))
    return np.ascontiguousarray(result["image"]), result["mask"] > 0
