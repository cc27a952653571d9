"""Training, resume, evaluation and the command line, end to end on small synthetic data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import make_dataset
from training.callbacks import read_history
from training.cli import main
from training.config import ConfigError, TrainConfig

pytestmark = pytest.mark.slow

TINY = {
    "encoder_weights": "none",
    "decoder_filters": (32, 16, 16, 8, 8),
    "image_size": 64,
    "batch_size": 4,
    "workers": 1,
    "seed": 3,
}


def tiny_config(data: Path, out: Path, **overrides: object) -> TrainConfig:
    options = {**TINY, **overrides}
    return TrainConfig(data=[str(data)], out=str(out), **options)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "set", layout="normalized", n=16, size=96, seed=1)


@pytest.fixture(scope="module")
def trained_run(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A plain U-Net trained for a few epochs: small enough to learn the dark-ellipse lesions quickly."""
    from training.train import train

    out = tmp_path_factory.mktemp("runs") / "unet"
    cfg = tiny_config(
        dataset, out, arch="unet", unet_base_filters=8, epochs=6, learning_rate=3e-3, loss="bce"
    )
    return out, train(cfg)


def test_run_directory_holds_everything(trained_run: tuple[Path, dict]) -> None:
    out, summary = trained_run
    for name in (
        "config.json",
        "split.json",
        "history.csv",
        "best.keras",
        "last.keras",
        "curves.png",
        "state.json",
        "summary.json",
    ):
        assert (out / name).is_file(), name
    history = read_history(out / "history.csv")
    assert [int(row["epoch"]) for row in history] == list(range(6))
    assert summary["epochs_run"] == 6
    assert summary["train_images"] + summary["val_images"] == 16
    assert json.loads((out / "config.json").read_text())["arch"] == "unet"


def test_training_lowers_the_loss(trained_run: tuple[Path, dict]) -> None:
    history = read_history(trained_run[0] / "history.csv")
    assert history[-1]["loss"] < 0.8 * history[0]["loss"]


def test_split_is_seeded_and_saved(trained_run: tuple[Path, dict]) -> None:
    from training.data import load_samples
    from training.split import load_split, split_samples

    out = trained_run[0]
    train_samples, val_samples = load_split(out / "split.json")
    config = TrainConfig.load(out / "config.json")
    _, again_val = split_samples(
        load_samples([Path(p) for p in config.data]), config.val_fraction, config.seed
    )
    assert [s.id for s in val_samples] == [s.id for s in again_val]
    assert {s.id for s in train_samples}.isdisjoint({s.id for s in val_samples})


def test_resume_continues_where_it_stopped(dataset: Path, tmp_path: Path) -> None:
    from training.train import train

    out = tmp_path / "run"
    cfg = tiny_config(dataset, out, arch="unet", unet_base_filters=4, epochs=1)
    train(cfg)
    first = read_history(out / "history.csv")
    assert len(first) == 1
    summary = train(None, resume=out, epochs=3)
    history = read_history(out / "history.csv")
    assert [int(row["epoch"]) for row in history] == [0, 1, 2]
    assert history[0] == first[0]  # the first epoch was kept, not retrained
    assert summary["epochs_run"] == 3
    assert json.loads((out / "state.json").read_text())["epoch"] == 2


def test_steps_per_epoch_wraps_around_the_data(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recwarn: pytest.WarningsRecorder
) -> None:
    """More steps per epoch than the data has batches repeat the data; no epoch is cut short (issue 12)."""
    import training.train
    from training.callbacks import Throughput
    from training.train import train

    epochs_seen: list[tuple[int, float]] = []

    class CountingThroughput(Throughput):
        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            super().on_epoch_begin(epoch, logs)
            self.steps_counted = 0

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            super().on_train_batch_end(batch, logs)
            self.steps_counted += 1

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            super().on_epoch_end(epoch, logs)
            assert logs is not None
            # The images the rate was computed from: rate × the seconds it was measured over.
            epochs_seen.append((self.steps_counted, logs["images_per_second"] * self._train_seconds))

    monkeypatch.setattr(training.train, "Throughput", CountingThroughput)
    # 13 training images at batch 4 are 4 batches; 7 steps of 4 images each are 28: two passes and more.
    cfg = tiny_config(
        dataset, tmp_path / "wrap", arch="unet", unet_base_filters=4, epochs=3, steps_per_epoch=7
    )
    summary = train(cfg)

    assert summary["train_images"] == 13
    assert [steps for steps, _ in epochs_seen] == [7, 7, 7]
    assert [images for _, images in epochs_seen] == pytest.approx([28, 28, 28])
    assert not [warning for warning in recwarn if "ran out of data" in str(warning.message)]
    history = read_history(tmp_path / "wrap" / "history.csv")
    assert [int(row["epoch"]) for row in history] == [0, 1, 2]


def test_a_new_run_refuses_an_existing_run_directory(trained_run: tuple[Path, dict], dataset: Path) -> None:
    from training.data import DataError
    from training.train import train

    with pytest.raises(DataError, match="already holds a run"):
        train(tiny_config(dataset, trained_run[0]))


