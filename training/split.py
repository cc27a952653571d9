"""The seeded, stratified split of samples into training and validation, and its ``split.json`` file."""

from __future__ import annotations

import json
import logging
import math
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from training.data import DataError, Sample, sample_sort_key

logger = logging.getLogger(__name__)


def _diagnosis_order(diagnosis: str | None) -> tuple[bool, str]:
    """Sort key of the diagnosis strata: alphabetically, samples without a diagnosis last."""
    return (diagnosis is None, diagnosis or "")


def _round_half_up(value: float) -> int:
    return math.floor(value + 0.5)


def split_samples(
    samples: Sequence[Sample], val_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Splits samples into training and validation, stratified and (where samples carry one) grouped.

    **Without groups** (no sample has a :attr:`Sample.group`), each diagnosis (samples without one form their
    own stratum) contributes its share of the validation set. The total is ``round(val_fraction * N)`` (half
    up), shared between the strata by largest remainder, and kept between 1 and N - 1 so that both sides are
    non-empty when N >= 2. This is the split DermaSeg has always drawn: a seed still gives the same images.

    **With groups** (HAM10000's ``lesion_id``: several photos of one lesion), the units drawn are groups, so
    no group sits on both sides; a sample without a group is a group of its own. The strata are
    ``(dataset, diagnosis)`` pairs, a group belonging to its most common diagnosis, so that each source and
    each diagnosis within it keep their share. Each stratum's share of samples is found as above; its groups
    are drawn in a seeded order and each is taken while it fits that share, so a stratum falls short of it
    only when no group left is small enough.

    Either way the result depends only on the set of samples and the seed, not on the order they are given in.

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
    if any(sample.group for sample in ordered):
        return _split_grouped(ordered, val_fraction, seed)
    strata: dict[str | None, list[Sample]] = defaultdict(list)
    for sample in ordered:
        strata[sample.diagnosis].append(sample)
    names = sorted(strata, key=_diagnosis_order)
    counts = _validation_counts({name: len(strata[name]) for name in names}, val_fraction)

    generator = random.Random(seed)
    train: list[Sample] = []
    val: list[Sample] = []
    for name in names:
        group = list(strata[name])
        generator.shuffle(group)
        val.extend(group[: counts[name]])
        train.extend(group[counts[name] :])
    return sorted(train, key=sample_sort_key), sorted(val, key=sample_sort_key)


def trained_on(card: dict[str, Any]) -> Callable[[Sample], bool]:
    """Whether a model card's run trained on a sample: one of its datasets' photos, not a validation one."""
    data = card.get("training", {}).get("data", {})
    seen = set(data.get("datasets", []))
    validation = set(data.get("val_ids", []))
    return lambda sample: sample.dataset in seen and f"{sample.dataset}/{sample.id}" not in validation


def split_like_card(
    samples: Sequence[Sample], card: dict[str, Any], val_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Splits as :func:`split_samples` does, except that the photos a model card's run saw keep their side.

    A warm start begins with a model's weights, so the new run must not validate on the photos that model
    trained on. The card (``models/NAME.json``) names the datasets that run used and its validation photos:
    those validation photos stay in validation, that run's other photos of those datasets stay in training,
    and only the photos of other datasets are split, stratified and grouped as usual.

    Returns:
        ``(train, val)``, each sorted by dataset, id and image path.
    """
    data = card.get("training", {}).get("data", {})
    seen = set(data.get("datasets", []))
    if seen and not data.get("val_ids"):
        raise DataError(
            "the model card lists no validation photos (training.data.val_ids): cannot split like it"
        )
    trained = trained_on(card)
    kept_train = [s for s in samples if trained(s)]
    kept_val = [s for s in samples if s.dataset in seen and not trained(s)]
    rest = [s for s in samples if s.dataset not in seen]
    train, val = split_samples(rest, val_fraction, seed) if rest else ([], [])
    return sorted(train + kept_train, key=sample_sort_key), sorted(val + kept_val, key=sample_sort_key)


def _validation_counts(sizes: dict[Any, int], val_fraction: float) -> dict[Any, int]:
    """How many samples of each stratum go to validation (``sizes`` in the strata's order).

    The total is ``round(val_fraction * N)`` (half up), kept between 1 and N - 1, and shared by largest
    remainder; ties go to the bigger stratum, then to the earlier one.
    """
    names = list(sizes)
    total = sum(sizes.values())
    target = min(max(_round_half_up(val_fraction * total), 1), total - 1)
    exact = {name: val_fraction * sizes[name] for name in names}
    counts = {name: math.floor(exact[name]) for name in names}
    by_remainder = sorted(
        names, key=lambda name: (-(exact[name] - counts[name]), -sizes[name], names.index(name))
    )
    shortfall = target - sum(counts.values())
    for name in by_remainder:
        if shortfall <= 0:
            break
        if counts[name] < sizes[name]:
            counts[name] += 1
            shortfall -= 1
    for name in reversed(by_remainder):  # only when the target was raised or lowered to keep both sides
        if shortfall >= 0:
            break
        if counts[name] > 0:
            counts[name] -= 1
            shortfall += 1
    return counts


def _group_key(sample: Sample) -> tuple[str, ...]:
    """Samples with the same key go to the same side: one group per dataset, or the sample alone."""
    if sample.group:
        return (sample.dataset, "group", sample.group)
    return (sample.dataset, "sample", sample.id, str(sample.image_path))


def _split_grouped(
    ordered: list[Sample], val_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """The grouped split of :func:`split_samples`: whole groups, stratified by dataset and diagnosis."""
    groups: dict[tuple[str, ...], list[Sample]] = defaultdict(list)
    for sample in ordered:
        groups[_group_key(sample)].append(sample)
    if len(groups) < 2:
        logger.warning("all %d samples belong to one group: nothing can be held out", len(ordered))
        return ordered, []

    strata: dict[tuple[str, str | None], list[tuple[str, ...]]] = defaultdict(list)
    for key in sorted(groups):
        diagnoses = Counter(sample.diagnosis for sample in groups[key])
        diagnosis = min(diagnoses, key=lambda name: (-diagnoses[name], *_diagnosis_order(name)))
        strata[(key[0], diagnosis)].append(key)
    names = sorted(strata, key=lambda name: (name[0], *_diagnosis_order(name[1])))
    counts = _validation_counts(
        {name: sum(len(groups[key]) for key in strata[name]) for name in names}, val_fraction
    )

    generator = random.Random(seed)
    held_out: set[tuple[str, ...]] = set()
    drawn: list[tuple[str, ...]] = []
    for name in names:
        keys = list(strata[name])
        generator.shuffle(keys)
        drawn.extend(keys)
        taken = 0
        for key in keys:
            if taken + len(groups[key]) <= counts[name]:
                held_out.add(key)
                taken += len(groups[key])
    if not held_out:  # every group was larger than its stratum's share: hold out the smallest one drawn
        held_out.add(min(drawn, key=lambda key: len(groups[key])))

    train = [sample for key in groups if key not in held_out for sample in groups[key]]
    val = [sample for key in held_out for sample in groups[key]]
    return sorted(train, key=sample_sort_key), sorted(val, key=sample_sort_key)


def _sample_to_json(sample: Sample) -> dict[str, Any]:
    return {
        "id": sample.id,
        "dataset": sample.dataset,
        "image": str(sample.image_path.resolve()),
        "mask": str(sample.mask_path.resolve()),
        "diagnosis": sample.diagnosis,
        **({"group": sample.group} if sample.group else {}),
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
                    group=entry.get("group"),
                )
                for entry in document[side]
            ]
            for side in ("train", "val")
        )
    except (KeyError, TypeError, AttributeError) as error:
        raise DataError(f"{path}: not a split file: missing or malformed entry ({error!r})") from None
    return sides[0], sides[1]


def limit_samples(samples: Sequence[Sample], count: int, seed: int) -> list[Sample]:
    """At most ``count`` samples, for quick runs (``--max-images``).

    From one source, its first ``count`` in the sorted order, as always. From several, a seeded random
    sample of them all: the first ``count`` in sorted order would all come from the first source.

    Returns:
        The samples kept, sorted by dataset, id and image path.
    """
    ordered = sorted(samples, key=sample_sort_key)
    if count >= len(ordered):
        return ordered
    if len({sample.dataset for sample in ordered}) <= 1:
        return ordered[:count]
    return sorted(random.Random(seed).sample(ordered, count), key=sample_sort_key)
