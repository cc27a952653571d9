"""`dermaseg train --init-from`: a run starts from another run's weights, never from another network's."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest

from tests.conftest import make_dataset
from training.config import ConfigError, TrainConfig
from training.model import build_model
from training.train import train, warm_start

pytestmark = pytest.mark.slow  # builds, fits and saves networks (tens of seconds on a busy machine)


def _unet(base_filters: int = 4, size: int = 32, seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return build_model("unet", input_size=(size, size), unet_base_filters=base_filters, dropout_rate=0.0)


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A tiny U-Net trained one step, saved with its optimizer state as a run's checkpoints are."""
    model = _unet(seed=1)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="binary_crossentropy")
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    model.fit(images, (images[..., :1] > 127).astype("float32"), epochs=1, verbose=0)
    path = tmp_path / "best.keras"
    model.save(path)
    return path


def test_the_weights_are_the_checkpoints_and_the_optimizer_starts_afresh(checkpoint: Path) -> None:
    saved = keras.models.load_model(checkpoint, compile=False).get_weights()
    model = _unet(size=64, seed=2)  # another input size: the network is fully convolutional
    assert not all(np.array_equal(a, b) for a, b in zip(model.get_weights(), saved, strict=True))

    warm_start(model, checkpoint)

    for got, expected in zip(model.get_weights(), saved, strict=True):
        np.testing.assert_array_equal(got, expected)
    assert getattr(model, "optimizer", None) is None, "only the weights are taken"


def test_a_checkpoint_of_another_network_is_refused(checkpoint: Path) -> None:
    wider = _unet(base_filters=8)
    before = wider.get_weights()

    with pytest.raises(ConfigError, match=r"another network.*encoder_stage1_conv1.*same --arch and widths"):
        warm_start(wider, checkpoint)
    with pytest.raises(ConfigError, match="another network"):
        warm_start(build_model("resnet50v2-unet", (32, 32), encoder_weights=None), checkpoint)

    for got, expected in zip(wider.get_weights(), before, strict=True):
        np.testing.assert_array_equal(got, expected)  # left as it was


def test_a_missing_or_unreadable_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such checkpoint"):
        warm_start(_unet(), tmp_path / "nothing.keras")
    (tmp_path / "broken.keras").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="cannot load"):
        warm_start(_unet(), tmp_path / "broken.keras")


def test_train_refuses_before_making_the_run_or_with_another_network(
    checkpoint: Path, tmp_path: Path
) -> None:
    data = make_dataset(tmp_path / "data", "normalized", n=6, size=32)
    options = {"arch": "unet", "image_size": 32, "batch_size": 2, "epochs": 1, "workers": 1}

    with pytest.raises(ConfigError, match="no such checkpoint"):
        train(
            TrainConfig(
                data=[str(data)], out=str(tmp_path / "a"), init_from=str(tmp_path / "x.keras"), **options
            )
        )
    assert not (tmp_path / "a").exists()

    wider = TrainConfig(
        data=[str(data)], out=str(tmp_path / "b"), init_from=str(checkpoint), unet_base_filters=8, **options
    )
    with pytest.raises(ConfigError, match="another network"):
        train(wider)
    assert not (tmp_path / "b" / "last.keras").exists()


def test_a_warm_start_split_like_its_models_card_validates_on_what_that_model_did_not_train_on(
    checkpoint: Path, tmp_path: Path
) -> None:
    data = make_dataset(tmp_path / "data", "normalized", n=6, size=32)
    card = tmp_path / "card.json"
    card.write_text(json.dumps({"training": {"data": {"datasets": ["data"], "val_ids": ["data/SYN_0004"]}}}))
    cfg = TrainConfig(
        data=[str(data)],
        out=str(tmp_path / "run"),
        init_from=str(checkpoint),
        split_like=str(card),
        arch="unet",
        unet_base_filters=4,
        dropout_rate=0.0,
        image_size=32,
        batch_size=2,
        epochs=1,
        workers=1,
        val_fraction=0.5,  # would hold out three photos if the card did not decide
    )

    train(cfg)

    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert [entry["id"] for entry in split["val"]] == ["SYN_0004"]
    assert len(split["train"]) == 5
    assert TrainConfig.load(tmp_path / "run" / "config.json").split_like == str(card)
