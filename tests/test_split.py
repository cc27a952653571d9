"""The seeded, stratified split and its JSON file."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import make_dataset
from training.data import DataError, Sample, load_samples
from training.split import load_split, save_split, split_samples

# --- split --------------------------------------------------------------------------------------------------


def _fake_samples(diagnoses: list[str | None], dataset: str = "fake") -> list[Sample]:
    return [
        Sample(f"S{index:04d}", Path(f"/d/{index}.jpg"), Path(f"/d/{index}.png"), dataset, diagnosis)
        for index, diagnosis in enumerate(diagnoses)
    ]


def test_split_is_stratified_and_complete() -> None:
    samples = _fake_samples(["nevus"] * 50 + ["melanoma"] * 20 + ["keratosis"] * 10 + [None] * 20)

    train, val = split_samples(samples, val_fraction=0.2, seed=7)

    assert len(val) == 20 and len(train) == 80
    assert Counter(sample.diagnosis for sample in val) == {
        "nevus": 10,
        "melanoma": 4,
        "keratosis": 2,
        None: 4,
    }
    assert sorted(train + val, key=lambda sample: sample.id) == samples
    assert not {sample.id for sample in train} & {sample.id for sample in val}


def test_split_is_reproducible_and_independent_of_input_order() -> None:
    samples = _fake_samples(["nevus", "melanoma", "keratosis"] * 20)
    shuffled = list(samples)
    np.random.default_rng(0).shuffle(shuffled)

    first = split_samples(samples, 0.25, seed=3)

    assert split_samples(shuffled, 0.25, seed=3) == first
    assert split_samples(samples, 0.25, seed=4)[1] != first[1]


@pytest.mark.parametrize("total", [2, 3, 5, 7, 10, 23, 101])
@pytest.mark.parametrize("val_fraction", [0.01, 0.1, 0.2, 0.33, 0.5, 0.9, 0.99])
def test_split_counts(total: int, val_fraction: float) -> None:
    pattern = ["a", "a", "b", None, "c", "a", "b"]
    samples = _fake_samples([pattern[index % len(pattern)] for index in range(total)])

    train, val = split_samples(samples, val_fraction, seed=0)

    expected = min(max(math.floor(val_fraction * total + 0.5), 1), total - 1)
    assert len(val) == expected and len(train) == total - expected
    sizes = Counter(sample.diagnosis for sample in samples)
    for diagnosis, count in Counter(sample.diagnosis for sample in val).items():
        assert count <= sizes[diagnosis]
    if val_fraction * total >= 1 and (1 - val_fraction) * total >= 1:  # no clamping: within 1 of the share
        for diagnosis, size in sizes.items():
            in_val = sum(sample.diagnosis == diagnosis for sample in val)
            assert abs(in_val - val_fraction * size) < 1


def test_split_edge_cases() -> None:
    one = _fake_samples(["nevus"])
    assert split_samples(one, 0.2, seed=0) == (one, [])
    assert split_samples([], 0.2, seed=0) == ([], [])
    with pytest.raises(ValueError, match="between 0 and 1"):
        split_samples(one, 1.0, seed=0)


def test_split_file_round_trip(tmp_path: Path) -> None:
    samples = load_samples([make_dataset(tmp_path / "data", "normalized", n=5, size=32)])
    train, val = split_samples(samples, 0.4, seed=1)
    path = tmp_path / "split.json"

    save_split(path, train, val, seed=1, val_fraction=0.4)

    document = json.loads(path.read_text())
    assert (document["seed"], document["val_fraction"]) == (1, 0.4)
    assert set(document["train"][0]) >= {"id", "dataset", "image", "mask"}
    assert Path(document["val"][0]["image"]).is_absolute()
    assert load_split(path) == (train, val)


def test_load_split_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "split.json"
    with pytest.raises(DataError, match="cannot read the split"):
        load_split(path)
    path.write_text("{not json")
    with pytest.raises(DataError, match=r"split\.json: not a JSON split file"):
        load_split(path)
    path.write_text(json.dumps({"train": [{"id": "a"}], "val": []}))
    with pytest.raises(DataError, match=r"split\.json: not a split file"):
        load_split(path)


def test_split_of_samples_without_groups_is_pinned() -> None:
    """The split a seed gives is part of a run's reproduction: these ids were drawn before lesion grouping."""
    pattern = ["nevus", "melanoma", None, "nevus", "keratosis", "nevus", "melanoma"]
    one_source = [
        Sample(f"S{index:04d}", Path(f"/d/{index}.jpg"), Path(f"/d/{index}.png"), "fake", pattern[index % 7])
        for index in range(30)
    ]
    two_sources = [
        Sample(
            f"S{index:04d}",
            Path(f"/d/{index}.jpg"),
            Path(f"/d/{index}.png"),
            "ph2" if index % 3 else "isic2017",
            pattern[index % 7],
        )
        for index in range(40)
    ]

    assert [sample.id for sample in split_samples(one_source, 0.2, seed=42)[1]] == [
        "S0005", "S0009", "S0012", "S0018", "S0022", "S0027",
    ]  # fmt: skip
    assert [sample.id for sample in split_samples(two_sources, 0.25, seed=42)[1]] == [
        "S0012", "S0039", "S0007", "S0011", "S0017", "S0020", "S0022", "S0029", "S0031", "S0037",
    ]  # fmt: skip
