"""``python -m bench``: runs every section on one photo and writes docs/performance.md.

Sections (``--skip`` leaves any out): ``raw`` (ONNX Runtime session, batch 1/4/8/16), ``pipeline`` (the
service's steps without HTTP on the benchmark's photo and the large ones, release 1.0.0's code against the
served), ``http`` (the service over loopback at several concurrencies, with its memory), ``variants``
(float32 / float16 / int8), ``flops`` (work per image against the CPU's peak), ``keras`` (the same network
in Keras, in a subprocess) and ``decode-check`` (the reduced JPEG decode's masks against the full
decode's). TensorFlow is never imported into this process; the run fails rather than time ONNX Runtime
beside it.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.decode_check import DEFAULT_ROOTS, bench_decode_check
from bench.flops import count_flops
from bench.http_load import HttpResult, ServiceConfig, bench_http
from bench.inputs import DEFAULT_VALIDATION_ROOT, LARGE_PHOTOS, load_labelled_photos, load_photo, load_photos
from bench.keras_compare import Architecture, run_keras_comparison
from bench.machine import describe_machine, estimate_peak, measure_gemm_gflops, read_load
from bench.pipeline import bench_pipeline
from bench.raw import SessionSetting, bench_raw, time_session
from bench.report import render, write_json
from bench.results import BenchResults, ModelDescription
from bench.timing import FULL, QUICK
from bench.variants import bench_variants, model_precision
from service.inference import ModelLoadError, OnnxModel, sha256_file
from service.pipeline import preprocess

logger = logging.getLogger("bench")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO_ROOT / "models" / "dermaseg.onnx"
DEFAULT_CHECKPOINT = REPO_ROOT / "runs" / "release" / "best.keras"
DEFAULT_OUT = REPO_ROOT / "docs" / "performance.md"
SECTIONS = ("raw", "pipeline", "http", "variants", "flops", "keras", "decode-check")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, not {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative integers, not {text!r}")
    return values


def _path_list(text: str) -> list[Path]:
    return [] if text.strip().lower() == "none" else [Path(item) for item in text.split(",") if item.strip()]


def _spinning_list(text: str) -> list[bool | None]:
    choices = {"default": None, "on": True, "off": False}
    try:
        return [choices[item.strip()] for item in text.split(",") if item.strip()] or [None]
    except KeyError:
        raise argparse.ArgumentTypeError(f"spinning: choose from default, on, off, not {text!r}") from None


def _service_config(text: str) -> ServiceConfig:
    try:
        return ServiceConfig.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="DermaSeg performance benchmark: writes docs/performance.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="the ONNX model")
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="the .keras checkpoint for the Keras comparison (default: the one named in the model card, "
        f"else {DEFAULT_CHECKPOINT.relative_to(REPO_ROOT)}; 'none' or no match: a random-weight build)",
    )
    parser.add_argument("--quick", action="store_true", help="few repetitions: checks the run, not figures")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the Markdown report")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    parser.add_argument(
        "--photo", type=Path, default=None, help="default: ISIC_0009995.jpg of ../shared/data"
    )
    parser.add_argument(
        "--large-photos",
        type=_path_list,
        default=list(LARGE_PHOTOS),
        help="comma-separated photos the pipeline section measures besides --photo ('none': none); "
        "default: the 6 MP and 12 MP samples of ../shared/data",
    )
    parser.add_argument(
        "--decode-check-data",
        type=Path,
        action="append",
        default=None,
        help="dataset folders for the decode check, repeatable (default: ../shared/data/samples and ph2)",
    )
    parser.add_argument("--batches", type=_int_list, default=[1, 4, 8, 16], help="raw session batch sizes")
    parser.add_argument(
        "--threads",
        type=_int_list,
        default=[0],
        help="ONNX Runtime intra-op threads for the raw session, one measurement each (0: its default)",
    )
    parser.add_argument(
        "--spinning",
        type=_spinning_list,
        default=[None],
        help="ONNX Runtime thread spinning for the raw session: default, on, off (comma-separated; each "
        "combined with each --threads)",
    )
    parser.add_argument("--concurrency", type=_int_list, default=[1, 4, 8, 16], help="HTTP clients")
    parser.add_argument(
        "--service",
        type=_service_config,
        action="append",
        default=None,
        metavar="[NAME:]KEY=VALUE,...",
        help="a service configuration to load over HTTP, repeatable (DERMASEG_* settings such as "
        "max_concurrency=2,intra_op_threads=1, and workers=N for uvicorn workers); default: its defaults",
    )
    parser.add_argument(
        "--runs", type=int, default=None, help="timed calls per figure, at least (default: 3 quick, 20 full)"
    )
    parser.add_argument("--http-requests", type=int, default=None, help="requests per concurrency level")
    parser.add_argument("--http-seconds", type=float, default=None, help="time limit per concurrency level")
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="validation photos with masks for the variants' Dice (default: the checkpoint run's "
        f"split.json validation side, else {DEFAULT_VALIDATION_ROOT})",
    )
    parser.add_argument("--validation-images", type=int, default=None, help="photos for the Dice check")
    parser.add_argument("--keras-arch", default=None, help="random-weight build: architecture")
    parser.add_argument(
        "--keras-decoder-filters", type=_int_list, default=None, help="random-weight build: decoder widths"
    )
    parser.add_argument(
        "--keras-unet-base-filters", type=int, default=None, help="random-weight build: U-Net"
    )
    parser.add_argument("--keras-timeout", type=float, default=3600.0, help="seconds for the Keras process")
    parser.add_argument("--skip", action="append", choices=SECTIONS, default=[], help="leave a section out")
    parser.add_argument("--note", default=None, help="a line for the report (e.g. what else was running)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    return parser


def _default_checkpoint(card: dict) -> Path | None:
    named = (card.get("export") or {}).get("checkpoint")
    if named and Path(named).is_file():
        return Path(named)
    return DEFAULT_CHECKPOINT if DEFAULT_CHECKPOINT.is_file() else None


def _architecture(args: argparse.Namespace, card: dict) -> Architecture:
    base = Architecture.from_card(card, Architecture())
    return Architecture(
        arch=args.keras_arch or base.arch,
        decoder_filters=tuple(args.keras_decoder_filters or base.decoder_filters),
        unet_base_filters=args.keras_unet_base_filters or base.unet_base_filters,
    )


def _ensure_no_tensorflow() -> None:
    if "tensorflow" in sys.modules:
        raise RuntimeError(
            "TensorFlow is loaded in the process that times ONNX Runtime; the figures would be off"
        )


def run_benchmark(args: argparse.Namespace, workdir: Path) -> BenchResults:
    """Runs the sections not skipped; returns everything the report needs."""
    effort = QUICK if args.quick else FULL
    overrides = {
        "http_requests": args.http_requests,
        "http_seconds": args.http_seconds,
        "validation_images": args.validation_images,
    }
    if args.runs is not None:
        overrides["min_runs"] = args.runs
        overrides["max_runs"] = max(args.runs, effort.max_runs)
    effort = type(effort)(**{**effort.__dict__, **{k: v for k, v in overrides.items() if v is not None}})
    machine = describe_machine(args.argv)
    model_path = args.model.resolve()
    onnx_model = OnnxModel(model_path)
    info = onnx_model.info
    photo = load_photo(args.photo)
    results = BenchResults(
        machine=machine,
        model=ModelDescription(
            path=str(args.model),
            name=info.name,
            version=info.version,
            input_size=info.input_size,
            threshold=info.threshold,
            precision=model_precision(info),
            size_bytes=model_path.stat().st_size,
            sha256=sha256_file(model_path),
            providers=list(onnx_model.providers),
        ),
        photo=photo.description,
        effort=("quick" if args.quick else "full") + (f", at least {args.runs} runs" if args.runs else ""),
        peak=estimate_peak(machine),
        note=args.note,
    )
    del onnx_model
    skip = set(args.skip)
    _ensure_no_tensorflow()

    if "raw" not in skip:
        logger.info("raw session …")
        settings = [
            SessionSetting(threads, spinning) for threads in args.threads for spinning in args.spinning
        ]
        results.raw = bench_raw(model_path, photo.rgb, args.batches, settings, effort)
    if "pipeline" not in skip:
        logger.info("pipeline steps …")
        large, missing = load_photos(args.large_photos)
        results.pipeline = bench_pipeline(OnnxModel(model_path), [photo, *large], effort, missing)
    if "http" not in skip:
        for config in args.service or [ServiceConfig()]:
            logger.info("service over HTTP (%s) …", config.describe())
            if config.photo is not None and not config.photo.is_file():
                error = f"skipped: the photo {config.photo} was not found"
                results.http.append(HttpResult(config, photo=str(config.photo), error=error))
                continue
            own = load_photo(config.photo) if config.photo is not None else photo
            results.http.append(bench_http(model_path, own, args.concurrency, config, effort, workdir))
    if "flops" not in skip:
        results.flops = count_flops(model_path)
        size, repeats = (1024, 3) if args.quick else (2048, 5)
        for threads in sorted({1, machine.cpus}):
            results.gemm_gflops[threads] = measure_gemm_gflops(threads, machine.flags, size, repeats)
    card = info.card
    if args.checkpoint is None:
        checkpoint = _default_checkpoint(card)
    else:
        checkpoint = None if args.checkpoint.lower() == "none" else Path(args.checkpoint)
    if "variants" not in skip:
        logger.info("variants …")
        split = checkpoint.parent / "split.json" if checkpoint is not None else None
        photos = load_labelled_photos(
            split, args.data or DEFAULT_VALIDATION_ROOT, effort.validation_images, effort.calibration_images
        )
        results.variants = bench_variants(
            model_path, results.model.precision, photo.rgb, photos, effort, workdir
        )
    if "keras" not in skip:
        logger.info("Keras, in a subprocess …")
        keras = run_keras_comparison(
            model_path,
            preprocess(photo.rgb, info.input_size),
            args.batches,
            effort,
            workdir / "keras",
            checkpoint,
            _architecture(args, card),
            args.keras_timeout,
        )
        if keras.error is None:
            _ensure_no_tensorflow()
            same_file = Path(keras.onnx_path).resolve() == model_path
            default_threads = [r for r in results.raw if r.setting.is_default]
            if same_file and default_threads and [r.batch for r in default_threads] == list(args.batches):
                keras.onnx = {r.batch: r.timing for r in default_threads}
            else:
                pair = OnnxModel(keras.onnx_path)
                keras.onnx = dict(
                    zip(args.batches, time_session(pair, photo.rgb, args.batches, effort), strict=True)
                )
        results.keras = keras
    if "decode-check" not in skip:
        logger.info("decode check …")
        results.decode_check = bench_decode_check(model_path, args.decode_check_data or DEFAULT_ROOTS)
    results.skipped = sorted(skip)
    machine.load_end = read_load()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark and writes the report; 0 on success, 2 on a bad model or arguments."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    if not args.model.is_file():
        print(f"bench: model not found: {args.model} (export one, or give --model)", file=sys.stderr)
        return 2
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dermaseg-bench-") as scratch:
        try:
            results = run_benchmark(args, Path(scratch))
        except ModelLoadError as error:
            print(f"bench: {error}", file=sys.stderr)
            return 2
    results.duration_s = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(results), encoding="utf-8")
    if args.json is not None:
        write_json(results, args.json)
    print(f"wrote {args.out} ({results.duration_s:.0f} s{', quick' if args.quick else ''})")
    return 0
