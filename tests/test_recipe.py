"""The release-recipe options (issue 12): config, CLI flags, optimizer and schedule, EMA checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest

from tests.conftest import make_dataset
from training.callbacks import EmaWeights, swap_ema_weights
from training.cli import main
from training.config import ConfigError, TrainConfig, parse_source_weights
from training.data import Sample
from training.losses import FocalLoss, FocalRegionLoss, get_loss
from training.split import limit_samples
from training.train import build_optimizer, learning_rate_schedule


def test_defaults_are_the_papers_recipe() -> None:
    cfg = TrainConfig()
    assert (cfg.loss, cfg.region_weight, cfg.rotation_degrees, cfg.zoom, cfg.photometric) == (
        "focal",
        None,
        30.0,
        0.2,
        False,
    )
    assert (cfg.optimizer, cfg.weight_decay, cfg.schedule, cfg.warmup_epochs, cfg.ema) == (
        "adam",
        None,
        "plateau",
        0,
        False,
    )
    assert cfg.source_weights == "none"
    optimizer = build_optimizer(cfg)
    assert type(optimizer) is keras.optimizers.Adam
    assert not optimizer.use_ema and optimizer.weight_decay is None
    assert float(optimizer.learning_rate) == pytest.approx(1e-4)
    assert type(get_loss(cfg.loss, region_weight=cfg.region_weight)) is FocalLoss


def test_recipe_options_are_validated_and_resolved() -> None:
    cfg = TrainConfig(loss="focal+jaccard", optimizer="adamw")
    assert cfg.region_weight == 1.0 and cfg.weight_decay == 0.01  # filled in, so config.json records them
    assert TrainConfig(loss="focal+dice", region_weight=0.5).region_weight == 0.5
    bad = [
        ({"region_weight": 0.5}, "region weight applies"),
        ({"loss": "focal+dice", "region_weight": -1.0}, "region weight must be"),
        ({"rotation_degrees": 400.0}, "rotation degrees"),
        ({"zoom": 1.0}, "zoom"),
        ({"photometric": True, "augment": False}, "photometric"),
        ({"source_weights": "ph2"}, "source weights"),
        ({"source_weights": "ph2=0,ham10000=0"}, "positive weight"),
        ({"optimizer": "sgd"}, "optimizer"),
        ({"weight_decay": 0.1}, "needs --optimizer adamw"),
        ({"schedule": "step"}, "schedule"),
        ({"warmup_epochs": 2}, "need --schedule cosine"),
        ({"schedule": "cosine", "warmup_epochs": 5, "epochs": 5}, "shorter than the run"),
        ({"ema_momentum": 1.0}, "EMA momentum"),
    ]
    for options, message in bad:
        with pytest.raises(ConfigError, match=message):
            TrainConfig(**options)  # type: ignore[arg-type]


def test_source_weights_parse() -> None:
    assert parse_source_weights("none") is None
    assert parse_source_weights("balanced") == {}
    assert parse_source_weights("ph2=2, ham10000=0.5") == {"ph2": 2.0, "ham10000": 0.5}
    for text in ("ph2=1,ph2=2", "ph2=-1", "=1", "ph2=x"):
        with pytest.raises(ConfigError):
            parse_source_weights(text)


def test_cosine_schedule_warms_up_then_decays_to_the_floor() -> None:
    cfg = TrainConfig(schedule="cosine", warmup_epochs=1, epochs=4, learning_rate=1e-3, min_lr=1e-5)
    schedule = learning_rate_schedule(cfg, steps_per_epoch=10)
    rate = [float(schedule(step)) for step in (0, 5, 10, 25, 40)]
    assert rate[0] == pytest.approx(0.0)
    assert rate[1] == pytest.approx(5e-4)  # linear warm-up over the first epoch
    assert rate[2] == pytest.approx(1e-3)  # the peak
    # Half-way through the 30 decay steps: the cosine's midpoint between peak and floor.
    assert rate[3] == pytest.approx(1e-5 + (1e-3 - 1e-5) / 2, rel=1e-4)
    assert rate[4] == pytest.approx(1e-5, rel=1e-4)
    no_warmup = learning_rate_schedule(TrainConfig(schedule="cosine", epochs=2), steps_per_epoch=5)
    assert float(no_warmup(0)) == pytest.approx(1e-4)
    assert learning_rate_schedule(TrainConfig(), None) == 1e-4


def test_adamw_and_ema_options_reach_the_optimizer() -> None:
    cfg = TrainConfig(optimizer="adamw", weight_decay=0.05, ema=True, ema_momentum=0.95)
    optimizer = build_optimizer(cfg)
    assert type(optimizer) is keras.optimizers.AdamW
    assert optimizer.weight_decay == pytest.approx(0.05)
    assert optimizer.use_ema and optimizer.ema_momentum == pytest.approx(0.95)


def _samples(dataset: str, count: int) -> list[Sample]:
    return [
        Sample(f"{dataset}_{i:02d}", Path(f"{dataset}/{i}.jpg"), Path(f"{dataset}/{i}.png"), dataset)
        for i in range(count)
    ]


def test_max_images_samples_every_source() -> None:
    samples = _samples("alpha", 20) + _samples("beta", 20)
    kept = limit_samples(samples, 10, seed=1)
    assert len(kept) == 10 and {sample.dataset for sample in kept} == {"alpha", "beta"}
    assert kept == limit_samples(list(reversed(samples)), 10, seed=1)  # seeded, whatever the input order
    assert kept != limit_samples(samples, 10, seed=2)
    # One source: its first N, as --max-images always took.
    assert limit_samples(_samples("alpha", 20), 5, seed=1) == _samples("alpha", 5)
    assert len(limit_samples(samples, 100, seed=1)) == 40


def test_cli_flags_reach_the_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import training.train

    seen: list[TrainConfig] = []

    def fake_train(cfg: TrainConfig, **_: object) -> dict:
        seen.append(cfg)
        return {"best_checkpoint": "b.keras", "best_val_loss": 0.0}

    monkeypatch.setattr(training.train, "train", fake_train)
    (tmp_path / "data").mkdir()
    base = ["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run")]
    recipe = [
        "--loss", "focal+jaccard", "--region-weight", "0.5", "--rotation-degrees", "180", "--zoom", "0.3",
        "--photometric", "--source-weights", "balanced", "--optimizer", "adamw", "--weight-decay", "0.02",
        "--schedule", "cosine", "--warmup-epochs", "2", "--ema", "--ema-momentum", "0.995",
    ]  # fmt: skip
    assert main(base + recipe) == 0
    cfg = seen[-1]
    assert (cfg.loss, cfg.region_weight, cfg.rotation_degrees, cfg.zoom, cfg.photometric) == (
        "focal+jaccard",
        0.5,
        180.0,
        0.3,
        True,
    )
    assert (cfg.source_weights, cfg.optimizer, cfg.weight_decay, cfg.schedule, cfg.warmup_epochs) == (
        "balanced",
        "adamw",
        0.02,
        "cosine",
        2,
    )
    assert cfg.ema and cfg.ema_momentum == 0.995
    assert main(base) == 0
    assert seen[-1] == TrainConfig(data=cfg.data, out=cfg.out)  # no flag: the paper's recipe

    assert main([*base, "--weight-decay", "0.1"]) == 2
    assert "weight decay needs --optimizer adamw" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--source-weights", "ph2"])
    assert "source weights must be" in capsys.readouterr().err


# --- EMA: the checkpoints hold the average ---------------------------------------------------------------


class RawWeights(keras.callbacks.Callback):
    """Records the raw weights after every step, and which step ends each epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[list[np.ndarray]] = []
        self.epoch_ends: list[int] = []

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.steps.append([np.array(weight) for weight in self.model.get_weights()])

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch_ends.append(len(self.steps) - 1)


