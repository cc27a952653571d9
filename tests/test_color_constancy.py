"""Shades of Gray colour constancy inside the network (`training.model.ShadesOfGray`, --color-constancy)."""

import keras
import numpy as np
import pytest
from keras import ops

from training.config import TrainConfig
from training.export.card import describe_normalization
from training.model import ShadesOfGray, build_model


def correct(images: np.ndarray, power: float = 6.0) -> np.ndarray:
    return ops.convert_to_numpy(ShadesOfGray(power)(np.asarray(images, dtype="float32")))


def test_a_uniform_colour_becomes_the_gray_of_the_same_length():
    # e = (200, 100, 50) / 255 for every p; each channel is scaled by ‖e‖ / (√3 e_c), so every channel
    # becomes 255 · ‖e‖ / √3 = √(200² + 100² + 50²) / √3 = √52500 / √3 = 132.288.
    photo = np.broadcast_to(np.array([200.0, 100.0, 50.0]), (1, 3, 3, 3))
    np.testing.assert_allclose(correct(photo), np.full((1, 3, 3, 3), 132.2876), rtol=1e-5)


def test_a_neutral_photo_is_left_as_it_is():
    gray = np.random.default_rng(0).uniform(0, 200, (1, 8, 8, 1)).repeat(3, axis=-1)
    np.testing.assert_allclose(correct(gray), gray, rtol=1e-5, atol=1e-3)


def test_the_minkowski_mean_is_the_illuminant():
    # Two pixels in red only, 255 and 0 (green and blue a constant 60): with p = 1 (Gray World) red's
    # illuminant is 127.5, with p = 6 it is 255 · (1/2)^(1/6) = 227.2; green and blue's are 60 either way.
    photo = np.zeros((1, 1, 2, 3))
    photo[..., 1:] = 60.0
    photo[0, 0, 0, 0] = 255.0
    for power, red in ((1.0, 127.5), (6.0, 255 * 0.5 ** (1 / 6))):
        norm = np.sqrt(red**2 + 2 * 60.0**2)
        gains = norm / (np.sqrt(3) * np.array([red, 60.0, 60.0]))
        expected = np.clip(photo * gains, 0, 255)
        np.testing.assert_allclose(correct(photo, power), expected, rtol=1e-5, atol=1e-3)


def test_a_colour_cast_is_divided_out():
    # The same scene under a reddish and a bluish light (gains per channel) comes out with the same colours:
    # the same up to one brightness factor (Shades of Gray keeps the illuminant's length, ‖e‖), as long as
    # no pixel clips; the gains differ per photo of a batch.
    scene = np.random.default_rng(1).uniform(20, 150, (1, 16, 16, 3))
    lights = np.array([1.3, 1.0, 0.7]), np.array([0.8, 1.0, 1.4])
    batch = np.concatenate([scene * light for light in lights])
    corrected = correct(batch)
    np.testing.assert_allclose(
        corrected[0] / corrected[0].mean(), corrected[1] / corrected[1].mean(), rtol=1e-4, atol=1e-5
    )
    chroma = batch / batch.mean(axis=(1, 2, 3), keepdims=True)
    assert np.abs(chroma[0] - chroma[1]).max() > 0.3


def test_the_output_stays_in_range_and_a_black_photo_stays_black():
    saturated = np.zeros((1, 4, 4, 3))
    saturated[..., 0] = 255.0
    saturated[0, 0, 0] = [255.0, 255.0, 255.0]  # one white pixel: green and blue gains are large
    out = correct(saturated)
    assert out.min() >= 0.0 and out.max() <= 255.0
    np.testing.assert_array_equal(correct(np.zeros((1, 4, 4, 3))), np.zeros((1, 4, 4, 3)))


def test_it_computes_in_float32_under_mixed_precision():
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        layer = ShadesOfGray()
        out = layer(np.full((1, 2, 2, 3), 100.0, dtype="float32"))
    finally:
        keras.mixed_precision.set_global_policy(previous)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    assert layer.compute_dtype == "float32"


