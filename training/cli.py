"""The `dermaseg` console command.

Heavy libraries (TensorFlow, Keras, ONNX Runtime) are imported by each command when it runs, so
`dermaseg --help` and `dermaseg serve` never load TensorFlow.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path

from training.config import (
    ARCHITECTURES,
    LOSSES,
    OPTIMIZERS,
    PRECISIONS,
    SCHEDULES,
    ConfigError,
    TrainConfig,
    parse_source_weights,
)

logger = logging.getLogger("dermaseg")


class CommandError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, not {value}")
    return value


def _existing_dir(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"no such folder: {path}")
    return path


def _existing_path(text: str) -> Path:
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"no such file or folder: {path}")
    return path


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, not {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, not {value}")
    return value


def _source_weights(text: str) -> str:
    try:
        parse_source_weights(text)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


# --- train -----------------------------------------------------------------------------------------

#: The help text of each TrainConfig field, so the flags and config.json describe an option alike.
TRAIN_HELP = {option.name: option.metadata.get("help") for option in fields(TrainConfig)}


def _add_train(subparsers: argparse._SubParsersAction) -> None:
    defaults = TrainConfig()
    parser = subparsers.add_parser(
        "train",
        help="train a segmentation network",
        description="Train a ResNet50V2 U-Net (or the plain U-Net baseline). "
        "Defaults are the paper's Table 1.",
    )
    parser.add_argument("--data", action="append", type=_existing_dir, help="dataset folder (repeatable)")
    parser.add_argument("--out", type=Path, help="run directory (created)")
    parser.add_argument("--resume", type=_existing_dir, metavar="RUN_DIR", help="continue an interrupted run")
    parser.add_argument("--arch", choices=ARCHITECTURES, default=defaults.arch)
    parser.add_argument("--encoder-weights", default=defaults.encoder_weights, help="imagenet, none, or PATH")
    parser.add_argument(
        "--init-from",
        type=_existing_path,
        metavar="CHECKPOINT",
        help="warm start: the weights (not the optimizer state) of a .keras checkpoint of the same network",
    )
    parser.add_argument(
        "--split-like",
        type=_existing_path,
        metavar="CARD",
        help="a model card: its run's training photos stay in training and its validation photos in "
        "validation (use with --init-from that model's weights); other photos are split as usual",
    )
    parser.add_argument(
        "--decoder-filters",
        type=_positive_int,
        nargs=5,
        default=list(defaults.decoder_filters),
        metavar="W",
        help="decoder widths, deepest stage first",
    )
    parser.add_argument("--unet-base-filters", type=_positive_int, default=defaults.unet_base_filters)
    parser.add_argument("--dropout-rate", type=float, default=defaults.dropout_rate)
    parser.add_argument("--loss", choices=LOSSES, default=defaults.loss)
    parser.add_argument("--focal-alpha", type=float, default=defaults.focal_alpha)
    parser.add_argument("--focal-gamma", type=float, default=defaults.focal_gamma)
    parser.add_argument("--no-augment", dest="augment", action="store_false", help="switch augmentation off")
    parser.add_argument("--image-size", type=_positive_int, default=defaults.image_size)
    parser.add_argument("--batch-size", type=_positive_int, default=defaults.batch_size)
    parser.add_argument("--epochs", type=_positive_int, default=defaults.epochs)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--lr-factor", type=float, default=defaults.lr_factor)
    parser.add_argument("--lr-patience", type=_positive_int, default=defaults.lr_patience)
    parser.add_argument("--min-lr", type=float, default=defaults.min_lr)
    parser.add_argument(
        "--early-stopping-patience", type=_positive_int, default=defaults.early_stopping_patience
    )
    parser.add_argument("--val-fraction", type=float, default=defaults.val_fraction)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--precision", choices=PRECISIONS, default=defaults.precision)
    parser.add_argument("--workers", type=_positive_int, default=defaults.workers)
    parser.add_argument(
        "--steps-per-epoch",
        type=_positive_int,
        default=None,
        metavar="S",
        help="batches per epoch, wrapping around the data (default: one pass over it)",
    )
    parser.add_argument("--max-images", type=_positive_int, default=None, help=TRAIN_HELP["max_images"])
    _add_recipe_options(parser, defaults)
    parser.set_defaults(handler=_run_train)


def _add_recipe_options(parser: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    """The release-recipe options (issue 12); each default is the paper's recipe."""
    recipe = parser.add_argument_group("release-recipe options (defaults: the paper's recipe)")
    recipe.add_argument(
        "--region-weight", type=_non_negative_float, default=None, help=TRAIN_HELP["region_weight"]
    )
    recipe.add_argument(
        "--rotation-degrees",
        type=_non_negative_float,
        default=defaults.rotation_degrees,
        help=TRAIN_HELP["rotation_degrees"],
    )
    recipe.add_argument("--zoom", type=_non_negative_float, default=defaults.zoom, help=TRAIN_HELP["zoom"])
    recipe.add_argument("--photometric", action="store_true", help=TRAIN_HELP["photometric"])
    recipe.add_argument("--color-constancy", action="store_true", help=TRAIN_HELP["color_constancy"])
    recipe.add_argument(
        "--source-weights",
        type=_source_weights,
        default=defaults.source_weights,
        metavar="none|balanced|NAME=W,...",
        help=TRAIN_HELP["source_weights"],
    )
    recipe.add_argument(
        "--optimizer", choices=OPTIMIZERS, default=defaults.optimizer, help=TRAIN_HELP["optimizer"]
    )
    recipe.add_argument(
        "--weight-decay", type=_non_negative_float, default=None, help=TRAIN_HELP["weight_decay"]
    )
    recipe.add_argument(
        "--schedule", choices=SCHEDULES, default=defaults.schedule, help=TRAIN_HELP["schedule"]
    )
    recipe.add_argument(
        "--warmup-epochs",
        type=_non_negative_int,
        default=defaults.warmup_epochs,
        help=TRAIN_HELP["warmup_epochs"],
    )
    recipe.add_argument("--ema", action="store_true", help=TRAIN_HELP["ema"])
    recipe.add_argument(
        "--ema-momentum", type=float, default=defaults.ema_momentum, help=TRAIN_HELP["ema_momentum"]
    )