def _moving_average(steps: list[list[np.ndarray]], momentum: float) -> list[list[np.ndarray]]:
    """Keras' EMA worked out independently: the first step's weights, then m · average + (1 − m) · weights."""
    averages = [steps[0]]
    for weights in steps[1:]:
        averages.append(
            [momentum * a + (1 - momentum) * w for a, w in zip(averages[-1], weights, strict=True)]
        )
    return averages


def _tiny_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((6, 6, 1)), keras.layers.Conv2D(2, 3, padding="same"), keras.layers.Conv2D(1, 1)]
    )
    optimizer = keras.optimizers.Adam(learning_rate=0.05, use_ema=True, ema_momentum=0.6)
    model.compile(optimizer=optimizer, loss="mse")
    return model


def test_ema_checkpoints_hold_the_average_and_resume_restores_the_raw_weights(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 6, 6, 1)), rng.normal(size=(8, 6, 6, 1))
    x_val, y_val = rng.normal(size=(4, 6, 6, 1)), rng.normal(size=(4, 6, 6, 1))
    model = _tiny_model()
    recorder = RawWeights()
    history = model.fit(
        x,
        y,
        batch_size=4,
        epochs=3,
        validation_data=(x_val, y_val),
        shuffle=False,
        verbose=0,
        callbacks=[
            recorder,
            EmaWeights(),
            keras.callbacks.ModelCheckpoint(str(tmp_path / "epoch{epoch}.keras")),
        ],
    )
    averages = _moving_average(recorder.steps, 0.6)
    for epoch, step in enumerate(recorder.epoch_ends):
        saved = keras.models.load_model(tmp_path / f"epoch{epoch + 1}.keras")
        for weight, expected, raw in zip(
            saved.get_weights(), averages[step], recorder.steps[step], strict=True
        ):
            np.testing.assert_allclose(weight, expected, rtol=1e-5, atol=1e-6)
            assert not np.allclose(weight, raw)  # the average, not the raw weights
        # The validation loss Keras logged is the average's.
        assert saved.evaluate(x_val, y_val, verbose=0) == pytest.approx(
            history.history["val_loss"][epoch], rel=1e-5
        )

    # Resuming from a checkpoint: one swap gives back the raw weights to train on, the average to the slots.
    resumed = keras.models.load_model(tmp_path / "epoch2.keras")
    swap_ema_weights(resumed)
    for weight, raw in zip(resumed.get_weights(), recorder.steps[recorder.epoch_ends[1]], strict=True):
        np.testing.assert_allclose(weight, raw, rtol=1e-5, atol=1e-6)
    slots = [np.array(v) for v in resumed.optimizer._model_variables_moving_average]
    for slot, expected in zip(slots, averages[recorder.epoch_ends[1]], strict=True):
        np.testing.assert_allclose(slot, expected, rtol=1e-5, atol=1e-6)


