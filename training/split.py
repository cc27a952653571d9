"""The seeded, stratified split of samples into training and validation, and its ``split.json`` file."""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from training.data import DataError, Sample, sample_sort_key


def _round_half_up(value: float) -> int:
    return math.floor(value + 0.5)


def split_samples(
    samples: Sequence[Sample], val_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Splits samples into training and validation, stratified by diagnosis, reproducibly.

    Each diagnosis (samples without one form their own group) contributes its share of the validation set. The
    total is ``round(val_fraction * N)`` (half up), shared between the groups by largest remainder, and kept
    between 1 and N - 1 so that both sides are non-empty when N >= 2. The result depends only on the set of
    samples and the seed, not on the order they are given in.

    Args:
        samples: the samples to split.
        val_fraction: share held out for validation, strictly between 0 and 1.
        seed: the random seed.

    Returns:
        ``(train, val)``, each sorted by dataset, id and image path.

    Raises:
        ValueError: ``val_fraction`` is not strictly between 0 and 1.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1, not {val_fraction}")
    ordered = sorted(samples, key=sample_sort_key)
    total = len(ordered)
    if total < 2:
        return ordered, []
    strata: dict[str | None, list[Sample]] = defaultdict(list)
    for sample in ordered:
        strata[sample.diagnosis].append(sample)
    names = sorted(strata, key=lambda name: (name is None, name or ""))

    target = min(max(_round_half_up(val_fraction * total), 1), total - 1)
    exact = {name: val_fraction * len(strata[name]) for name in names}
    counts = {name: math.floor(exact[name]) for name in names}
    # Largest remainder first; ties go to the bigger group, then to the name order.
    by_remainder = sorted(
        names, key=lambda name: (-(exact[name] - counts[name]), -len(strata[name]), names.index(name))
    )
    shortfall = target - sum(counts.values())
    for name in by_remainder:
        if shortfall <= 0:
            break
        if counts[name] < len(strata[name]):
            counts[name] += 1
            shortfall -= 1
    for name in reversed(by_remainder):  # only when the target was raised or lowered to keep both sides
        if shortfall >= 0:
            break
        if counts[name] > 0:
            counts[name] -= 1
            shortfall += 1

    generator = random.Random(seed)
    train: list[Sample] = []
    val: list[Sample] = []
    for name in names:
        group = list(strata[name])
        generator.shuffle(group)
        val.extend(group[: counts[name]])
        train.extend(group[counts[name] :])
    return sorted(train, key=sample_sort_key), sorted(val, key=sample_sort_key)


def _sample_to_json(sample: Sample) -> dict[str, Any]:
    return {
        "id": sample.id,
        "dataset": sample.dataset,
        "image": str(sample.image_path.resolve()),
        "mask": str(sample.mask_path.resolve()),
        "diagnosis": sample.diagnosis,
    }


def save_split(
    path: Path, train: Sequence[Sample], val: Sequence[Sample], seed: int, val_fraction: float
) -> None:
    """Writes the split as JSON (absolute paths), so a run can be resumed or evaluated on the same images.

    Args:
        path: the ``split.json`` to write.
        train: the training samples.
        val: the validation samples.
        seed: the seed the split was made with.
        val_fraction: the validation share it was made with.
    """
    document = {
        "seed": seed,
        "val_fraction": val_fraction,
        "train": [_sample_to_json(sample) for sample in train],
        "val": [_sample_to_json(sample) for sample in val],
    }
    Path(path).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def load_split(path: Path) -> tuple[list[Sample], list[Sample]]:
    """Reads a split written by :func:`save_split`. The files it names are not checked here.

    Args:
        path: the ``split.json`` file.

    Returns:
        ``(train, val)`` in the order they were saved.

    Raises:
        DataError: the file is missing, not JSON, or lacks the expected keys.
    """
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise DataError(f"{path}: cannot read the split ({error.strerror or error})") from None
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not a JSON split file ({error})") from None
    try:
        sides = tuple(
            [
                Sample(
                    id=str(entry["id"]),
                    image_path=Path(entry["image"]),
                    mask_path=Path(entry["mask"]),
                    dataset=str(entry["dataset"]),
                    diagnosis=entry.get("diagnosis"),
                )
                for entry in document[side]
            ]
            for side in ("train", "val")
        )
    except (KeyError, TypeError, AttributeError) as error:
        raise DataError(f"{path}: not a split file: missing or malformed entry ({error!r})") from None
    return sides[0], sides[1]
