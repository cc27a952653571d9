"""The focal loss against values worked out by hand from the paper's eq. 2."""

import keras
import numpy as np
import pytest
from keras import ops

from training.losses import FocalLoss, get_loss

# (label, predicted probability, focal loss with alpha=0.8, gamma=2), worked out by hand:
#   p_t = p if y = 1 else 1 − p;  BCE = −ln p_t;  FL = 0.8 · (1 − p_t)² · BCE
HAND_COMPUTED = [
    (1.0, 0.9, 0.00084288),  # BCE = −ln 0.9 = 0.10536052;  0.8 · 0.1² · 0.10536052
    (0.0, 0.1, 0.00084288),  # the same pixel seen from the background side
    (1.0, 0.5, 0.13862944),  # BCE = ln 2 = 0.69314718;     0.8 · 0.5² · 0.69314718
    (0.0, 0.8, 0.82403221),  # BCE = −ln 0.2 = 1.60943791;  0.8 · 0.8² · 1.60943791
    (1.0, 0.2, 0.82403221),  # the same confident mistake on a lesion pixel
    (0.0, 0.3, 0.02568060),  # BCE = −ln 0.7 = 0.35667494;  0.8 · 0.3² · 0.35667494
]


def as_batch(values) -> np.ndarray:
    """One image of one row: shape (1, 1, W, 1)."""
    return np.asarray(values, dtype="float32").reshape(1, 1, -1, 1)


@pytest.mark.parametrize(("label", "probability", "expected"), HAND_COMPUTED)
def test_focal_loss_matches_hand_computation(label, probability, expected):
    loss = FocalLoss()(as_batch([label]), as_batch([probability]))
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_focal_loss_is_the_mean_over_pixels():
    labels, probabilities, expected = zip(*HAND_COMPUTED, strict=True)
    loss = FocalLoss()(as_batch(labels), as_batch(probabilities))
    assert float(loss) == pytest.approx(sum(expected) / len(expected), rel=1e-5)  # 2.61807...


def test_focal_loss_alpha_and_gamma():
    # alpha 0.25, gamma 1, y = 1, p = 0.5: 0.25 · 0.5 · ln 2 = 0.08664340
    loss = FocalLoss(alpha=0.25, gamma=1.0)(as_batch([1.0]), as_batch([0.5]))
    assert float(loss) == pytest.approx(0.08664340, rel=1e-5)
    # gamma 0 leaves alpha times binary cross-entropy: 0.5 · −ln 0.7 = 0.17833747
    loss = FocalLoss(alpha=0.5, gamma=0.0)(as_batch([0.0]), as_batch([0.3]))
    assert float(loss) == pytest.approx(0.17833747, rel=1e-5)


def test_focal_loss_with_gamma_zero_is_scaled_keras_binary_cross_entropy():
    rng = np.random.default_rng(0)
    labels = (rng.random((2, 8, 8, 1)) > 0.5).astype("float32")
    probabilities = rng.uniform(0.01, 0.99, (2, 8, 8, 1)).astype("float32")
    focal = FocalLoss(alpha=0.8, gamma=0.0)(labels, probabilities)
    cross_entropy = keras.losses.BinaryCrossentropy()(labels, probabilities)
    assert float(focal) == pytest.approx(0.8 * float(cross_entropy), rel=1e-5)


def test_focal_loss_shapes():
    rng = np.random.default_rng(1)
    labels = (rng.random((2, 4, 6, 1)) > 0.5).astype("float32")
    probabilities = rng.uniform(0.0, 1.0, (2, 4, 6, 1)).astype("float32")
    per_pixel = FocalLoss(reduction=None)(labels, probabilities)
    assert tuple(per_pixel.shape) == (2, 4, 6)  # the channel axis averaged, like BinaryCrossentropy
    total = FocalLoss()(labels, probabilities)
    assert tuple(total.shape) == ()
    assert float(total) == pytest.approx(float(np.mean(ops.convert_to_numpy(per_pixel))), rel=1e-5)


def test_focal_loss_is_float32_for_low_precision_inputs():
    labels = ops.cast(as_batch([1.0, 0.0]), "bfloat16")
    probabilities = ops.cast(as_batch([0.9, 0.1]), "bfloat16")
    loss = FocalLoss()(labels, probabilities)
    assert keras.backend.standardize_dtype(loss.dtype) == "float32"


def test_focal_loss_is_finite_at_the_extremes():
    labels = as_batch([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    probabilities = as_batch([0.0, 1e-12, 1.0, 1.0, 1.0 - 1e-12, 0.0])
    per_pixel = ops.convert_to_numpy(FocalLoss(reduction=None)(labels, probabilities))
    assert np.isfinite(per_pixel).all()
    assert per_pixel[0, 0, 0] > 10  # a confident miss costs a lot: 0.8 · (1 − 1e-7)² · −ln 1e-7 ≈ 12.9


def test_focal_loss_gradients_are_finite_near_zero_and_one():
    if keras.backend.backend() != "tensorflow":
        pytest.skip("gradient check written with tf.GradientTape")
    import tensorflow as tf

    labels = tf.constant(as_batch([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]))
    probabilities = tf.Variable(as_batch([0.0, 1e-9, 1e-6, 1.0 - 1e-6, 1.0, 1.0 - 1e-9, 1.0 - 1e-6, 0.0]))
    with tf.GradientTape() as tape:
        loss = FocalLoss()(labels, probabilities)
    gradient = tape.gradient(loss, probabilities).numpy()
    assert np.isfinite(gradient).all()
    # Inside the clipping range the gradient pushes towards the label.
    assert gradient[0, 0, 2, 0] < 0  # y = 1, p = 1e-6: raise p
    assert gradient[0, 0, 6, 0] > 0  # y = 0, p = 1 − 1e-6: lower p


def test_focal_loss_serialization_round_trip():
    loss = FocalLoss(alpha=0.6, gamma=1.5, name="focal")
    config = keras.losses.serialize(loss)
    assert config["registered_name"] == "dermaseg>FocalLoss"
    restored = keras.losses.deserialize(config)
    assert isinstance(restored, FocalLoss)
    assert (restored.alpha, restored.gamma, restored.name) == (0.6, 1.5, "focal")
    labels, probabilities = as_batch([1.0, 0.0]), as_batch([0.7, 0.4])
    assert float(restored(labels, probabilities)) == float(loss(labels, probabilities))


def test_focal_loss_rejects_bad_parameters():
    with pytest.raises(ValueError):
        FocalLoss(alpha=0.0)
    with pytest.raises(ValueError):
        FocalLoss(gamma=-1.0)


def test_get_loss():
    focal = get_loss("focal", alpha=0.5, gamma=3.0)
    assert isinstance(focal, FocalLoss)
    assert (focal.alpha, focal.gamma) == (0.5, 3.0)
    assert isinstance(get_loss("bce"), keras.losses.BinaryCrossentropy)
    with pytest.raises(ValueError, match="focal"):
        get_loss("dice")


# An optimizer that never stepped has no slot variables to restore; Keras warns about it.
@pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer")
def test_compiled_model_with_focal_loss_reloads_without_custom_objects(tmp_path):
    model = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Conv2D(1, 1, activation="sigmoid")])
    model.compile(optimizer="adam", loss=FocalLoss(alpha=0.6, gamma=1.5))
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.saving.load_model(path)  # resolved through the "dermaseg" registration
    assert isinstance(restored.loss, FocalLoss)
    assert (restored.loss.alpha, restored.loss.gamma) == (0.6, 1.5)
