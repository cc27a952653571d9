"""Per-source sampling: each source's share of an epoch, even use of its samples, seeded and resume-safe."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import make_dataset
from training.data import DataError, load_samples
from training.dataset import SegmentationDataset
from training.sampling import SourceSampler, allocate

# A small source (3 samples) and a large one (9), as PH2 and HAM10000 on a tiny scale.
SOURCES = ["small"] * 3 + ["large"] * 9


def test_allocate_is_proportional_with_largest_remainders() -> None:
    assert allocate(12, {"a": 1, "b": 1}) == {"a": 6, "b": 6}
    assert allocate(12, {"a": 1, "b": 3}) == {"a": 3, "b": 9}
    # 10 / 3 = 3.33 each: one item left over goes to the first name (equal remainders).
    assert allocate(10, {"a": 1, "b": 1, "c": 1}) == {"a": 4, "b": 3, "c": 3}
    assert allocate(7, {"a": 0, "b": 2}) == {"a": 0, "b": 7}
    with pytest.raises(ValueError):
        allocate(5, {"a": 0})


def test_balanced_gives_each_source_half_of_every_epoch_and_uses_its_samples_evenly() -> None:
    sampler = SourceSampler(SOURCES, {}, items_per_epoch=12, seed=0)
    for epoch in range(3):
        items = sampler.epoch_items(epoch)
        assert len(items) == 12
        sources = Counter(SOURCES[position] for position, _ in items)
        assert sources == {"small": 6, "large": 6}
        # The small source is gone through twice per epoch: each of its 3 samples exactly twice.
        small = Counter(position for position, _ in items if SOURCES[position] == "small")
        assert sorted(small.values()) == [2, 2, 2]
    # The large source's 6 per epoch walk through its 9 samples: over 3 epochs (18 items) each twice.
    large = Counter(
        position
        for epoch in range(3)
        for position, _ in sampler.epoch_items(epoch)
        if SOURCES[position] == "large"
    )
    assert sorted(large.values()) == [2] * 9


def test_given_weights_set_the_shares() -> None:
    sampler = SourceSampler(SOURCES, {"small": 1.0, "large": 3.0}, items_per_epoch=16, seed=1)
    assert Counter(SOURCES[position] for position, _ in sampler.epoch_items(0)) == {"small": 4, "large": 12}
    only_large = SourceSampler(SOURCES, {"small": 0.0, "large": 1.0}, items_per_epoch=8, seed=1)
    assert {SOURCES[position] for position, _ in only_large.epoch_items(2)} == {"large"}


def test_passes_are_counted_per_source() -> None:
    sampler = SourceSampler(SOURCES, {}, items_per_epoch=12, seed=0)
    passes = {(SOURCES[position], data_pass) for position, data_pass in sampler.epoch_items(1)}
    # Epoch 1 holds the small source's items 6–11 (passes 2 and 3) and the large one's 6–11 (passes 0, 1).
    assert {data_pass for source, data_pass in passes if source == "small"} == {2, 3}
    assert {data_pass for source, data_pass in passes if source == "large"} == {0, 1}


def test_epochs_depend_on_seed_and_epoch_only() -> None:
    """A resumed run asks for epoch 5 first: it gets what an uninterrupted run got."""
    straight = SourceSampler(SOURCES, {}, items_per_epoch=12, seed=7)
    through = [straight.epoch_items(epoch) for epoch in range(6)]
    resumed = SourceSampler(SOURCES, {}, items_per_epoch=12, seed=7)
    assert resumed.epoch_items(5) == through[5]
    assert resumed.epoch_items(2) == through[2]
    assert through[0] != through[1]
    other_seed = SourceSampler(SOURCES, {}, items_per_epoch=12, seed=8)
    assert other_seed.epoch_items(0) != through[0]


def test_weights_must_name_the_sources() -> None:
    with pytest.raises(DataError, match="no source is called isic"):
        SourceSampler(SOURCES, {"small": 1, "large": 1, "isic": 1}, items_per_epoch=4, seed=0)
    with pytest.raises(DataError, match="no weight given for large"):
        SourceSampler(SOURCES, {"small": 1}, items_per_epoch=4, seed=0)


@pytest.fixture
def two_sources(tmp_path: Path):
    small = make_dataset(tmp_path / "small", "normalized", n=3, size=40, seed=0)
    large = make_dataset(tmp_path / "large", "normalized", n=9, size=40, seed=10)
    return load_samples([small, large])


def _dataset(samples, **options) -> SegmentationDataset:
    settings = {"augment": True, "seed": 4, "shuffle": True, "progress": False, "source_weights": {}}
    settings.update(options)
    return SegmentationDataset(samples, 32, 4, **settings)


def test_dataset_draws_balanced_batches_reproducibly(two_sources) -> None:
    dataset = _dataset(two_sources)
    assert len(dataset) == 3 and dataset.images_per_epoch == 12  # one pass's worth of full batches
    names = [sample.dataset for sample in dataset.samples]
    items = [item for index in range(len(dataset)) for item in dataset._batch_items(index)]
    assert Counter(names[position] for position, _ in items) == {"small": 6, "large": 6}

    again = _dataset(two_sources)
    for epoch in (0, 2):
        dataset.set_epoch(epoch)
        again.set_epoch(epoch)
        for index in range(len(dataset)):
            x, y = dataset[index]
            x_again, y_again = again[index]
            assert x.shape == (4, 32, 32, 3) and y.shape == (4, 32, 32, 1)
            np.testing.assert_array_equal(x, x_again)
            np.testing.assert_array_equal(y, y_again)
    dataset.set_epoch(0)
    first = dataset[0][0]
    dataset.set_epoch(1)
    assert not np.array_equal(first, dataset[0][0])


def test_dataset_with_steps_and_without_weights(two_sources) -> None:
    longer = _dataset(two_sources, steps_per_epoch=5)
    assert len(longer) == 5 and len(longer._batch_items(4)) == 4
    with pytest.raises(DataError, match="no weight given"):
        _dataset(two_sources, source_weights={"small": 1.0})
    unweighted = _dataset(two_sources, source_weights=None)
    assert unweighted.sampler is None and len(unweighted) == 3
