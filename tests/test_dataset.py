"""SegmentationDataset: batch contract, reproducibility, shuffling, and use in ``keras.Model.fit``."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from service.imaging import decode_image, load_mask, resize_image, resize_mask
from tests.conftest import make_dataset
from training.data import DataError, Sample, load_samples
from training.dataset import EpochSync, SegmentationDataset

IMAGE_SIZE = 32


@pytest.fixture
def samples(tmp_path: Path) -> list[Sample]:
    """Seven non-square pairs (48 x 64), so that loading has to resize."""
    return load_samples([make_dataset(tmp_path / "data", "normalized", n=7, size=(48, 64), seed=0)])


def _dataset(samples: list[Sample], **options: object) -> SegmentationDataset:
    settings: dict[str, object] = {"augment": True, "seed": 0, "shuffle": True, "progress": False}
    settings.update(options)
    return SegmentationDataset(samples, IMAGE_SIZE, 3, **settings)  # type: ignore[arg-type]


def _epoch(dataset: SegmentationDataset) -> tuple[np.ndarray, np.ndarray]:
    batches = [dataset[index] for index in range(len(dataset))]
    return np.concatenate([x for x, _ in batches]), np.concatenate([y for _, y in batches])


def test_batches_have_the_documented_shapes_types_and_ranges(samples: list[Sample]) -> None:
    dataset = _dataset(samples)

    assert len(dataset) == 3  # ceil(7 / 3)
    for index, expected_size in enumerate([3, 3, 1]):
        x, y = dataset[index]
        assert x.shape == (expected_size, IMAGE_SIZE, IMAGE_SIZE, 3) and x.dtype == np.float32
        assert y.shape == (expected_size, IMAGE_SIZE, IMAGE_SIZE, 1) and y.dtype == np.float32
        assert x.min() >= 0.0 and x.max() <= 255.0 and x.max() > 1.0, "RGB 0-255, not normalized"
        assert set(np.unique(y)) <= {0.0, 1.0}
        assert y.sum(axis=(1, 2, 3)).min() > 0, "every synthetic lesion is visible"
        # The lesion is darker than the skin around it, after augmentation too.
        brightness = x.mean(axis=-1, keepdims=True)
        for image, mask in zip(brightness, y, strict=True):
            assert image[mask == 1].mean() < image[mask == 0].mean() - 50
    with pytest.raises(IndexError):
        dataset[3]


def test_without_augmentation_items_are_the_shared_resize_of_the_files(samples: list[Sample]) -> None:
    dataset = _dataset(samples, augment=False, shuffle=False)

    x, y = dataset[0]

    for row, sample in enumerate(samples[:3]):
        expected_image = resize_image(decode_image(sample.image_path), (IMAGE_SIZE, IMAGE_SIZE))
        expected_mask = resize_mask(load_mask(sample.mask_path), (IMAGE_SIZE, IMAGE_SIZE))
        np.testing.assert_array_equal(x[row], expected_image.astype(np.float32))
        np.testing.assert_array_equal(y[row, ..., 0], expected_mask.astype(np.float32))


def test_two_datasets_with_the_same_seed_give_the_same_batches(samples: list[Sample]) -> None:
    first, second, other = _dataset(samples), _dataset(samples), _dataset(samples, seed=1)

    for _ in range(2):
        x_first, y_first = _epoch(first)
        x_second, y_second = _epoch(second)
        np.testing.assert_array_equal(x_first, x_second)
        np.testing.assert_array_equal(y_first, y_second)
        assert not np.array_equal(x_first, _epoch(other)[0])
        for dataset in (first, second, other):
            dataset.on_epoch_end()


def test_batches_do_not_depend_on_the_order_they_are_asked_for(samples: list[Sample]) -> None:
    """Keras' workers fetch batches in any order: batch 2 must be batch 2 whatever came before."""
    forward, backward = _dataset(samples), _dataset(samples)

    forward_batches = [forward[index] for index in range(3)]
    backward_batches = [backward[index] for index in reversed(range(3))][::-1]

    for (x_forward, _), (x_backward, _) in zip(forward_batches, backward_batches, strict=True):
        np.testing.assert_array_equal(x_forward, x_backward)


def test_shuffle_reorders_every_epoch_and_no_shuffle_keeps_the_order(samples: list[Sample]) -> None:
    shuffled = _dataset(samples, augment=False, shuffle=True)
    ordered = _dataset(samples, augment=False, shuffle=False)
    reference, _ = _epoch(ordered)

    epochs = []
    for _ in range(3):
        epochs.append(_epoch(shuffled)[0])
        shuffled.on_epoch_end()
        ordered.on_epoch_end()
        np.testing.assert_array_equal(_epoch(ordered)[0], reference)

    assert shuffled.epoch == 3
    for x in epochs:  # each epoch holds every image once
        assert sorted(image.tobytes() for image in x) == sorted(image.tobytes() for image in reference)
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])


