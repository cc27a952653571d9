"""Segmentation networks: the paper's ResNet50V2 U-Net and the plain U-Net baseline.

Both networks take one input named ``image``: float32 ``(N, H, W, 3)`` RGB in 0–255, and scale it
themselves (the first layer), so an exported model is self-contained and the service never guesses the
preprocessing. With ``color_constancy`` a `ShadesOfGray` layer corrects each photo's colour cast before
that scaling, inside the network too, so the exported file carries it and every caller gets it alike.
Both end in a 1×1 convolution with a sigmoid named ``probability`` that stays float32 under mixed
precision, so the probabilities (and the loss computed on them) keep full precision.

Written with ``keras.layers`` / ``keras.ops`` only: the models build on any Keras backend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import keras
from keras import layers, ops

import training.losses  # noqa: F401  (registers the focal loss that compiled checkpoints name)
from training.config import ARCHITECTURES

# Encoder features the decoder concatenates, deepest first: output strides 16, 8, 4 and 2. In ResNet50V2
# a stage downsamples in its last block, so each skip is the first ReLU of that last block — the last
# feature map at the stage's full resolution. conv1_conv is the stem's 7×7 stride-2 convolution.
RESNET50V2_SKIPS = ("conv4_block6_1_relu", "conv3_block4_1_relu", "conv2_block3_1_relu", "conv1_conv")
RESNET50V2_BOTTLENECK = "post_relu"  # output stride 32
RESNET50V2_STRIDE = 32

# The file and hash keras.applications.ResNet50V2 downloads for include_top=False, so both share the
# cache in ~/.keras/models. Downloaded here rather than by ResNet50V2 itself so that a failed download
# surfaces as one clear error and "imagenet" and a local file take the same loading path.
RESNET50V2_IMAGENET_FILE = "resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5"
RESNET50V2_IMAGENET_URL = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/" + (
    RESNET50V2_IMAGENET_FILE
)
RESNET50V2_IMAGENET_HASH = "fac2f116257151a9d068a22e544a4917"


def load_network(checkpoint: str | Path) -> keras.Model:
    """Loads a ``.keras`` checkpoint's network, without its optimizer state.

    This module registers everything a checkpoint of ours names (the focal losses, `ShadesOfGray`), so a
    caller that loads through here needs nothing else imported first.
    """
    return keras.models.load_model(checkpoint, compile=False)


def _check_input_size(input_size: Sequence[int], multiple: int) -> tuple[int, int]:
    height, width = (int(side) for side in input_size)
    if height < multiple or width < multiple or height % multiple or width % multiple:
        raise ValueError(
            f"input size must be a multiple of {multiple} in both sides (the network downsamples "
            f"{multiple}×), not {height}x{width}"
        )
    return height, width


def ConvBlock(filters: int, name: str) -> Callable:
    """Two (3×3 convolution without bias → batch normalization → ReLU), layers named ``{name}_conv1`` …"""

    def apply(x):
        for index in (1, 2):
            x = layers.Conv2D(
                filters,
                3,
                padding="same",
                use_bias=False,
                kernel_initializer="he_normal",
                name=f"{name}_conv{index}",
            )(x)
            x = layers.BatchNormalization(name=f"{name}_bn{index}")(x)
            x = layers.ReLU(name=f"{name}_relu{index}")(x)
        return x

    return apply


def DecoderBlock(filters: int, stage: int, dropout_rate: float) -> Callable:
    """One decoder stage: 2× transposed-convolution upsampling, skip concatenation, dropout, `ConvBlock`.

    Layers are named ``decoder_stage{stage}_upsample``, ``_concat``, ``_dropout``, ``_conv1`` … so that
    checkpoints, summaries and tests can address them.

    Args:
        filters: Output channels of the stage.
        stage: 1 for the deepest stage.
        dropout_rate: Dropout after the concatenation (0 switches it off).

    Returns:
        ``apply(x, skip=None)``; without a skip the stage only upsamples and convolves.
    """
    prefix = f"decoder_stage{stage}"

    def apply(x, skip=None):
        x = layers.Conv2DTranspose(filters, 2, strides=2, padding="same", name=f"{prefix}_upsample")(x)
        if skip is not None:
            x = layers.Concatenate(name=f"{prefix}_concat")([x, skip])
        if dropout_rate > 0:
            x = layers.Dropout(dropout_rate, name=f"{prefix}_dropout")(x)
        return ConvBlock(filters, prefix)(x)

    return apply


#: Shades of Gray's Minkowski norm: 6, as Barata et al. (IEEE JBHI 2015) found best for dermoscopy.
SHADES_OF_GRAY_POWER = 6.0


@keras.saving.register_keras_serializable(package="dermaseg")
class ShadesOfGray(layers.Layer):
    """Shades of Gray colour constancy (Finlayson & Trezzi, 2004), per photo, on RGB in 0–255.

    Each channel's illuminant is its Minkowski ``p``-mean over the photo, ``e_c = mean(x_c^p)^(1/p)`` (1 is
    Gray World, ∞ is max-RGB); the photo is then scaled channel by channel by ``‖e‖ / (√3 · e_c)``, so a
    neutral (gray) illuminant leaves it unchanged and a colour cast is divided out, and clipped to 0–255.
    Dermoscopes and cameras differ in their light's colour; this removes that difference before the network
    sees the photo. No weights; computed in float32 whatever the policy.

    Args:
        power: the norm's ``p`` (at least 1).
    """

    def __init__(self, power: float = SHADES_OF_GRAY_POWER, **kwargs):
        super().__init__(**{"dtype": "float32", **kwargs})
        if power < 1:
            raise ValueError(f"the Shades of Gray power must be at least 1, not {power}")
        self.power = float(power)

    def call(self, image):
        image = ops.cast(image, "float32")
        # On x / 255, so that x^6 stays far from float32's range; the gains do not depend on the scale.
        scaled = ops.clip(image / 255.0, 0.0, 1.0)
        illuminant = ops.power(
            ops.mean(ops.power(scaled, self.power), axis=(1, 2), keepdims=True), 1 / self.power
        )
        illuminant = ops.maximum(illuminant, 1e-6)  # a black photo: gains of 1, not a division by 0
        norm = ops.sqrt(ops.sum(ops.square(illuminant), axis=-1, keepdims=True))
        gains = norm / (illuminant * 3.0**0.5)
        return ops.clip(image * gains, 0.0, 255.0)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "power": self.power}


def ProbabilityHead(name: str = "probability") -> Callable:
    """1×1 convolution + sigmoid, float32 even under a mixed-precision policy."""

    def apply(x):
        return layers.Conv2D(1, 1, activation="sigmoid", dtype="float32", name=name)(x)

    return apply


def _resolve_encoder_weights(encoder_weights: str | Path | None) -> Path | None:
    """Turns ``encoder_weights`` into a local file (downloading ImageNet weights) or None."""
    if encoder_weights is None or str(encoder_weights).lower() == "none":
        return None
    if str(encoder_weights) == "imagenet":
        try:
            # Looked up on keras.utils at call time, so tests can replace it.
            return Path(
                keras.utils.get_file(
                    RESNET50V2_IMAGENET_FILE,
                    RESNET50V2_IMAGENET_URL,
                    cache_subdir="models",
                    file_hash=RESNET50V2_IMAGENET_HASH,
                )
            )
        except Exception as error:  # get_file raises bare Exception for network errors
            raise RuntimeError(
                f"could not download the ImageNet weights of ResNet50V2 from {RESNET50V2_IMAGENET_URL} "
                f"({error}); download {RESNET50V2_IMAGENET_FILE} elsewhere and pass its path as the "
                "encoder weights, or train from scratch with encoder weights 'none'"
            ) from error
    path = Path(encoder_weights)
    if not path.is_file():
        raise ValueError(
            f"encoder weights must be 'imagenet', 'none' or the path to a weights file; no such file: {path}"
        )
    if not path.name.endswith((".h5", ".hdf5")):
        raise ValueError(f"encoder weights file must be .h5 or .weights.h5, not {path.name}")
    return path


def _load_encoder_weights(encoder: keras.Model, path: Path) -> None:
    """Loads ResNet50V2 no-top weights into ``encoder``.

    ``.weights.h5`` (Keras 3) files load by structure; legacy ``.h5`` files (the ImageNet download, or a
    Keras 2 / ``model.save("x.h5")`` file) load by layer name, after checking that the file holds every
    layer of the encoder that has weights — loading by name alone would skip missing layers silently.
    """
    if path.name.endswith(".weights.h5"):
        encoder.load_weights(path)
        return
    import h5py  # a Keras dependency

    with h5py.File(path, "r") as file:
        group = file["model_weights"] if "layer_names" not in file.attrs and "model_weights" in file else file
        stored = {name.decode() if isinstance(name, bytes) else name for name in group.attrs["layer_names"]}
    missing = [layer.name for layer in encoder.layers if layer.weights and layer.name not in stored]
    if missing:
        raise ValueError(
            f"{path} is not a ResNet50V2 (no top) weights file: it lacks {len(missing)} encoder layers, "
            f"e.g. {', '.join(missing[:3])}"
        )
    encoder.load_weights(path, by_name=True)


def build_resnet50v2_unet(
    input_size: Sequence[int] = (224, 224),
    encoder_weights: str | Path | None = "imagenet",
    decoder_filters: Sequence[int] = (512, 256, 128, 64, 32),
    dropout_rate: float = 0.3,
    color_constancy: bool = False,
    name: str = "resnet50v2_unet",
) -> keras.Model:
    """The paper's network: a ResNet50V2 encoder and a five-stage U-Net decoder.

    The encoder's layers keep their Keras names (``conv1_conv``, ``post_relu`` …); the decoder's are
    ``decoder_stage{1..5}_…``. Stages 1–4 concatenate the `RESNET50V2_SKIPS` (output strides 16, 8, 4,
    2); stage 5 upsamples to the input's resolution without a skip.

    Args:
        input_size: ``(height, width)``, each a multiple of 32.
        encoder_weights: ``"imagenet"`` (downloaded by Keras and cached), ``None`` / ``"none"`` (random
            initialisation), or the path of a ResNet50V2 no-top weights file (``.h5`` or ``.weights.h5``).
        decoder_filters: Widths of the five decoder stages, deepest first.
        dropout_rate: Dropout in each decoder stage.
        color_constancy: Correct each photo's colour cast first (`ShadesOfGray`, layer ``color_constancy``).
        name: Model name.

    Returns:
        A functional model ``image`` (float32 RGB 0–255) → ``probability`` (float32, ``(N, H, W, 1)``).

    Raises:
        ValueError: A bad input size, decoder width list or weights file.
        RuntimeError: The ImageNet weights could not be downloaded.
    """
    height, width = _check_input_size(input_size, RESNET50V2_STRIDE)
    decoder_filters = tuple(int(filters) for filters in decoder_filters)
    if len(decoder_filters) != len(RESNET50V2_SKIPS) + 1:
        raise ValueError(f"decoder filters must be {len(RESNET50V2_SKIPS) + 1} widths, not {decoder_filters}")
    weights_path = _resolve_encoder_weights(encoder_weights)  # fails before anything is built

    image = keras.Input((height, width, 3), name="image")
    x = ShadesOfGray(name="color_constancy")(image) if color_constancy else image
    # ResNet50V2 expects x / 127.5 - 1 (keras.applications.resnet_v2.preprocess_input, "tf" mode).
    scaled = layers.Rescaling(1 / 127.5, offset=-1, name="image_scaling")(x)
    encoder = keras.applications.ResNet50V2(include_top=False, weights=None, input_tensor=scaled)
    if weights_path is not None:
        _load_encoder_weights(encoder, weights_path)

    x = encoder.get_layer(RESNET50V2_BOTTLENECK).output
    skips = [encoder.get_layer(layer_name).output for layer_name in RESNET50V2_SKIPS] + [None]
    for stage, (filters, skip) in enumerate(zip(decoder_filters, skips, strict=True), start=1):
        x = DecoderBlock(filters, stage, dropout_rate)(x, skip)
    probability = ProbabilityHead()(x)
    return keras.Model(image, probability, name=name)


def build_unet(
    input_size: Sequence[int] = (224, 224),
    base_filters: int = 64,
    depth: int = 4,
    dropout_rate: float = 0.3,
    color_constancy: bool = False,
    name: str = "unet",
) -> keras.Model:
    """The plain U-Net baseline (Ronneberger et al., 2015), with batch normalization.

    ``depth`` levels of `ConvBlock` + 2×2 max pooling (widths ``base_filters · 2^level``), a bottleneck
    ``ConvBlock`` (``base_filters · 2^depth``), then ``depth`` `DecoderBlock` stages, each concatenating
    the encoder level of its resolution. Differences from the paper, all usual today: "same" padding
    (output size = input size), batch normalization after each convolution (and so no conv bias), and
    dropout in the decoder stages as in the ResNet50V2 U-Net. The input is scaled to [0, 1].

    Layers are named ``encoder_stage{1..depth}_…`` (1 = full resolution), ``bottleneck_…`` and
    ``decoder_stage{1..depth}_…`` (1 = deepest).

    Args:
        input_size: ``(height, width)``, each a multiple of 32 (and of ``2**depth``).
        base_filters: Widths of the first level.
        depth: Number of poolings.
        dropout_rate: Dropout in each decoder stage.
        color_constancy: Correct each photo's colour cast first (`ShadesOfGray`, layer ``color_constancy``).
        name: Model name.

    Returns:
        A functional model ``image`` (float32 RGB 0–255) → ``probability`` (float32, ``(N, H, W, 1)``).
    """
    if depth < 1 or base_filters < 1:
        raise ValueError(f"depth and base filters must be at least 1, not {depth} and {base_filters}")
    height, width = _check_input_size(input_size, max(RESNET50V2_STRIDE, 2**depth))

    image = keras.Input((height, width, 3), name="image")
    x = ShadesOfGray(name="color_constancy")(image) if color_constancy else image
    x = layers.Rescaling(1 / 255, name="image_scaling")(x)
    skips = []
    for level in range(depth):
        x = ConvBlock(base_filters * 2**level, f"encoder_stage{level + 1}")(x)
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"encoder_stage{level + 1}_pool")(x)
    x = ConvBlock(base_filters * 2**depth, "bottleneck")(x)
    for stage, skip in enumerate(reversed(skips), start=1):
        x = DecoderBlock(base_filters * 2 ** (depth - stage), stage, dropout_rate)(x, skip)
    probability = ProbabilityHead()(x)
    return keras.Model(image, probability, name=name)


def build_model(
    arch: str,
    input_size: Sequence[int],
    encoder_weights: str | Path | None = "imagenet",
    decoder_filters: Sequence[int] = (512, 256, 128, 64, 32),
    unet_base_filters: int = 64,
    dropout_rate: float = 0.3,
    color_constancy: bool = False,
) -> keras.Model:
    """Builds the network named by ``arch``, with the options of `training.config.TrainConfig`.

    Args:
        arch: ``"resnet50v2-unet"`` (`build_resnet50v2_unet`) or ``"unet"`` (`build_unet`).
        input_size: ``(height, width)``, each a multiple of 32.
        encoder_weights: ResNet50V2 U-Net only: ``"imagenet"``, ``None`` / ``"none"`` or a weights file.
        decoder_filters: ResNet50V2 U-Net only: the five decoder widths, deepest first.
        unet_base_filters: Plain U-Net only: widths of its first level.
        dropout_rate: Dropout in each decoder stage.
        color_constancy: Correct each photo's colour cast first (`ShadesOfGray`).

    Returns:
        The uncompiled model: ``image`` (float32 RGB 0–255) → ``probability`` (float32, ``(N, H, W, 1)``).

    Raises:
        ValueError: An unknown architecture or a bad option.
        RuntimeError: The ImageNet weights could not be downloaded.
    """
    if arch == "resnet50v2-unet":
        return build_resnet50v2_unet(
            input_size,
            encoder_weights=encoder_weights,
            decoder_filters=decoder_filters,
            dropout_rate=dropout_rate,
            color_constancy=color_constancy,
        )
    if arch == "unet":
        return build_unet(
            input_size,
            base_filters=unet_base_filters,
            dropout_rate=dropout_rate,
            color_constancy=color_constancy,
        )
    raise ValueError(f"architecture must be one of {ARCHITECTURES}, not {arch!r}")
