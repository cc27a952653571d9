"""``dermaseg predict``: segment photos with an ONNX model and write masks, probability maps and a summary.

Runs on ONNX Runtime through the service's own pipeline (`service.pipeline`), so it needs no
TensorFlow and gives exactly what ``POST /segment`` would.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

import training
from service.imaging import ImageDecodeError
from service.inference import ModelLoadError, OnnxModel, sha256_file
from service.pipeline import PhotoResult
from service.quality import QualityFileError, load_estimator

logger = logging.getLogger(__name__)

#: The shipped model, resolved from the repository (or installed package) root.
DEFAULT_MODEL = Path(training.__file__).resolve().parents[1] / "models" / "dermaseg.onnx"
#: Files picked up when a folder is given instead of photos.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


def predict_cli(args: argparse.Namespace) -> int:
    """Runs ``dermaseg predict`` from parsed arguments.

    For each photo writes ``OUT/<stem>_mask.png`` (0/255, the photo's size), ``OUT/<stem>_probability.png``
    (probability × 255, 8-bit) and one entry of ``OUT/predictions.json``. A photo that cannot be read is
    reported by name and skipped.

    Returns:
        0 when every photo was segmented, 1 when some could not be read.

    Raises:
        ModelLoadError: the model is missing or cannot be loaded.
    """
    model_path = Path(args.model) if getattr(args, "model", None) else DEFAULT_MODEL
    if not model_path.is_file():
        raise ModelLoadError(
            f"no model at {model_path}: pass --model FILE.onnx, or export one to {DEFAULT_MODEL} "
            "with `dermaseg export`"
        )
    model = OnnxModel(model_path, providers=getattr(args, "providers", None) or ("cpu",))
    # The outline-quality estimator beside the model, as the service loads it (None without one).
    try:
        quality = load_estimator(model_path, sha256_file(model_path), getattr(args, "quality", None))
    except QualityFileError as error:
        raise ModelLoadError(f"quality estimator: {error}") from None
    pipeline = model.pipeline(batch_size=1, quality=quality, review_below=getattr(args, "review_below", None))
    threshold = model.info.threshold if getattr(args, "threshold", None) is None else float(args.threshold)
    options = {
        "flip_tta": bool(getattr(args, "flip_tta", False)),
        "largest_component": bool(getattr(args, "largest_component", False)),
        "fill_holes": bool(getattr(args, "fill_holes", False)),
    }
    pixel_spacing = getattr(args, "pixel_spacing", None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    paths = list(_expand(Path(path) for path in args.images))
    entries: list[dict[str, Any]] = []
    failures: list[dict[str, str]] = []
    stems: set[str] = set()
    for path in tqdm(paths, desc="predict", unit="img", disable=None):
        try:
            result = pipeline.run(path, threshold, **options, mask=True, probability=True)
        except ImageDecodeError as error:
            failures.append({"file": str(path), "code": error.code, "error": error.message})
        except OSError as error:  # unreadable file: permissions, vanished, a folder …
            failures.append({"file": str(path), "code": "unreadable_file", "error": f"{path}: {error}"})
        else:
            stem = _unique_stem(path.stem, stems)
            _write_outputs(out, stem, result)
            entries.append(_entry(path, stem, result, pixel_spacing, model.providers))
            continue
        tqdm.write(f"skipped {failures[-1]['error']}", file=sys.stderr)

    summary = {
        "model": {
            "path": str(model_path),
            "name": model.info.name,
            "version": model.info.version,
            "input_size": list(model.info.input_size),
            "providers": model.providers,
        },
        "threshold": threshold,
        "postprocess": options,
        "pixel_spacing_mm": pixel_spacing,
        "images": entries,
        "failed": failures,
    }
    (out / "predictions.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    message = (
        f"{len(entries)} of {len(paths)} photos segmented with {model.info.name} {model.info.version} "
        f"({model.providers[0]}); written to {out}"
    )
    if failures:
        message += f"; {len(failures)} could not be read: {', '.join(f['file'] for f in failures)}"
    print(message)
    return 1 if failures else 0


def _expand(paths: Iterable[Path]) -> Iterable[Path]:
    """The photos given, a folder standing for the photos directly inside it."""
    for path in paths:
        if path.is_dir():
            photos = (p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            yield from sorted(photos)
        else:
            yield path


def _unique_stem(stem: str, taken: set[str]) -> str:
    """``stem``, or ``stem_2``, ``stem_3`` … when two photos share a name (from different folders)."""
    candidate, index = stem, 1
    while candidate in taken:
        index += 1
        candidate = f"{stem}_{index}"
    taken.add(candidate)
    return candidate


def _write_outputs(out: Path, stem: str, result: PhotoResult) -> None:
    assert result.encoded.mask_png is not None and result.encoded.probability_png is not None
    (out / f"{stem}_mask.png").write_bytes(result.encoded.mask_png)
    (out / f"{stem}_probability.png").write_bytes(result.encoded.probability_png)


def _entry(
    path: Path,
    stem: str,
    photo: PhotoResult,
    pixel_spacing: float | None,
    providers: Sequence[str],
) -> dict[str, Any]:
    result = photo.segmentation
    bbox = result.bbox
    return {
        "file": str(path),
        "mask": f"{stem}_mask.png",
        "probability": f"{stem}_probability.png",
        "size": {"width": photo.width, "height": photo.height},
        "found": result.found,
        "area_px": result.area_px,
        "area_fraction": round(result.area_fraction, 6),
        "area_mm2": result.area_mm2(pixel_spacing),
        "bbox": None if bbox is None else dict(zip(("x", "y", "width", "height"), bbox, strict=True)),
        "quality": None if result.quality is None else result.quality.as_dict(),
        "providers": list(providers),
    }
