"""Training: `train(cfg) -> summary`, writing everything into one run directory.

A run directory holds ``config.json`` (the resolved configuration), ``split.json`` (the images of each
side), ``history.csv`` (one row per epoch), ``best.keras`` and ``last.keras``, ``state.json`` (what
``--resume`` needs), ``curves.png`` and ``summary.json``.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from training.callbacks import (
    CurvePlotter,
    EmaWeights,
    LearningRateLogger,
    ResumableState,
    Throughput,
    read_history,
    swap_ema_weights,
)
from training.config import ConfigError, TrainConfig, parse_source_weights
from training.data import DataError, load_samples
from training.dataset import EpochSync, SegmentationDataset
from training.losses import get_loss
from training.model import build_model, load_network
from training.precision import warn_if_emulated
from training.split import limit_samples, load_split, save_split, split_like_card, split_samples

logger = logging.getLogger(__name__)


def learning_rate_schedule(
    cfg: TrainConfig, steps_per_epoch: int | None
) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """The configured learning rate: a constant for ``plateau`` (the callback lowers it), else the schedule.

    ``cosine`` rises linearly from 0 to ``learning_rate`` over ``warmup_epochs``, then follows a cosine down
    to ``min_lr`` at the end of the last epoch; the steps are counted by the optimizer, so a resumed run
    continues the curve.
    """
    if cfg.schedule == "plateau":
        return cfg.learning_rate
    if steps_per_epoch is None:
        raise ValueError("a cosine schedule needs the number of steps per epoch")
    warmup_steps = cfg.warmup_epochs * steps_per_epoch
    decay_steps = cfg.epochs * steps_per_epoch - warmup_steps
    floor = min(cfg.min_lr / cfg.learning_rate, 1.0)
    if not warmup_steps:
        return keras.optimizers.schedules.CosineDecay(cfg.learning_rate, decay_steps, alpha=floor)
    return keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps, alpha=floor, warmup_target=cfg.learning_rate, warmup_steps=warmup_steps
    )


def build_optimizer(cfg: TrainConfig, steps_per_epoch: int | None = None) -> keras.optimizers.Optimizer:
    """Adam (the paper's) or AdamW, with the configured learning rate or schedule and, optionally, EMA."""
    options: dict[str, Any] = {"learning_rate": learning_rate_schedule(cfg, steps_per_epoch)}
    if cfg.ema:
        options.update(use_ema=True, ema_momentum=cfg.ema_momentum)
    if cfg.optimizer == "adamw":
        return keras.optimizers.AdamW(weight_decay=cfg.weight_decay, **options)
    return keras.optimizers.Adam(**options)


def compile_model(model: keras.Model, cfg: TrainConfig, steps_per_epoch: int | None = None) -> None:
    """The configured optimizer and loss, and pixel metrics for the curves."""
    model.compile(
        optimizer=build_optimizer(cfg, steps_per_epoch),
        loss=get_loss(
            cfg.loss, alpha=cfg.focal_alpha, gamma=cfg.focal_gamma, region_weight=cfg.region_weight
        ),
        metrics=[
            keras.metrics.BinaryAccuracy(name="accuracy"),
            keras.metrics.BinaryIoU(target_class_ids=[1], threshold=0.5, name="jaccard"),
            keras.metrics.Recall(name="sensitivity"),
        ],
    )


def warm_start(model: keras.Model, checkpoint: Path) -> None:
    """Copies the weights of a ``.keras`` checkpoint into ``model``; the optimizer state stays behind.

    The checkpoint must hold the same network: the same layers, by name, with weights of the same shapes.
    The input size may differ (the networks are fully convolutional), so a run at 256 px can start from
    one at 192 px.

    Raises:
        ConfigError: the checkpoint is missing, unreadable, or another network.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise ConfigError(f"init from: no such checkpoint: {checkpoint}")
    try:
        source = load_network(checkpoint)
    except Exception as error:  # Keras raises ValueError, OSError, TypeError … for unreadable files
        raise ConfigError(f"init from: cannot load {checkpoint}: {error}") from None
    wanted, found = _weight_shapes(model), _weight_shapes(source)
    if wanted != found:
        difference = next(
            (
                f"{here[0]} {here[1]} here, {there[0]} {there[1]} there"
                for here, there in zip(wanted, found, strict=False)
                if here != there
            ),
            f"{len(wanted)} layers with weights here, {len(found)} there",
        )
        raise ConfigError(
            f"init from: {checkpoint} holds another network than this run's (first difference: "
            f"{difference}); warm-start only from a checkpoint of the same --arch and widths"
        )
    model.set_weights(source.get_weights())
    logger.info("initialized the weights from %s (its optimizer state is not used)", checkpoint)


def _weight_shapes(model: keras.Model) -> list[tuple[str, list[tuple[int, ...]]]]:
    return [
        (layer.name, [tuple(int(size) for size in weight.shape) for weight in layer.weights])
        for layer in model.layers
        if layer.weights
    ]


def _prepare_run(
    cfg: TrainConfig | None, resume: Path | None, epochs: int | None
) -> tuple[TrainConfig, Path]:
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "config.json").is_file():
            raise DataError(f"{run_dir} is not a run directory (no config.json)")
        cfg = TrainConfig.load(run_dir / "config.json")
        if epochs is not None and epochs != cfg.epochs and cfg.schedule == "cosine":
            raise ConfigError(
                f"{run_dir} follows a cosine schedule over {cfg.epochs} epochs, fixed when it started: "
                "resume it without --epochs (or with the same number)"
            )
        if epochs is not None:
            cfg.epochs = epochs
            cfg.save(run_dir / "config.json")
        return cfg, run_dir
    if cfg is None:
        raise ValueError("train() needs a config or a run directory to resume")
    run_dir = Path(cfg.out)
    if (run_dir / "config.json").exists():
        raise DataError(f"{run_dir} already holds a run: choose another --out, or --resume {run_dir}")
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.json")
    return cfg, run_dir


def train(cfg: TrainConfig | None, resume: Path | None = None, epochs: int | None = None) -> dict[str, Any]:
    """Trains a network as ``cfg`` says (or continues the run in ``resume``); returns the run summary.

    Args:
        cfg: the configuration of a new run (ignored when resuming).
        resume: a run directory to continue from its last checkpoint.
        epochs: with ``resume``, a new total number of epochs.
    """
    if cfg is not None and resume is None and cfg.init_from and not Path(cfg.init_from).is_file():
        raise ConfigError(f"init from: no such checkpoint: {cfg.init_from}")  # before making the run
    cfg, run_dir = _prepare_run(cfg, resume, epochs)
    keras.utils.set_random_seed(cfg.seed)
    keras.mixed_precision.set_global_policy(cfg.precision)
    warn_if_emulated(cfg.precision, gpus=len(tf.config.list_physical_devices("GPU")))

    split_path = run_dir / "split.json"
    if split_path.is_file():
        train_samples, val_samples = load_split(split_path)
    else:
        samples = load_samples([Path(root) for root in cfg.data])
        if cfg.max_images is not None:
            samples = limit_samples(samples, cfg.max_images, cfg.seed)
        if cfg.split_like:
            card = json.loads(Path(cfg.split_like).read_text())
            train_samples, val_samples = split_like_card(samples, card, cfg.val_fraction, cfg.seed)
        else:
            train_samples, val_samples = split_samples(samples, cfg.val_fraction, cfg.seed)
        save_split(split_path, train_samples, val_samples, seed=cfg.seed, val_fraction=cfg.val_fraction)
    logger.info("training on %d images, validating on %d", len(train_samples), len(val_samples))

    train_data = SegmentationDataset(
        train_samples,
        cfg.image_size,
        cfg.batch_size,
        augment=cfg.augment,
        seed=cfg.seed,
        shuffle=True,
        workers=cfg.workers,
        steps_per_epoch=cfg.steps_per_epoch,  # wraps around the data: fit's own would cut epochs short
        augmentation={
            "rotation_degrees": cfg.rotation_degrees,
            "zoom": cfg.zoom,
            "photometric": cfg.photometric,
        },
        source_weights=parse_source_weights(cfg.source_weights),
    )
    if train_data.sampler is not None:
        logger.info("sampling the sources: %s", train_data.sampler.describe())
    val_data = SegmentationDataset(
        val_samples,
        cfg.image_size,
        cfg.batch_size,
        augment=False,
        seed=cfg.seed,
        shuffle=False,
        workers=cfg.workers,
    )

    last_path, best_path = run_dir / "last.keras", run_dir / "best.keras"
    history_path = run_dir / "history.csv"
    initial_epoch = len(read_history(history_path)) if last_path.is_file() else 0
    if initial_epoch:
        logger.info("resuming %s at epoch %d", run_dir, initial_epoch + 1)
        model = keras.models.load_model(last_path)
        if cfg.ema:
            swap_ema_weights(model)  # last.keras holds the average as weights, the raw weights in its slots
    else:
        history_path.unlink(missing_ok=True)
        (run_dir / "state.json").unlink(missing_ok=True)
        model = build_model(
            cfg.arch,
            input_size=(cfg.image_size, cfg.image_size),
            encoder_weights=cfg.encoder_weights,
            decoder_filters=cfg.decoder_filters,
            unet_base_filters=cfg.unet_base_filters,
            dropout_rate=cfg.dropout_rate,
            color_constancy=cfg.color_constancy,
        )
        if cfg.init_from:
            warm_start(model, Path(cfg.init_from))
        compile_model(model, cfg, steps_per_epoch=len(train_data))

    best_checkpoint = keras.callbacks.ModelCheckpoint(best_path, monitor="val_loss", save_best_only=True)
    reduce_lr = (
        keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss", factor=cfg.lr_factor, patience=cfg.lr_patience, min_lr=cfg.min_lr, verbose=1
        )
        if cfg.schedule == "plateau"
        else None
    )
    early_stopping = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=cfg.early_stopping_patience, restore_best_weights=True, verbose=1
    )
    callbacks = [
        EpochSync(train_data),
        Throughput(images_per_epoch=train_data.images_per_epoch, batch_size=cfg.batch_size),
        *([EmaWeights()] if cfg.ema else []),  # before the checkpoints: they save the average
        best_checkpoint,
        keras.callbacks.ModelCheckpoint(last_path),
        reduce_lr or LearningRateLogger(),
        early_stopping,
        ResumableState(run_dir / "state.json", best_path, reduce_lr, early_stopping, best_checkpoint),
        keras.callbacks.CSVLogger(history_path, append=True),
        CurvePlotter(history_path, run_dir / "curves.png", title=f"{cfg.arch}, {cfg.loss} loss"),
    ]
    started = time.perf_counter()
    if initial_epoch < cfg.epochs:
        model.fit(
            train_data,
            validation_data=val_data,
            epochs=cfg.epochs,
            initial_epoch=initial_epoch,
            callbacks=callbacks,
            shuffle=False,  # the dataset shuffles itself, seeded by epoch
            verbose=2,
        )
    seconds = time.perf_counter() - started

    history = read_history(history_path)
    best_row = min(history, key=lambda row: row.get("val_loss", float("inf"))) if history else {}
    summary = {
        "run_dir": str(run_dir),
        "epochs_run": len(history),
        "epochs_planned": cfg.epochs,
        "best_epoch": int(best_row.get("epoch", -1)) + 1,
        "best_val_loss": best_row.get("val_loss", float("nan")),
        "best_val_metrics": {k[4:]: v for k, v in best_row.items() if k.startswith("val_")},
        "best_checkpoint": str(best_path),
        "last_checkpoint": str(last_path),
        "train_images": len(train_samples),
        "val_images": len(val_samples),
        "seconds_this_session": round(seconds, 1),
        "median_images_per_second": _median(
            [row["images_per_second"] for row in history if "images_per_second" in row]
        ),
        "keras_backend": keras.backend.backend(),
        "keras_version": keras.__version__,
        "machine": platform.platform(),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
