"""The model card (MONAI-bundle style): written into the ONNX file's metadata and beside it as JSON."""

from __future__ import annotations

import json
import logging
import platform
import subprocess
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from service.inference import INPUT_NAME, META_PREFIX, OUTPUT_NAME, sha256_file
from training.export.photos import Selection

logger = logging.getLogger(__name__)

INTENDED_USE = "research use, not for diagnosis"

#: The terms of the datasets DermaSeg trains on (../shared/data/SOURCES.md), by dataset name.
DATA_TERMS = {
    "ph2": "PH2: free for research and benchmarking only, no open licence (treat as non-commercial); "
    "cite Mendonça et al., EMBC 2013",
    "isic2017_train": "ISIC 2017 challenge data: listed by ISIC as CC-0; cite Codella et al., "
    "arXiv:1710.05006",
    "ham10000": "HAM10000 images and Tschandl et al.'s lesion masks: CC BY-NC 4.0 (non-commercial); cite "
    "Tschandl et al., Sci Data 2018",
}
#: Datasets whose terms forbid commercial use: a model trained on any of them inherits the restriction.
NON_COMMERCIAL = frozenset({"ph2", "ham10000"})


def data_terms(datasets: Sequence[str]) -> dict[str, str]:
    """The terms of each training dataset; one that DermaSeg does not know is said to be unknown."""
    return {
        name: DATA_TERMS.get(name, "unknown: check the dataset's terms before using this model")
        for name in datasets
    }


def intended_use(datasets: Sequence[str]) -> str:
    """:data:`INTENDED_USE`, narrowed to non-commercial use when a training dataset requires it."""
    restricted = sorted(NON_COMMERCIAL.intersection(datasets))
    if not restricted:
        return INTENDED_USE
    return f"{INTENDED_USE}; non-commercial only (trained on {', '.join(restricted)})"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        logger.warning("ignoring %s: %s", path, error)
        return None


def load_checkpoint_config(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "config.json"
    config = _read_json(path) if path.is_file() else None
    return config if isinstance(config, dict) else None


def describe_normalization(config: dict[str, Any] | None) -> str:
    config = config or {}
    inside = "x/255" if config.get("arch", "resnet50v2-unet") == "unet" else "x/127.5−1"
    if config.get("color_constancy"):
        inside = f"(Shades of Gray colour constancy first, then {inside})"
    return f"RGB 0–255 float32; the network rescales internally {inside}"


def _training_section(run_dir: Path) -> dict[str, Any]:
    """The run's configuration, data, split and summary, from the files beside the checkpoint."""
    config = load_checkpoint_config(run_dir)
    section: dict[str, Any] = {"run_dir": str(run_dir.resolve()), "config": config}
    data: dict[str, Any] = {"roots": (config or {}).get("data", [])}
    split_path = run_dir / "split.json"
    split = _read_json(split_path) if split_path.is_file() else None
    if (
        isinstance(split, dict)
        and isinstance(split.get("train"), list)
        and isinstance(split.get("val"), list)
    ):
        data.update(
            {
                "split_seed": split.get("seed"),
                "val_fraction": split.get("val_fraction"),
                "train_count": len(split["train"]),
                "val_count": len(split["val"]),
                "datasets": sorted({str(entry.get("dataset")) for entry in split["train"] + split["val"]}),
                "val_ids": [f"{entry.get('dataset')}/{entry.get('id')}" for entry in split["val"]],
            }
        )
    section["data"] = data
    summary_path = run_dir / "summary.json"
    summary = _read_json(summary_path) if summary_path.is_file() else None
    if isinstance(summary, dict):
        section["summary"] = {
            key: summary[key]
            for key in ("best_epoch", "best_val_loss", "best_val_metrics", "epochs")
            if key in summary
        }
    return section


def _evaluation_section(run_dir: Path) -> list[dict[str, Any]]:
    """Evaluation results beside the checkpoint (``eval_*.json``, ``metrics.json``), minus per-image rows."""
    results = []
    for path in [*sorted(run_dir.glob("eval_*.json")), run_dir / "metrics.json"]:
        document = _read_json(path) if path.is_file() else None
        if isinstance(document, dict):
            entry = {key: value for key, value in document.items() if key != "per_image"}
            entry["file"] = path.name
            entry.setdefault("data", None)
            entry.setdefault("date", None)
            results.append(entry)
    return results


def _git_commit() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit or "unknown"


def tool_versions() -> dict[str, str]:
    """Versions of the tools that made the model."""
    import keras
    import onnx
    import onnxruntime
    import tensorflow as tf
    import tf2onnx

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "tf2onnx": tf2onnx.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
    }


