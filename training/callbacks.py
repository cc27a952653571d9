"""Keras callbacks of a run: curve plots, throughput, EMA weights, and the state that `--resume` needs."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np

from training.model import load_network


def read_history(path: Path) -> list[dict[str, float]]:
    """Reads a run's ``history.csv`` (Keras CSVLogger) into a list of per-epoch dicts."""
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return [
            {key: float(value) for key, value in row.items() if value != ""} for row in csv.DictReader(handle)
        ]


def plot_curves(history: list[dict[str, float]], path: Path, title: str = "") -> None:
    """Writes loss and metric curves (training and validation) as a PNG, like the paper's Fig. 6."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [
        key for key in history[0] if not key.startswith("val_") and key not in ("epoch", "learning_rate")
    ]
    figure, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    epochs = [int(row["epoch"]) + 1 for row in history]
    for axis, metric in zip(axes[0], metrics, strict=True):
        axis.plot(epochs, [row.get(metric, np.nan) for row in history], label="training")
        axis.plot(epochs, [row.get("val_" + metric, np.nan) for row in history], label="validation")
        axis.set_title(metric)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
        axis.legend()
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


class CurvePlotter(keras.callbacks.Callback):
    """Redraws ``curves.png`` from ``history.csv`` after every epoch (CSVLogger must run first)."""

    def __init__(self, history_path: Path, plot_path: Path, title: str = "") -> None:
        super().__init__()
        self.history_path = history_path
        self.plot_path = plot_path
        self.title = title

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        history = read_history(self.history_path)
        if history:
            plot_curves(history, self.plot_path, self.title)


class Throughput(keras.callbacks.Callback):
    """Logs training images per second for each epoch (validation excluded) into ``logs``.

    The images are counted from the steps the epoch really ran (``batch_size`` each, at most
    ``images_per_epoch``), so an epoch that Keras cuts short does not report an inflated rate.
    """

    def __init__(self, images_per_epoch: int, batch_size: int | None = None) -> None:
        super().__init__()
        self.images_per_epoch = images_per_epoch
        self.batch_size = batch_size
        self._start = 0.0
        self._train_seconds = 0.0
        self._steps = 0

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._start = time.perf_counter()
        self._train_seconds = 0.0
        self._steps = 0

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._steps += 1

    def on_test_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._train_seconds = time.perf_counter() - self._start

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        seconds = self._train_seconds or (time.perf_counter() - self._start)
        images = self.images_per_epoch
        if self.batch_size is not None:
            images = min(self._steps * self.batch_size, images)
        if logs is not None:
            logs["images_per_second"] = images / max(seconds, 1e-9)


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


class ResumableState(keras.callbacks.Callback):
    """Saves and restores the counters of the schedule callbacks, so `--resume` continues exactly.

    Keras resets ReduceLROnPlateau, EarlyStopping and ModelCheckpoint at the start of ``fit``; this
    callback (placed after them) puts their counters back from ``state.json``, and EarlyStopping's best
    weights from the best checkpoint. ``reduce_lr`` is None where the learning rate follows a schedule.
    """

    def __init__(
        self,
        path: Path,
        best_checkpoint: Path,
        reduce_lr: keras.callbacks.ReduceLROnPlateau | None,
        early_stopping: keras.callbacks.EarlyStopping,
        checkpoint: keras.callbacks.ModelCheckpoint,
    ) -> None:
        super().__init__()
        self.path = path
        self.best_checkpoint = best_checkpoint
        self.reduce_lr = reduce_lr
        self.early_stopping = early_stopping
        self.checkpoint = checkpoint

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        if not self.path.is_file():
            return
        state = json.loads(self.path.read_text())
        if self.reduce_lr is not None and state.get("reduce_lr"):
            self.reduce_lr.best = state["reduce_lr"]["best"]
            self.reduce_lr.wait = state["reduce_lr"]["wait"]
            self.reduce_lr.cooldown_counter = state["reduce_lr"]["cooldown_counter"]
        self.early_stopping.best = state["early_stopping"]["best"]
        self.early_stopping.wait = state["early_stopping"]["wait"]
        self.early_stopping.best_epoch = state["early_stopping"]["best_epoch"]
        self.checkpoint.best = state["checkpoint_best"]
        if self.best_checkpoint.is_file():
            best = load_network(self.best_checkpoint)
            self.early_stopping.best_weights = best.get_weights()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        state = {
            "epoch": epoch,
            "reduce_lr": None
            if self.reduce_lr is None
            else {
                "best": _number(self.reduce_lr.best),
                "wait": int(self.reduce_lr.wait),
                "cooldown_counter": int(self.reduce_lr.cooldown_counter),
            },
            "early_stopping": {
                "best": _number(self.early_stopping.best),
                "wait": int(self.early_stopping.wait),
                "best_epoch": int(self.early_stopping.best_epoch),
            },
            "checkpoint_best": _number(self.checkpoint.best),
        }
        self.path.write_text(json.dumps(state, indent=2) + "\n")


class LearningRateLogger(keras.callbacks.Callback):
    """Writes the optimizer's current learning rate into ``logs`` (a schedule's value at this step).

    ReduceLROnPlateau logs the rate itself; a scheduled run has no such callback, so this one keeps the
    ``learning_rate`` column of ``history.csv``.
    """

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if logs is not None:
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))


def _ema_optimizer(optimizer: keras.optimizers.Optimizer, built: bool = True) -> keras.optimizers.Optimizer:
    inner = getattr(optimizer, "inner_optimizer", optimizer)  # LossScaleOptimizer under mixed_float16
    if not getattr(inner, "use_ema", False):
        raise ValueError("the model's optimizer keeps no moving average: compile it with use_ema=True")
    if built and not hasattr(inner, "_model_variables_moving_average"):
        raise ValueError("the optimizer has not been built yet: it holds no moving average to swap")
    return inner


def swap_ema_weights(model: keras.Model) -> None:
    """Exchanges the model's weights with its optimizer's moving average of them, in place.

    Keras 3 (3.15) keeps the average in the optimizer's private ``_model_variables_moving_average``, in the
    order of its ``_trainable_variables``, as its own ``keras.callbacks.SwapEMAWeights`` does.
    """
    optimizer = _ema_optimizer(model.optimizer)
    for variable, average in zip(
        optimizer._trainable_variables, optimizer._model_variables_moving_average, strict=True
    ):
        if average is None:
            continue
        current = keras.ops.convert_to_numpy(variable)
        variable.assign(average)
        average.assign(current)


class EmaWeights(keras.callbacks.Callback):
    """Validates and checkpoints the moving average of the weights that an optimizer with ``use_ema`` keeps.

    Keras copies the average into the model only when ``fit`` ends, so validation, ModelCheckpoint and
    EarlyStopping would otherwise all see the raw weights. This callback (placed before them) swaps the
    average in as validation begins, keeps it in through ``on_epoch_end`` (so ``val_loss``, ``best.keras``
    and ``last.keras`` are the average's) and swaps it out as the next epoch begins. A checkpoint saved so
    holds the average as the model's weights and the raw weights in the optimizer's average slots: call
    :func:`swap_ema_weights` once after loading one to continue training from it.

    When ``fit`` returns, the model in memory holds raw weights (Keras ends by copying the optimizer's
    slots, which then hold the raw ones, into the model): use the checkpoints.
    """

    def __init__(self) -> None:
        super().__init__()
        self.average_in_model = False

    def _put_average_in(self, wanted: bool) -> None:
        if self.average_in_model != wanted:
            swap_ema_weights(self.model)
            self.average_in_model = wanted

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        _ema_optimizer(self.model.optimizer, built=False)  # fail before the first epoch, not after it
        self.average_in_model = False

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._put_average_in(False)

    def on_test_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._put_average_in(True)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._put_average_in(True)