def _run_train(args: argparse.Namespace) -> int:
    from training.train import train

    if args.resume:
        result = train(None, resume=args.resume, epochs=args.epochs if "--epochs" in sys.argv else None)
    else:
        if not args.data:
            raise CommandError("train needs at least one --data folder (or --resume RUN_DIR)")
        if args.out is None:
            raise CommandError("train needs --out RUN_DIR")
        try:
            cfg = TrainConfig(
                data=[str(p) for p in args.data],
                out=str(args.out),
                arch=args.arch,
                encoder_weights=args.encoder_weights,
                init_from=str(args.init_from) if args.init_from else None,
                split_like=str(args.split_like) if args.split_like else None,
                decoder_filters=tuple(args.decoder_filters),
                unet_base_filters=args.unet_base_filters,
                dropout_rate=args.dropout_rate,
                loss=args.loss,
                focal_alpha=args.focal_alpha,
                focal_gamma=args.focal_gamma,
                augment=args.augment,
                image_size=args.image_size,
                batch_size=args.batch_size,
                epochs=args.epochs,
                learning_rate=args.learning_rate,
                lr_factor=args.lr_factor,
                lr_patience=args.lr_patience,
                min_lr=args.min_lr,
                early_stopping_patience=args.early_stopping_patience,
                val_fraction=args.val_fraction,
                seed=args.seed,
                precision=args.precision,
                workers=args.workers,
                steps_per_epoch=args.steps_per_epoch,
                max_images=args.max_images,
                region_weight=args.region_weight,
                rotation_degrees=args.rotation_degrees,
                zoom=args.zoom,
                photometric=args.photometric,
                color_constancy=args.color_constancy,
                source_weights=args.source_weights,
                optimizer=args.optimizer,
                weight_decay=args.weight_decay,
                schedule=args.schedule,
                warmup_epochs=args.warmup_epochs,
                ema=args.ema,
                ema_momentum=args.ema_momentum,
            )
        except ConfigError as error:
            raise CommandError(str(error)) from None
        result = train(cfg)
    print(f"best checkpoint: {result['best_checkpoint']} (val_loss {result['best_val_loss']:.4f})")
    return 0


# --- evaluate --------------------------------------------------------------------------------------


def _add_postprocess_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threshold", type=_probability, default=None, help="default: the model's own")
    parser.add_argument("--flip-tta", action="store_true", help="average with flipped predictions")
    parser.add_argument("--largest-component", action="store_true", help="keep the largest region only")
    parser.add_argument("--fill-holes", action="store_true", help="fill holes in the lesion")