def build_card(
    *,
    name: str,
    version: str,
    input_size: tuple[int, int],
    threshold: float,
    checkpoint: Path,
    opset: int,
    converter: str,
    verification: dict[str, Any],
    normalization: str,
    samples: Selection,
    calibration_roots: Sequence[Path],
) -> dict[str, Any]:
    """The model card (MONAI-bundle style): what the model is, how it was made and measured, and for what."""
    height, width = input_size
    run_dir = checkpoint.parent
    training = _training_section(run_dir)
    datasets = training.get("data", {}).get("datasets", [])
    return {
        "name": name,
        "version": version,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "intended_use": intended_use(datasets),
        "data_terms": data_terms(datasets),
        "input": {
            "name": INPUT_NAME,
            "dtype": "float32",
            "shape": ["N", height, width, 3],
            "layout": "NHWC",
            "channels": "RGB",
            "range": [0, 255],
        },
        "output": {
            "name": OUTPUT_NAME,
            "dtype": "float32",
            "shape": ["N", height, width, 1],
            "layout": "NHWC",
            "meaning": "lesion probability",
            "range": [0, 1],
        },
        "input_size": f"{height}x{width}",
        "threshold": threshold,
        "normalization": normalization,
        "postprocess": "resize the probability back to the photo's size (bilinear), then threshold (≥)",
        "training": training,
        "evaluation": _evaluation_section(run_dir),
        "export": {
            "checkpoint": str(checkpoint.resolve()),
            "converter": converter,
            "opset": opset,
            "verification": verification,
            "photos": {
                "roots": [str(Path(root).resolve()) for root in calibration_roots],
                "calibration_count": len(samples.calibration),
                "evaluation_count": len(samples.evaluation),
                "evaluation_source": samples.source,
                "disjoint": samples.disjoint,
            },
            "git_commit": _git_commit(),
            "tools": tool_versions(),
            "host": platform.platform(),
        },
    }


def write_with_metadata(source: Path, target: Path, card: dict[str, Any], precision: str) -> None:
    """Copies an ONNX file, writing the contract's metadata_props and this file's card into it."""
    import onnx

    proto = onnx.load(str(source))
    file_card = {**card, "precision": precision}
    metadata = {
        "name": card["name"],
        "version": card["version"],
        "input_size": card["input_size"],
        "threshold": repr(float(card["threshold"])),
        "precision": precision,
        "card": json.dumps(file_card, ensure_ascii=False, separators=(",", ":")),
    }
    kept = [entry for entry in proto.metadata_props if not entry.key.startswith(META_PREFIX)]
    proto.ClearField("metadata_props")
    proto.metadata_props.extend(kept)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = META_PREFIX + key, value
    proto.producer_name = "dermaseg"
    proto.model_version = _integer_version(card["version"])
    proto.doc_string = (
        f"{card['name']} {card['version']} ({precision}): skin-lesion segmentation, {INTENDED_USE}"
    )
    onnx.save(proto, str(target))


def _integer_version(version: str) -> int:
    """ONNX's model_version is an integer: ``1.2.3`` → 1002003, anything else → 0."""
    parts = version.split(".")
    if len(parts) == 3 and all(part.isdigit() for part in parts):
        return int(parts[0]) * 1_000_000 + int(parts[1]) * 1_000 + int(parts[2])
    return 0


def build_sidecar(card: dict[str, Any], files: dict[str, Path]) -> dict[str, Any]:
    """The card as written beside the model: plus the sha256 of the shipped file and of each variant."""
    sidecar = json.loads(json.dumps(card))
    shipped = files[card["precision"]]
    sidecar["file"] = shipped.name
    sidecar["sha256"] = sha256_file(shipped)
    for precision, path in files.items():
        sidecar["variants"][precision]["sha256"] = sha256_file(path)
    return sidecar
