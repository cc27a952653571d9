"""On-the-fly augmentation of image/mask pairs: the paper's rotation, flips, zoom and shear; colour jitter.

Every geometric transform moves the image and its mask together (same parameters, same reflected border),
the image with bilinear and the mask with nearest-neighbour interpolation, so the mask stays binary and
aligned. The photometric transforms (off by default) change the image's colours only, never the mask.

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

# Photometric jitter, each applied with probability PHOTOMETRIC_P, in this order. Moderate on purpose: they
# mimic the spread of exposure, dermoscope light and camera colour between sources (faint, low-contrast
# lesions, 1.0.0's failures), not a change of what a lesion looks like.
#: Brightness shift, a fraction of the full range: ±15 %.
BRIGHTNESS_LIMIT = 0.15
#: Contrast factor 1 ± 0.15.
CONTRAST_LIMIT = 0.15
#: Gamma 0.8 – 1.25 (albumentations' percent: gamma_limit / 100).
GAMMA_LIMIT = (80, 125)
#: Hue shift ±8 (of OpenCV's 0 – 180 hue circle, about ±16°) and saturation shift ±20 (of 0 – 255).
HUE_SHIFT_LIMIT = 8
SATURATION_SHIFT_LIMIT = 20
PHOTOMETRIC_P = 0.5


def build_augmentation(
    rotation_degrees: float = 30.0,
    zoom: float = 0.2,
    shear_degrees: float = 10.0,
    flips: bool = True,
    photometric: bool = False,
) -> A.Compose:
    """Builds the training augmentation: random rotation, zoom and shear, then horizontal and vertical flips.

    With ``photometric``, brightness/contrast, gamma and hue/saturation jitter follow (each with probability
    :data:`PHOTOMETRIC_P`, the ranges above); they change the image and leave the mask as it is.

    Args:
        rotation_degrees: rotation drawn uniformly from ``[-rotation_degrees, rotation_degrees]``; 180 (or
            more) makes every angle equally likely.
        zoom: isotropic scale drawn uniformly from ``[1 - zoom, 1 + zoom]``.
        shear_degrees: horizontal shear drawn uniformly from ``[-shear_degrees, shear_degrees]`` (one shear
            angle, as Keras' ``ImageDataGenerator(shear_range=...)``; rotation and flips vary its direction).
        flips: flip left-right and up-down, each with probability 1/2.
        photometric: add the colour jitter.

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
    if photometric:
        transforms += [
            A.RandomBrightnessContrast(
                brightness_limit=BRIGHTNESS_LIMIT, contrast_limit=CONTRAST_LIMIT, p=PHOTOMETRIC_P
            ),
            A.RandomGamma(gamma_limit=GAMMA_LIMIT, p=PHOTOMETRIC_P),
            A.HueSaturationValue(
                hue_shift_limit=HUE_SHIFT_LIMIT,
                sat_shift_limit=SATURATION_SHIFT_LIMIT,
                val_shift_limit=0,
                p=PHOTOMETRIC_P,
            ),
        ]
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