def test_fixed_length_epochs_wrap_around_the_data(samples: list[Sample]) -> None:
    """5 full batches of 3 per epoch from 7 images: epochs are windows on a stream of whole passes."""
    wrapping = _dataset(samples, augment=False, steps_per_epoch=5)
    one_pass, _ = _epoch(_dataset(samples, augment=False, shuffle=False))
    reference = sorted(image.tobytes() for image in one_pass)

    assert len(wrapping) == 5 and wrapping.images_per_epoch == 15
    stream = []
    for _ in range(7):  # 7 epochs of 15 images are 15 passes of 7
        x, _ = _epoch(wrapping)
        assert len(x) == 15, "every batch is full"
        stream.extend(image.tobytes() for image in x)
        wrapping.on_epoch_end()
    for start in range(0, len(stream), 7):
        assert sorted(stream[start : start + 7]) == reference, "each pass holds every image once"
    assert stream[:7] != stream[7:14], "each pass has its own order"

    resumed = _dataset(samples, augment=False, steps_per_epoch=5)
    resumed.set_epoch(3)
    assert [image.tobytes() for image in _epoch(resumed)[0]] == stream[45:60]
    with pytest.raises(ValueError, match="steps per epoch"):
        _dataset(samples, steps_per_epoch=0)


def test_fixed_length_epochs_augment_each_pass_anew(samples: list[Sample]) -> None:
    # 3 batches of 3 from 7 images, in a fixed order: the epoch's last two images start the next pass.
    dataset = _dataset(samples, shuffle=False, steps_per_epoch=3)
    x, _ = _epoch(dataset)
    np.testing.assert_array_equal(_dataset(samples, shuffle=False, steps_per_epoch=3)[2][0], x[6:])
    assert not np.array_equal(x[7:9], x[0:2]), "the same images, another pass: another augmentation"


def test_augmentation_changes_between_epochs_and_set_epoch_replays_one(samples: list[Sample]) -> None:
    dataset = _dataset(samples, shuffle=False)
    x_epoch0, _ = dataset[0]
    dataset.on_epoch_end()
    x_epoch1, _ = dataset[0]
    resumed = _dataset(samples, shuffle=False)
    resumed.set_epoch(1)

    assert not np.array_equal(x_epoch0, x_epoch1)
    np.testing.assert_array_equal(resumed[0][0], x_epoch1)


def test_unreadable_pair_names_the_file(samples: list[Sample], tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    mismatched = tmp_path / "small.png"
    keras.utils.save_img(mismatched, np.zeros((10, 10, 1)), scale=False)

    with pytest.raises(DataError, match=r"broken\.jpg: cannot read the image"):
        _dataset([Sample("x", broken, samples[0].mask_path, "test")])
    with pytest.raises(DataError, match=r"small\.png: mask is 10x10 but image"):
        _dataset([Sample("x", samples[0].image_path, mismatched, "test")])
    with pytest.raises(DataError, match="no samples"):
        _dataset([])


def _trivial_model() -> keras.Model:
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3), name="image")
    scaled = keras.layers.Rescaling(1.0 / 255.0)(inputs)
    outputs = keras.layers.Conv2D(1, 1, activation="sigmoid", name="probability")(scaled)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="adam", loss="binary_crossentropy")
    return model


class _EpochRecorder(keras.callbacks.Callback):
    def __init__(self, dataset: SegmentationDataset) -> None:
        super().__init__()
        self.dataset = dataset
        self.epochs: list[int] = []

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        self.epochs.append(self.dataset.epoch)


def test_trains_in_keras_fit_with_thread_workers(samples: list[Sample]) -> None:
    dataset = _dataset(samples, workers=2)

    history = _trivial_model().fit(dataset, epochs=1, shuffle=False, verbose=0)

    assert len(history.history["loss"]) == 1 and np.isfinite(history.history["loss"][0])
    assert dataset.epoch >= 1, "fit calls on_epoch_end"


@pytest.mark.parametrize("initial_epoch", [0, 1])
def test_epoch_sync_gives_keras_epochs_to_the_dataset(samples: list[Sample], initial_epoch: int) -> None:
    dataset = _dataset(samples)
    recorder = _EpochRecorder(dataset)

    _trivial_model().fit(
        dataset,
        epochs=2,
        initial_epoch=initial_epoch,
        shuffle=False,
        verbose=0,
        callbacks=[EpochSync(dataset), recorder],
    )

    assert recorder.epochs == [epoch for epoch in range(initial_epoch, 2) for _ in range(len(dataset))]
