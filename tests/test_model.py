"""The networks: shapes, skip connections, parameter counts, mixed precision, saving and encoder weights."""

import keras
import numpy as np
import pytest
from keras import ops

from training.model import (
    RESNET50V2_SKIPS,
    build_model,
    build_resnet50v2_unet,
    build_unet,
)

SLIM_DECODER = (256, 128, 64, 32, 16)
TINY_DECODER = (16, 16, 16, 16, 16)


@pytest.fixture(scope="module")
def resnet_unet() -> keras.Model:
    return build_resnet50v2_unet((64, 64), encoder_weights=None)


@pytest.fixture(scope="module")
def unet() -> keras.Model:
    return build_unet((64, 64))


@pytest.fixture
def mixed_bfloat16():
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    yield
    keras.mixed_precision.set_global_policy(previous)


def random_images(count: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (count, size, size, 3)).astype("float32")


def predict(model: keras.Model, images: np.ndarray) -> np.ndarray:
    return ops.convert_to_numpy(model(images, training=False))


@pytest.mark.parametrize("model_name", ["resnet_unet", "unet"])
def test_output_is_a_probability_map_of_the_input_size(model_name, request):
    model = request.getfixturevalue(model_name)
    assert model.input.name == "image"
    assert model.output_names == ["probability"]
    probability = predict(model, random_images(2, 64))
    assert probability.shape == (2, 64, 64, 1)
    assert probability.dtype == np.float32
    assert ((probability >= 0) & (probability <= 1)).all()


def test_skip_layers_have_the_expected_strides(resnet_unet):
    assert RESNET50V2_SKIPS == (
        "conv4_block6_1_relu",
        "conv3_block4_1_relu",
        "conv2_block3_1_relu",
        "conv1_conv",
    )
    # 64×64 input: strides 16, 8, 4, 2, and the bottleneck at stride 32.
    for layer_name, side in zip(RESNET50V2_SKIPS, (4, 8, 16, 32), strict=True):
        assert tuple(resnet_unet.get_layer(layer_name).output.shape[1:3]) == (side, side), layer_name
    assert tuple(resnet_unet.get_layer("post_relu").output.shape[1:3]) == (2, 2)
    # Each decoder stage doubles the resolution and takes the skip of its size.
    for stage, side in enumerate((4, 8, 16, 32, 64), start=1):
        for suffix in ("upsample", "relu2"):
            layer = resnet_unet.get_layer(f"decoder_stage{stage}_{suffix}")
            assert tuple(layer.output.shape[1:3]) == (side, side), layer.name
    concat_inputs = {tensor.name for tensor in resnet_unet.get_layer("decoder_stage1_concat").input}
    assert resnet_unet.get_layer("conv4_block6_1_relu").output.name in concat_inputs
    layer_names = {layer.name for layer in resnet_unet.layers}
    assert "decoder_stage5_concat" not in layer_names  # the last stage has no skip
    assert {"decoder_stage5_dropout", "decoder_stage5_conv2", "decoder_stage5_bn2"} <= layer_names


def test_input_is_scaled_for_resnet50v2(resnet_unet):
    scaling = resnet_unet.get_layer("image_scaling")
    scaled = ops.convert_to_numpy(scaling(np.array([[[[0.0, 127.5, 255.0]]]], dtype="float32")))
    np.testing.assert_allclose(scaled.ravel(), [-1.0, 0.0, 1.0], atol=1e-6)


def test_parameter_counts(resnet_unet, unet):
    # The "36.3 M parameters" for decoder widths 512/256/128/64/32: 23,564,800 in the encoder.
    assert resnet_unet.count_params() == 36_334_849
    slim = build_resnet50v2_unet((64, 64), encoder_weights=None, decoder_filters=SLIM_DECODER)
    assert slim.count_params() == 28_204_417
    assert unet.count_params() == 31_049_409