def test_ema_callback_needs_an_ema_optimizer() -> None:
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    with pytest.raises(ValueError, match="use_ema"):
        model.fit(np.zeros((2, 2)), np.zeros((2, 1)), epochs=1, verbose=0, callbacks=[EmaWeights()])


# --- the whole recipe through train(), tiny --------------------------------------------------------------

TINY = {
    "arch": "unet",
    "unet_base_filters": 4,
    "encoder_weights": "none",
    "image_size": 64,
    "batch_size": 4,
    "workers": 1,
    "seed": 3,
}


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("sources")
    return [
        str(make_dataset(root / "small", "normalized", n=6, size=80, seed=0)),
        str(make_dataset(root / "large", "normalized", n=14, size=80, seed=50)),
    ]


@pytest.mark.slow
def test_the_release_recipe_trains_and_records_itself(two_sources: list[str], tmp_path: Path) -> None:
    from training.callbacks import read_history
    from training.train import train

    out = tmp_path / "recipe"
    cfg = TrainConfig(
        data=two_sources,
        out=str(out),
        loss="focal+jaccard",
        rotation_degrees=180,
        zoom=0.3,
        photometric=True,
        source_weights="balanced",
        optimizer="adamw",
        schedule="cosine",
        warmup_epochs=1,
        ema=True,
        epochs=2,
        steps_per_epoch=2,
        **TINY,  # type: ignore[arg-type]
    )
    summary = train(cfg)
    assert summary["epochs_run"] == 2 and np.isfinite(summary["best_val_loss"])
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["loss"] == "focal+jaccard" and recorded["region_weight"] == 1.0
    assert recorded["weight_decay"] == 0.01 and recorded["source_weights"] == "balanced" and recorded["ema"]
    history = read_history(out / "history.csv")
    # Cosine, warm-up 1 epoch of 2 × 2 steps: after epoch 1 at the peak, after epoch 2 at the floor.
    assert history[0]["learning_rate"] == pytest.approx(1e-4, rel=1e-3)
    assert history[1]["learning_rate"] == pytest.approx(1e-6, rel=1e-3)
    last = keras.models.load_model(out / "last.keras")
    assert type(last.optimizer) is keras.optimizers.AdamW and last.optimizer.use_ema
    assert isinstance(last.loss, FocalRegionLoss) and last.loss.region == "jaccard"
    with pytest.raises(ConfigError, match="cosine schedule"):
        train(None, resume=out, epochs=4)


@pytest.mark.slow
def test_an_ema_run_resumes(two_sources: list[str], tmp_path: Path) -> None:
    from training.callbacks import read_history
    from training.train import train

    out = tmp_path / "ema"
    cfg = TrainConfig(data=two_sources, out=str(out), ema=True, epochs=1, max_images=10, **TINY)  # type: ignore[arg-type]
    train(cfg)
    first = read_history(out / "history.csv")
    split = json.loads((out / "split.json").read_text())
    assert {row["dataset"] for row in split["train"] + split["val"]} == {
        "small",
        "large",
    }  # --max-images mixes
    train(None, resume=out, epochs=2)
    history = read_history(out / "history.csv")
    assert [int(row["epoch"]) for row in history] == [0, 1] and history[0] == first[0]
    assert (out / "best.keras").is_file()