def _add_evaluate(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="score a model against expert masks",
        description="Predict every image, bring the probabilities back to the image's own size and "
        "compare with its mask: accuracy, Dice, Jaccard, sensitivity, specificity (per-image mean and "
        "pooled) and the ISIC 2018 thresholded Jaccard.",
    )
    parser.add_argument(
        "--model", type=_existing_path, required=True, help="a .keras checkpoint or .onnx model"
    )
    parser.add_argument("--data", action="append", type=_existing_dir, required=True, help="dataset folder")
    parser.add_argument("--split", type=Path, help="split.json of a run: evaluate its validation images only")
    parser.add_argument("--out", type=Path, required=True, help="metrics.json to write")
    parser.add_argument("--overlays", type=Path, help="folder for image / truth / prediction figures")
    parser.add_argument("--batch-size", type=_positive_int, default=8)
    parser.add_argument("--providers", nargs="+", default=["cpu"], help="ONNX Runtime providers")
    parser.add_argument(
        "--card", type=_existing_path, help="also record the result in the model's card (NAME.json)"
    )
    parser.add_argument("--label", help="name of the result in the card (default: the options used)")
    _add_postprocess_options(parser)
    parser.set_defaults(handler=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from training.evaluate import evaluate, record_in_card

    if args.card is not None and args.model.suffix != ".onnx":
        raise CommandError("--card records results of an .onnx model in its card; this is a checkpoint")

    result = evaluate(
        args.model,
        args.data,
        out=args.out,
        split=args.split,
        threshold=args.threshold,
        overlays=args.overlays,
        batch_size=args.batch_size,
        providers=args.providers,
        flip_tta=args.flip_tta,
        largest_component=args.largest_component,
        fill_holes=args.fill_holes,
    )
    mean = result["mean"]
    print(
        f"{result['n_images']} images: Dice {mean['dice']:.4f}  Jaccard {mean['jaccard']:.4f}  "
        f"sensitivity {mean['sensitivity']:.4f}  specificity {mean['specificity']:.4f}  "
        f"accuracy {mean['accuracy']:.4f}  (per-image mean; written to {args.out})"
    )
    if args.card is not None:
        options = [name for name, used in result["postprocess"].items() if used]
        label = args.label or ("+".join(options) if options else "plain")
        record_in_card(args.card, args.model, result, label)
        print(f"recorded as {label!r} in {args.card}")
    return 0


# --- export ----------------------------------------------------------------------------------------


def _add_export(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="convert a Keras checkpoint to ONNX (tf2onnx), verify it and write its model card",
    )
    parser.add_argument("--checkpoint", type=_existing_path, required=True, help="RUN_DIR/best.keras")
    parser.add_argument("--out", type=Path, required=True, help="models/NAME.onnx")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset, 17 or 18")
    parser.add_argument(
        "--variants",
        nargs="*",
        default=[],
        choices=["float16", "int8"],
        help="also write these variants (NAME.fp16.onnx, NAME.int8.onnx; int8 needs --calibration-data)",
    )
    parser.add_argument(
        "--ship",
        choices=["float32", "float16", "int8"],
        default=None,
        help="which precision goes to --out (default float32; the others get .fp32/.fp16/.int8.onnx)",
    )
    parser.add_argument(
        "--calibration-data",
        action="append",
        type=_existing_dir,
        default=[],
        help="dataset folder for int8 calibration and the variants' Dice check",
    )
    parser.add_argument("--name", default=None, help="model name (default: the file's stem)")
    parser.add_argument("--version", default="0.1.0")
    parser.add_argument("--triton", type=Path, default=None, help="also write a Triton model repository here")
    parser.add_argument(
        "--threshold", type=_probability, default=0.5, help="lesion threshold stored in the model"
    )
    parser.add_argument(
        "--max-size-mib",
        type=float,
        default=64.0,
        help="refuse to write a shipped model larger than this (0: no limit)",
    )
    parser.set_defaults(handler=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from training.export import export_cli

    return export_cli(args)


# --- predict ---------------------------------------------------------------------------------------


def _add_predict(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("predict", help="segment photos with an ONNX model and write masks")
    parser.add_argument("images", nargs="+", type=_existing_path, help="photos (JPEG, PNG, BMP, TIFF)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--model", type=_existing_path, default=None, help="default: the shipped model")
    parser.add_argument("--providers", nargs="+", default=["cpu"])
    parser.add_argument("--pixel-spacing", type=float, default=None, help="mm per pixel, for areas in mm²")
    parser.add_argument(
        "--quality",
        type=_existing_path,
        default=None,
        help="the outline-quality estimator (default: NAME.quality.json beside the model, when there)",
    )
    parser.add_argument(
        "--review-below",
        type=float,
        default=None,
        help="flag photos whose estimated Jaccard is below this (default: the estimator's own)",
    )
    _add_postprocess_options(parser)
    parser.set_defaults(handler=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    from training.predict import predict_cli

    return predict_cli(args)


# --- calibrate-quality -----------------------------------------------------------------------------


def _add_calibrate_quality(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "calibrate-quality",
        help="fit the outline-quality estimator (estimated Jaccard, review flag) on unseen photos",
        description="Run the ONNX model over photos it never trained on, compute each mask's quality "
        "features and true Jaccard, fit the estimator and its review threshold on part of the lesions "
        "and report AUROC for failures, Spearman, MAE, flagged share and failures caught on the rest.",
    )
    parser.add_argument("--model", type=_existing_path, required=True, help="the .onnx model")
    parser.add_argument("--data", action="append", type=_existing_dir, help="dataset folder (repeatable)")
    parser.add_argument(
        "--card", type=_existing_path, help="the model's card: photos it lists as trained on are left out"
    )
    parser.add_argument("--out", type=Path, required=True, help="estimator file (models/NAME.quality.json)")
    parser.add_argument("--report", type=Path, required=True, help="evaluation report (JSON) to write")
    parser.add_argument("--rows", type=Path, help="also write per-photo features and Jaccards (CSV)")
    parser.add_argument("--from-rows", type=_existing_path, help="refit from such a CSV, without the network")
    parser.add_argument("--max-per-source", type=_positive_int, default=3000, help="photos per dataset")
    parser.add_argument("--test-fraction", type=_probability, default=0.5, help="lesions held out")
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument(
        "--flip-agreement", action="store_true", help="also measure a mirrored pass (not used by default)"
    )
    parser.add_argument("--batch-size", type=_positive_int, default=8)
    parser.set_defaults(handler=_run_calibrate_quality)


def _run_calibrate_quality(args: argparse.Namespace) -> int:
    from training.quality import calibrate_cli

    if not args.data and args.from_rows is None:
        raise CommandError("calibrate-quality needs --data folders (or --from-rows CSV)")
    return calibrate_cli(args)


# --- recover ---------------------------------------------------------------------------------------


def _add_recover(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "recover",
        help="rebuild a trainable .keras checkpoint from an exported ONNX model (for --init-from)",
        description="Read the weights back out of an ONNX export (its folded batch normalizations undone, "
        "their statistics measured on photos), check the result against ONNX Runtime, and save it.",
    )
    parser.add_argument("--model", type=_existing_path, required=True, help="the .onnx model")
    parser.add_argument("--card", type=_existing_path, required=True, help="its card (NAME.json)")
    parser.add_argument("--data", action="append", type=_existing_dir, required=True, help="photos' folder")
    parser.add_argument("--photos", type=_positive_int, default=48, help="photos to measure on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="checkpoint to write (.keras)")
    parser.set_defaults(handler=_run_recover)


def _run_recover(args: argparse.Namespace) -> int:
    import random

    from training.data import load_samples
    from training.recover import RecoverError, recover_checkpoint

    samples = load_samples(args.data, validate=False)
    chosen = random.Random(args.seed).sample(samples, min(args.photos, len(samples)))
    try:
        report = recover_checkpoint(args.model, args.card, args.out, [s.image_path for s in chosen])
    except RecoverError as error:
        raise CommandError(str(error)) from None
    print(json.dumps(report, indent=2))
    return 0


# --- serve -----------------------------------------------------------------------------------------


def _add_serve(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="run the HTTP service (uvicorn)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", type=_existing_path, default=None, help="default: the shipped model")
    parser.set_defaults(handler=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from service.main import serve

    serve(host=args.host, port=args.port, model=args.model)
    return 0


COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_train,
    _add_evaluate,
    _add_export,
    _add_predict,
    _add_calibrate_quality,
    _add_recover,
    _add_serve,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dermaseg", description="Skin-lesion segmentation: train, evaluate, export, predict and serve."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parses, runs, and turns expected failures into one-line messages."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s"
    )
    from service.imaging import ImageDecodeError
    from service.inference import ModelLoadError
    from training.data import DataError
    from training.export import ExportError

    try:
        return int(args.handler(args) or 0)
    except (CommandError, ConfigError, DataError, ModelLoadError, ImageDecodeError, ExportError) as error:
        print(f"dermaseg {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dermaseg {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
