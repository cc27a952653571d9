"""Training losses: the paper's focal loss (eq. 2) and plain binary cross-entropy."""

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


def get_loss(name: str, alpha: float = 0.8, gamma: float = 2.0) -> keras.losses.Loss:
    """The training loss called ``name``: ``"focal"`` (`FocalLoss`) or ``"bce"`` (binary cross-entropy).

    ``alpha`` and ``gamma`` only apply to the focal loss.
    """
    if name == "focal":
        return FocalLoss(alpha=alpha, gamma=gamma)
    if name == "bce":
        return keras.losses.BinaryCrossentropy(name="bce")
    raise ValueError(f"loss must be one of {LOSSES}, not {name!r}")