def test_resnet50v2_unet_trains_with_focal_loss_and_augmentation(dataset: Path, tmp_path: Path) -> None:
    from training.train import train

    cfg = tiny_config(dataset, tmp_path / "r50", epochs=1, steps_per_epoch=2, loss="focal", augment=True)
    summary = train(cfg)
    assert np.isfinite(summary["best_val_loss"])
    assert (tmp_path / "r50" / "best.keras").is_file()


def test_evaluate_end_to_end(trained_run: tuple[Path, dict], dataset: Path, tmp_path: Path) -> None:
    from training.evaluate import evaluate

    out = trained_run[0]
    metrics_path = tmp_path / "metrics.json"
    result = evaluate(out / "best.keras", [dataset], out=metrics_path, overlays=tmp_path / "overlays")
    written = json.loads(metrics_path.read_text())
    assert written["n_images"] == 16 == len(written["per_image"])
    assert written["threshold"] == 0.5
    for key in ("accuracy", "dice", "jaccard", "sensitivity", "specificity"):
        assert 0.0 <= written["mean"][key] <= 1.0
        assert 0.0 <= written["pooled"][key] <= 1.0
    assert 0.0 <= written["thresholded_jaccard"] <= written["mean"]["jaccard"] + 1e-9
    # The tiny U-Net, after a few epochs, has learned the dark ellipses well beyond calling every pixel
    # lesion (Dice = 2f / (1 + f) for a lesion fraction f).
    fractions = [
        (row["tp"] + row["fn"]) / (row["tp"] + row["fp"] + row["fn"] + row["tn"])
        for row in written["per_image"]
    ]
    all_lesion_dice = float(np.mean([2 * f / (1 + f) for f in fractions]))
    assert result["mean"]["dice"] > 1.5 * all_lesion_dice
    assert len(list((tmp_path / "overlays").glob("*.png"))) == 16

    only_val = evaluate(out / "best.keras", [], split=out / "split.json")
    assert only_val["n_images"] == len(json.loads((out / "split.json").read_text())["val"])


def test_cli_train_and_evaluate(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli-run"
    code = main(
        [
            "train",
            "--data",
            str(dataset),
            "--out",
            str(out),
            "--arch",
            "unet",
            "--unet-base-filters",
            "4",
            "--encoder-weights",
            "none",
            "--image-size",
            "64",
            "--batch-size",
            "4",
            "--epochs",
            "1",
            "--workers",
            "1",
            "--no-augment",
            "--loss",
            "bce",
        ]
    )
    assert code == 0
    assert json.loads((out / "config.json").read_text())["augment"] is False
    code = main(
        [
            "evaluate",
            "--model",
            str(out / "best.keras"),
            "--data",
            str(dataset),
            "--out",
            str(tmp_path / "m.json"),
        ]
    )
    assert code == 0
    assert "16 images: Dice" in capsys.readouterr().out


def test_cli_reports_bad_input_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    code = main(["train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2
    assert "dermaseg train: error:" in err and "Traceback" not in err

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", str(tmp_path / "missing")])
    assert exit_info.value.code == 2
    assert "no such folder" in capsys.readouterr().err

    code = main(
        ["train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "r2"), "--image-size", "50"]
    )
    assert code == 2
    assert "multiple of 32" in capsys.readouterr().err


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="arch"):
        TrainConfig(arch="vgg")
    with pytest.raises(ConfigError, match="validation fraction"):
        TrainConfig(val_fraction=1.5)
    defaults = TrainConfig()
    assert (defaults.image_size, defaults.batch_size, defaults.epochs) == (224, 16, 50)
    assert (defaults.learning_rate, defaults.lr_factor, defaults.lr_patience, defaults.min_lr) == (
        1e-4,
        0.2,
        5,
        1e-6,
    )
    assert defaults.early_stopping_patience == 10 and defaults.loss == "focal" and defaults.augment


def test_cli_help_does_not_import_tensorflow() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from training.cli import build_parser; build_parser(); "
        "print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


@pytest.mark.realdata
def test_trains_briefly_on_real_ph2_and_evaluates(shared_data: Path, tmp_path: Path) -> None:
    """A few epochs on 12 real PH2 photos (the normalized layout of ../shared/data), then `evaluate`."""
    from training.evaluate import evaluate
    from training.train import train

    out = tmp_path / "ph2-run"
    cfg = tiny_config(
        shared_data / "ph2",
        out,
        arch="unet",
        unet_base_filters=8,
        epochs=4,
        learning_rate=3e-3,
        loss="focal",
        max_images=12,
        val_fraction=0.25,
    )
    summary = train(cfg)
    history = read_history(out / "history.csv")
    assert len(history) == 4 and summary["train_images"] + summary["val_images"] == 12
    assert min(row["loss"] for row in history[1:]) < history[0]["loss"]

    split = json.loads((out / "split.json").read_text())
    result = evaluate(out / "best.keras", [], split=out / "split.json")
    assert result["n_images"] == len(split["val"]) == summary["val_images"]
    for name in ("accuracy", "dice", "jaccard", "sensitivity", "specificity"):
        assert 0.0 <= result["mean"][name] <= 1.0
    # PH2 masks are compared at their own size (long side 512 here), not the network's 64 px.
    first = result["per_image"][0]
    assert first["tp"] + first["fp"] + first["fn"] + first["tn"] > 64 * 64 * 10
