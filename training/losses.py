"""Training losses: the paper's focal loss (eq. 2), focal plus a per-image region term, and plain BCE."""

from __future__ import annotations

import keras
from keras import ops

from training.config import LOSSES


@keras.saving.register_keras_serializable(package="dermaseg")
class FocalLoss(keras.losses.Loss):
    """Binary focal loss exactly as the paper's eq. 2, per pixel, averaged over pixels.

    ``BCE = −[y·log p + (1 − y)·log(1 − p)]`` with ``p`` clipped to ``[ε, 1 − ε]``
    (``ε = keras.config.epsilon()``), then ``FL = α · (1 − exp(−BCE))^γ · BCE``. For a binary label
    ``exp(−BCE)`` is the probability given to the true class, so this is Lin et al.'s
    ``α (1 − p_t)^γ · (−log p_t)`` — with one α for both classes, as in the paper (not Lin's α / 1 − α).

    Computed in float32 whatever the inputs' dtype, so a mixed-precision model gets a full-precision loss.
    Like `keras.losses.BinaryCrossentropy`, `call` averages over the last (channel) axis and the
    reduction averages the rest, so an ``(N, H, W, 1)`` batch gives the mean over all pixels.

    Args:
        alpha: Weight of every pixel's loss.
        gamma: Focusing exponent; 0 turns the loss into ``alpha · BCE``.
        name: Loss name.
        reduction: Keras reduction (default: mean over batch and pixels).
    """

    def __init__(
        self,
        alpha: float = 0.8,
        gamma: float = 2.0,
        name: str = "focal_loss",
        reduction: str = "sum_over_batch_size",
    ):
        # float32 whatever keras.config.floatx() says: Loss.__call__ casts the inputs to this dtype.
        super().__init__(name=name, reduction=reduction, dtype="float32")
        if alpha <= 0 or gamma < 0:
            raise ValueError(f"focal loss needs alpha > 0 and gamma >= 0, not alpha={alpha}, gamma={gamma}")
        self.alpha = float(alpha)
        self.gamma = float(gamma)

    def call(self, y_true, y_pred):
        y_true = ops.cast(y_true, "float32")
        y_pred = ops.cast(y_pred, "float32")
        epsilon = keras.config.epsilon()
        probability = ops.clip(y_pred, epsilon, 1.0 - epsilon)
        cross_entropy = -(y_true * ops.log(probability) + (1.0 - y_true) * ops.log(1.0 - probability))
        focal = self.alpha * ops.power(1.0 - ops.exp(-cross_entropy), self.gamma) * cross_entropy
        return ops.mean(focal, axis=-1)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"alpha": self.alpha, "gamma": self.gamma})
        return config


#: The region terms a :class:`FocalRegionLoss` can add.
REGIONS = ("jaccard", "dice")


@keras.saving.register_keras_serializable(package="dermaseg")
class FocalRegionLoss(keras.losses.Loss):
    """The paper's focal loss plus a soft Jaccard (or Dice) term per image: ``FL + w · (1 − soft index)``.

    The region term tracks the per-image Jaccard the model is scored by and pushes against
    under-segmentation, which pixel losses tolerate on a lesion's faint rim. For each image,
    with ``I = Σ y·p`` over its pixels:

    * Jaccard: ``1 − (I + s) / (Σ y + Σ p − I + s)``
    * Dice: ``1 − (2I + s) / (Σ y + Σ p + s)``

    with smoothing ``s`` (1 pixel), so an image with no lesion predicted as empty scores 0, a perfect
    prediction about 0 and a disjoint one about 1. The term is computed per image and then averaged
    (the per-image mean of the metric), not pooled over the batch, where large lesions would dominate.
    `call` returns one value per image, ``mean over its pixels of FL + w · region``; the reduction averages
    them. Computed in float32 whatever the inputs' dtype.

    Args:
        alpha: focal loss alpha.
        gamma: focal loss gamma.
        region: ``"jaccard"`` or ``"dice"``.
        region_weight: ``w``, the weight of the region term (0 leaves the focal loss).
        smooth: ``s``, in pixels.
        name: loss name.
        reduction: Keras reduction (default: mean over the batch).
    """

    def __init__(
        self,
        alpha: float = 0.8,
        gamma: float = 2.0,
        region: str = "jaccard",
        region_weight: float = 1.0,
        smooth: float = 1.0,
        name: str = "focal_region_loss",
        reduction: str = "sum_over_batch_size",
    ):
        super().__init__(name=name, reduction=reduction, dtype="float32")
        if region not in REGIONS:
            raise ValueError(f"region must be one of {REGIONS}, not {region!r}")
        if region_weight < 0 or smooth <= 0:
            raise ValueError(f"region weight must be >= 0 and smooth > 0, not {region_weight}, {smooth}")
        self.focal = FocalLoss(alpha=alpha, gamma=gamma, reduction="none")
        self.region = region
        self.region_weight = float(region_weight)
        self.smooth = float(smooth)

    def call(self, y_true, y_pred):
        y_true = ops.cast(y_true, "float32")
        y_pred = ops.cast(y_pred, "float32")
        pixel_axes = tuple(range(1, len(y_pred.shape)))
        focal = ops.mean(self.focal.call(y_true, y_pred), axis=tuple(range(1, len(y_pred.shape) - 1)))
        return focal + self.region_weight * self.region_term(y_true, y_pred, pixel_axes)

    def region_term(self, y_true, y_pred, axes: tuple[int, ...]):
        """``1 − soft Jaccard`` (or Dice) of each image, summing over ``axes``."""
        intersection = ops.sum(y_true * y_pred, axis=axes)
        total = ops.sum(y_true, axis=axes) + ops.sum(y_pred, axis=axes)
        if self.region == "dice":
            return 1.0 - (2.0 * intersection + self.smooth) / (total + self.smooth)
        return 1.0 - (intersection + self.smooth) / (total - intersection + self.smooth)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "alpha": self.focal.alpha,
                "gamma": self.focal.gamma,
                "region": self.region,
                "region_weight": self.region_weight,
                "smooth": self.smooth,
            }
        )
        return config


def get_loss(
    name: str, alpha: float = 0.8, gamma: float = 2.0, region_weight: float | None = None
) -> keras.losses.Loss:
    """The training loss called ``name`` (one of ``training.config.LOSSES``).

    ``"focal"`` is `FocalLoss`; ``"focal+jaccard"`` and ``"focal+dice"`` are `FocalRegionLoss` with that
    region term, weighted ``region_weight`` (default 1); ``"bce"`` is binary cross-entropy. ``alpha`` and
    ``gamma`` only apply to the focal losses.
    """
    if name == "focal":
        return FocalLoss(alpha=alpha, gamma=gamma)
    if name.startswith("focal+") and name[len("focal+") :] in REGIONS:
        weight = 1.0 if region_weight is None else region_weight
        return FocalRegionLoss(alpha=alpha, gamma=gamma, region=name[len("focal+") :], region_weight=weight)
    if name == "bce":
        return keras.losses.BinaryCrossentropy(name="bce")
    raise ValueError(f"loss must be one of {LOSSES}, not {name!r}")
