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
from training.split import load_split, save_split, split_like_card, split_samples

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


# --- grouped by lesion ------------------------------------------------------------------------------------


def _grouped_samples() -> list[Sample]:
    """Two sources: ``ham`` with lesions of 1 to 4 photos (one diagnosis each), ``ph2`` without groups."""
    generator = np.random.default_rng(5)
    samples = []
    for lesion in range(60):
        diagnosis = ("nevus", "nevus", "melanoma", "keratosis")[lesion % 4]
        for photo in range(int(generator.integers(1, 5))):
            name = f"ISIC_{lesion:03d}{photo}"
            samples.append(
                Sample(
                    name,
                    Path(f"/ham/{name}.jpg"),
                    Path(f"/ham/{name}.png"),
                    "ham",
                    diagnosis,
                    f"L{lesion:03d}",
                )
            )
    for index in range(40):
        diagnosis = ("common nevus", "atypical nevus", "melanoma", "common nevus")[index % 4]
        name = f"IMD{index:03d}"
        samples.append(
            Sample(name, Path(f"/ph2/{name}.bmp"), Path(f"/ph2/{name}_lesion.bmp"), "ph2", diagnosis)
        )
    return samples


def test_grouped_split_keeps_every_lesion_on_one_side() -> None:
    samples = _grouped_samples()

    for seed in range(5):
        train, val = split_samples(samples, 0.2, seed=seed)

        assert sorted(train + val, key=lambda sample: (sample.dataset, sample.id)) == sorted(
            samples, key=lambda sample: (sample.dataset, sample.id)
        )
        assert not {s.group for s in train if s.group} & {s.group for s in val if s.group}
        assert {s.group for s in val if s.group}, "no lesion held out"


def test_grouped_split_keeps_each_source_and_diagnosis_share() -> None:
    samples = _grouped_samples()
    largest_group = max(Counter(sample.group for sample in samples if sample.group).values())

    _, val = split_samples(samples, 0.2, seed=1)

    strata = Counter((sample.dataset, sample.diagnosis) for sample in samples)
    held_out = Counter((sample.dataset, sample.diagnosis) for sample in val)
    for stratum, size in strata.items():
        # Whole lesions are drawn while they fit the share: short of it by less than one lesion.
        assert 0.2 * size - largest_group <= held_out[stratum] <= 0.2 * size + 1, stratum
    assert abs(len(val) - 0.2 * len(samples)) <= largest_group


def test_grouped_split_is_seeded_and_independent_of_input_order() -> None:
    samples = _grouped_samples()
    shuffled = list(samples)
    np.random.default_rng(0).shuffle(shuffled)

    first = split_samples(samples, 0.25, seed=3)

    assert split_samples(shuffled, 0.25, seed=3) == first
    assert split_samples(samples, 0.25, seed=4)[1] != first[1]


def test_grouped_split_edge_cases() -> None:
    def photos(group_sizes: list[int]) -> list[Sample]:
        return [
            Sample(
                f"P{group}{photo}",
                Path(f"/g/{group}{photo}.jpg"),
                Path(f"/g/{group}{photo}.png"),
                "g",
                None,
                f"G{group}",
            )
            for group, size in enumerate(group_sizes)
            for photo in range(size)
        ]

    one_lesion = photos([4])
    assert split_samples(one_lesion, 0.2, seed=0) == (sorted(one_lesion, key=lambda s: s.id), [])
    # Each lesion has more photos than the 20 % share: the smallest one is held out all the same.
    train, val = split_samples(photos([5, 3, 6]), 0.2, seed=0)
    assert {sample.group for sample in val} == {"G1"} and len(train) == 11


def test_grouped_split_from_a_manifest_with_lesion_ids(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ham", "normalized", n=12, size=32)
    manifest = root / "manifest.csv"
    lines = manifest.read_text().splitlines()
    # Photos 0-2 show one lesion, 3-4 another; the others a lesion each.
    lesions = ["HAM_A"] * 3 + ["HAM_B"] * 2 + [f"HAM_{index}" for index in range(5, 12)]
    manifest.write_text(
        "\n".join(
            [lines[0] + ",lesion_id"]
            + [f"{line},{lesion}" for line, lesion in zip(lines[1:], lesions, strict=True)]
        )
        + "\n"
    )
    samples = load_samples([root])
    assert [sample.group for sample in samples] == lesions

    for seed in range(10):
        train, val = split_samples(samples, 0.4, seed=seed)
        assert not {s.group for s in train} & {s.group for s in val}
        assert 3 <= len(val) <= 5

    path = tmp_path / "split.json"
    save_split(path, train, val, seed=9, val_fraction=0.4)
    assert load_split(path) == (train, val)
    assert json.loads(path.read_text())["val"][0]["group"].startswith("HAM_")


def test_samples_without_a_group_column_have_no_group(tmp_path: Path) -> None:
    samples = load_samples([make_dataset(tmp_path / "data", "normalized", n=3, size=32)])
    path = tmp_path / "split.json"
    save_split(path, samples[:2], samples[2:], seed=0, val_fraction=0.4)

    assert all(sample.group is None for sample in samples)
    assert "group" not in json.loads(path.read_text())["train"][0]  # split files as they were before groups


@pytest.mark.realdata
def test_ham10000_split_keeps_every_lesion_on_one_side(shared_data: Path) -> None:
    from training.data import discover

    samples = discover(shared_data / "ham10000")
    lesions = {sample.group for sample in samples}
    assert len(samples) == 10015 and len(lesions) == 7470

    train, val = split_samples(samples, 0.2, seed=42)

    assert not {sample.group for sample in train} & {sample.group for sample in val}
    assert abs(len(val) - 0.2 * len(samples)) < 20
    for diagnosis, size in Counter(sample.diagnosis for sample in samples).items():
        in_val = sum(sample.diagnosis == diagnosis for sample in val)
        assert abs(in_val - 0.2 * size) <= 6, diagnosis


# --- split like a model card (warm starts) ----------------------------------------------------------------


def test_split_like_a_card_keeps_what_its_model_saw_on_the_same_side() -> None:
    seen = _fake_samples(["nevus", "melanoma"] * 20, dataset="isic")
    new = _grouped_samples()
    card = {"training": {"data": {"datasets": ["isic"], "val_ids": ["isic/S0003", "isic/S0010"]}}}

    train, val = split_like_card(seen + new, card, 0.2, seed=0)

    assert {s.id for s in val if s.dataset == "isic"} == {"S0003", "S0010"}, (
        "its validation photos, no others"
    )
    assert len([s for s in train if s.dataset == "isic"]) == 38, (
        "everything else it trained on stays in training"
    )
    others_train, others_val = split_samples(new, 0.2, seed=0)
    assert [s for s in train if s.dataset != "isic"] == others_train, "the new photos split as usual"
    assert [s for s in val if s.dataset != "isic"] == others_val
    assert not {s.group for s in train if s.group} & {s.group for s in val if s.group}


def test_split_like_a_card_without_validation_photos_is_refused() -> None:
    card = {"training": {"data": {"datasets": ["isic"]}}}
    with pytest.raises(DataError, match="no validation photos"):
        split_like_card(_fake_samples(["nevus"] * 4, dataset="isic"), card, 0.2, seed=0)