def test_the_power_must_be_at_least_one():
    with pytest.raises(ValueError, match="at least 1"):
        ShadesOfGray(0.5)


#: Uniform photos of one colour length, √52500: Shades of Gray maps each to the same gray, 132.29.
SAME_GRAY = np.array([[200.0, 100.0, 50.0], [50.0, 100.0, 200.0], [132.2876] * 3], dtype="float32")


def uniform_photos(size: int) -> np.ndarray:
    return np.broadcast_to(SAME_GRAY[:, None, None, :], (3, size, size, 3)).copy()


@pytest.mark.parametrize("arch", ["resnet50v2-unet", "unet"])
def test_the_network_corrects_first_and_saves_and_loads_with_it(arch, tmp_path):
    options = {"encoder_weights": None, "decoder_filters": (16,) * 5, "unet_base_filters": 4}
    model = build_model(arch, (32, 32), color_constancy=True, **options)
    assert [layer.name for layer in model.layers[1:3]] == ["color_constancy", "image_scaling"]
    assert "color_constancy" not in [layer.name for layer in build_model(arch, (32, 32), **options).layers]
    photos = np.random.default_rng(2).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    scaled_input = keras.Model(model.input, model.get_layer("image_scaling").input)
    np.testing.assert_allclose(ops.convert_to_numpy(scaled_input(photos)), correct(photos), rtol=1e-6)
    # The three colours become one gray before anything else, so the network cannot tell them apart.
    probability = ops.convert_to_numpy(model(uniform_photos(32)))
    np.testing.assert_allclose(probability[0], probability[1], atol=1e-5)
    np.testing.assert_allclose(probability[0], probability[2], atol=1e-5)
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    assert restored.get_layer("color_constancy").power == 6.0
    np.testing.assert_array_equal(ops.convert_to_numpy(restored(photos)), ops.convert_to_numpy(model(photos)))


def test_the_option_is_off_by_default_and_the_card_says_when_it_is_on():
    assert TrainConfig().color_constancy is False  # the paper's recipe
    assert "Shades of Gray" not in describe_normalization({"arch": "resnet50v2-unet"})
    assert describe_normalization({"arch": "resnet50v2-unet", "color_constancy": True}) == (
        "RGB 0–255 float32; the network rescales internally (Shades of Gray colour constancy first, "
        "then x/127.5−1)"
    )


@pytest.mark.slow
def test_the_onnx_export_carries_the_correction(tmp_path):
    import onnxruntime as ort

    from training.export.convert import convert_keras_to_onnx

    keras.utils.set_random_seed(3)
    model = build_model("unet", (32, 32), unet_base_filters=4, dropout_rate=0.0, color_constancy=True)
    path = tmp_path / "model.onnx"
    convert_keras_to_onnx(model, path, (32, 32), opset=17)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    photos = np.random.default_rng(4).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    (found,) = session.run(None, {"image": photos})
    np.testing.assert_allclose(found, ops.convert_to_numpy(model(photos)), atol=1e-5)
    (uniform,) = session.run(None, {"image": uniform_photos(32)})
    np.testing.assert_allclose(uniform[0], uniform[1], atol=1e-5)
    np.testing.assert_allclose(uniform[0], uniform[2], atol=1e-5)


@pytest.mark.slow
def test_a_checkpoint_with_it_loads_for_evaluation_and_export_in_a_fresh_process(tmp_path):
    # A fresh interpreter: nothing has imported training.model (and registered the layer) beforehand.
    import subprocess
    import sys

    path = tmp_path / "model.keras"
    build_model("unet", (32, 32), unet_base_filters=4, color_constancy=True).save(path)
    script = (
        "import sys; from pathlib import Path\n"
        "from training.evaluate import load_pipeline\n"
        "from training.export.convert import load_checkpoint\n"
        "path = Path(sys.argv[1])\n"
        "print(load_pipeline(path).input_size, load_checkpoint(path).layers[1].name)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-3:] == ["(32,", "32)", "color_constancy"]
