"""Focal loss plus a per-image soft Jaccard / Dice term, against values worked out by hand."""

import keras
import numpy as np
import pytest
from keras import ops

from training.losses import FocalLoss, FocalRegionLoss, get_loss


def as_image(values, side: int | None = None) -> np.ndarray:
    """One image of one row, (1, 1, W, 1), or a square one, (1, side, side, 1)."""
    array = np.asarray(values, dtype="float32")
    return array.reshape(1, side, side, 1) if side else array.reshape(1, 1, -1, 1)


def region_part(loss: FocalRegionLoss, labels: np.ndarray, probabilities: np.ndarray) -> float:
    """The loss less its focal part: ``w`` times the mean region term."""
    focal = FocalLoss(alpha=loss.focal.alpha, gamma=loss.focal.gamma)
    return float(loss(labels, probabilities)) - float(focal(labels, probabilities))


# y = [1, 1, 0, 0], p = [0.5, 1, 0.5, 0]: I = 1.5, Σy = 2, Σp = 2, smoothing 1.
#   Jaccard: 1 − (1.5 + 1) / (2 + 2 − 1.5 + 1) = 1 − 2.5 / 3.5 = 0.28571429
#   Dice:    1 − (2·1.5 + 1) / (2 + 2 + 1)   = 1 − 4 / 5     = 0.2
@pytest.mark.parametrize(("region", "expected"), [("jaccard", 0.28571429), ("dice", 0.2)])
def test_region_term_matches_hand_computation(region: str, expected: float) -> None:
    labels, probabilities = as_image([1, 1, 0, 0]), as_image([0.5, 1, 0.5, 0])
    loss = FocalRegionLoss(region=region, region_weight=1.0)
    assert region_part(loss, labels, probabilities) == pytest.approx(expected, rel=1e-5)
    doubled = FocalRegionLoss(region=region, region_weight=2.0)
    assert region_part(doubled, labels, probabilities) == pytest.approx(2 * expected, rel=1e-5)


@pytest.mark.parametrize("region", ["jaccard", "dice"])
def test_perfect_prediction_costs_about_nothing(region: str) -> None:
    mask = np.zeros((8, 8), dtype="float32")
    mask[2:6, 1:7] = 1.0
    loss = FocalRegionLoss(region=region)(as_image(mask, 8), as_image(mask, 8))
    assert float(loss) == pytest.approx(0.0, abs=1e-5)
    # No lesion, none predicted: the smoothing makes that a perfect score too, not 0 / 0.
    empty = np.zeros((8, 8), dtype="float32")
    assert float(FocalRegionLoss(region=region)(as_image(empty, 8), as_image(empty, 8))) == pytest.approx(
        0.0, abs=1e-5
    )


def test_disjoint_prediction_costs_about_one() -> None:
    truth = np.zeros((8, 8), dtype="float32")
    truth[:, :4] = 1.0  # 32 lesion pixels on the left, 32 predicted on the right
    prediction = 1.0 - truth
    loss = FocalRegionLoss(region="jaccard")
    # I = 0, Σy + Σp = 64: 1 − 1 / 65
    assert region_part(loss, as_image(truth, 8), as_image(prediction, 8)) == pytest.approx(
        1 - 1 / 65, rel=1e-5
    )
    dice = FocalRegionLoss(region="dice")
    assert region_part(dice, as_image(truth, 8), as_image(prediction, 8)) == pytest.approx(
        1 - 1 / 65, rel=1e-5
    )