def test_head_stays_float32_under_mixed_precision(mixed_bfloat16):
    model = build_resnet50v2_unet((64, 64), encoder_weights=None, decoder_filters=TINY_DECODER)
    assert model.get_layer("decoder_stage5_conv2").compute_dtype == "bfloat16"
    assert model.get_layer("probability").compute_dtype == "float32"
    assert keras.backend.standardize_dtype(model.output.dtype) == "float32"
    plain = build_unet((64, 64), base_filters=4)
    assert plain.get_layer("probability").compute_dtype == "float32"
    assert keras.backend.standardize_dtype(plain.output.dtype) == "float32"


@pytest.mark.parametrize("arch", ["resnet50v2-unet", "unet"])
def test_keras_save_and_load_round_trip(arch, tmp_path):
    options = {"encoder_weights": None, "decoder_filters": TINY_DECODER, "unet_base_filters": 4}
    model = build_model(arch, (32, 32), **options)
    images = random_images(2, 32, seed=1)
    expected = predict(model, images)
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.saving.load_model(path)  # no custom_objects: nothing custom to resolve
    assert restored.name == model.name
    assert restored.output_names == ["probability"]
    np.testing.assert_array_equal(predict(restored, images), expected)


@pytest.mark.parametrize("file_name", ["encoder.weights.h5", "encoder.h5"])
def test_encoder_weights_from_a_local_file(file_name, tmp_path):
    source = keras.applications.ResNet50V2(include_top=False, weights=None, input_shape=(32, 32, 3))
    path = tmp_path / file_name
    if file_name.endswith(".weights.h5"):
        source.save_weights(path)
    else:
        source.save(path)  # legacy full-model HDF5, the layout of a Keras 2 weights download
    model = build_resnet50v2_unet((32, 32), encoder_weights=str(path), decoder_filters=TINY_DECODER)
    weighted = [layer for layer in source.layers if layer.weights]
    assert len(weighted) > 100
    for layer in weighted:
        for loaded, saved in zip(model.get_layer(layer.name).get_weights(), layer.get_weights(), strict=True):
            np.testing.assert_array_equal(loaded, saved, err_msg=layer.name)


def test_encoder_weights_file_of_another_network_is_rejected(tmp_path):
    other = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2, name="dense")])
    path = tmp_path / "other.h5"
    other.save(path)
    with pytest.raises(ValueError, match="not a ResNet50V2"):
        build_resnet50v2_unet((32, 32), encoder_weights=path, decoder_filters=TINY_DECODER)


def test_missing_encoder_weights_file(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        build_resnet50v2_unet((32, 32), encoder_weights=str(tmp_path / "absent.h5"))


def test_imagenet_download_failure_is_a_clear_error(monkeypatch):
    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://storage.googleapis.com/...: None -- no network")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    with pytest.raises(RuntimeError, match="could not download") as error:
        build_resnet50v2_unet((32, 32), encoder_weights="imagenet")
    assert "none" in str(error.value)
    assert "path" in str(error.value)


@pytest.mark.parametrize("input_size", [(48, 48), (64, 40), (16, 16)])
def test_input_size_must_be_a_multiple_of_32(input_size):
    with pytest.raises(ValueError, match="multiple of 32"):
        build_resnet50v2_unet(input_size, encoder_weights=None)
    with pytest.raises(ValueError, match="multiple of 32"):
        build_unet(input_size)


def test_non_square_input():
    model = build_unet((32, 64), base_filters=4)
    assert predict(model, np.zeros((1, 32, 64, 3), "float32")).shape == (1, 32, 64, 1)


def test_build_model_rejects_unknown_architecture():
    with pytest.raises(ValueError, match="resnet50v2-unet"):
        build_model("segformer", (32, 32), encoder_weights=None)


def test_decoder_needs_five_widths():
    with pytest.raises(ValueError, match="5 widths"):
        build_resnet50v2_unet((32, 32), encoder_weights=None, decoder_filters=(64, 32))