def test_region_term_is_the_mean_over_images_not_pooled() -> None:
    # Image A: a large lesion, predicted perfectly (term 0). Image B: a 2-pixel lesion, missed entirely,
    # nothing predicted (I = 0, Σy + Σp = 2: term 1 − 1/3). Per image: (0 + 2/3) / 2 = 1/3. Pooled over
    # the batch it would be 1 − (32 + 1) / (32 + 2 + 32 − 32 + 1) = 1 − 33/35 = 0.0571.
    big = np.zeros((8, 8), dtype="float32")
    big[:4, :] = 1.0
    small_truth = np.zeros((8, 8), dtype="float32")
    small_truth[7, :2] = 1.0
    labels = np.stack([big, small_truth])[..., None]
    probabilities = np.stack([big, np.zeros((8, 8), dtype="float32")])[..., None]
    loss = FocalRegionLoss(region="jaccard")
    assert region_part(loss, labels, probabilities) == pytest.approx(1 / 3, rel=1e-4)
    per_image = loss.call(ops.convert_to_tensor(labels), ops.convert_to_tensor(probabilities))
    assert tuple(per_image.shape) == (2,)


def test_focal_part_is_the_papers_focal_loss() -> None:
    rng = np.random.default_rng(0)
    labels = (rng.random((3, 6, 6, 1)) > 0.5).astype("float32")
    probabilities = rng.uniform(0.01, 0.99, (3, 6, 6, 1)).astype("float32")
    unweighted = FocalRegionLoss(alpha=0.6, gamma=1.5, region_weight=0.0)(labels, probabilities)
    assert float(unweighted) == pytest.approx(
        float(FocalLoss(alpha=0.6, gamma=1.5)(labels, probabilities)), rel=1e-5
    )


def test_is_float32_for_low_precision_inputs_and_has_finite_gradients() -> None:
    import tensorflow as tf

    labels = as_image([1, 1, 0, 0, 1, 0])
    probabilities = np.asarray([1e-6, 0.5, 0.5, 1 - 1e-6, 1.0, 0.0], dtype="float32").reshape(1, 1, -1, 1)
    loss = FocalRegionLoss(region="dice")
    value = loss(ops.cast(labels, "bfloat16"), ops.cast(probabilities, "bfloat16"))
    assert keras.backend.standardize_dtype(value.dtype) == "float32"
    variable = tf.Variable(probabilities)
    with tf.GradientTape() as tape:
        result = loss(labels, variable)
    gradient = tape.gradient(result, variable).numpy()
    assert np.all(np.isfinite(gradient))
    assert gradient[0, 0, 0, 0] < 0  # a missed lesion pixel: raise p


def test_serialization_round_trip_and_get_loss() -> None:
    loss = FocalRegionLoss(alpha=0.6, gamma=1.5, region="dice", region_weight=0.5, smooth=2.0, name="fr")
    config = keras.losses.serialize(loss)
    assert config["registered_name"] == "dermaseg>FocalRegionLoss"
    restored = keras.losses.deserialize(config)
    assert isinstance(restored, FocalRegionLoss)
    assert (restored.focal.alpha, restored.focal.gamma, restored.region, restored.region_weight) == (
        0.6,
        1.5,
        "dice",
        0.5,
    )
    assert (restored.smooth, restored.name) == (2.0, "fr")
    labels, probabilities = as_image([1.0, 0.0, 1.0]), as_image([0.7, 0.4, 0.2])
    assert float(restored(labels, probabilities)) == float(loss(labels, probabilities))

    chosen = get_loss("focal+jaccard", alpha=0.5, gamma=3.0, region_weight=0.25)
    assert isinstance(chosen, FocalRegionLoss)
    assert (chosen.region, chosen.region_weight, chosen.focal.alpha, chosen.focal.gamma) == (
        "jaccard",
        0.25,
        0.5,
        3.0,
    )
    assert get_loss("focal+dice").region_weight == 1.0


def test_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match="region"):
        FocalRegionLoss(region="tversky")
    with pytest.raises(ValueError):
        FocalRegionLoss(region_weight=-1.0)
    with pytest.raises(ValueError):
        FocalRegionLoss(alpha=0.0)


@pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer")
def test_compiled_model_reloads_without_custom_objects(tmp_path) -> None:
    model = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Conv2D(1, 1, activation="sigmoid")])
    model.compile(optimizer="adam", loss=FocalRegionLoss(region="dice", region_weight=0.3))
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    assert isinstance(restored.loss, FocalRegionLoss)
    assert (restored.loss.region, restored.loss.region_weight) == ("dice", 0.3)
