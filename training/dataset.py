"""Batches of photos and masks for Keras, held in memory at the network's input size, augmented on the fly.

Works on every Keras backend (a :class:`keras.utils.PyDataset`, no ``tf.data``). Batches are reproducible:
the order of an epoch depends on (seed, epoch) only, and the augmentation of a sample on (seed, epoch,
sample), whichever worker produces it. Give ``model.fit`` ``shuffle=False`` (the dataset shuffles its samples
itself; Keras' own shuffling would only reorder whole batches with Python's global random state) and an
:class:`EpochSync` callback, so that the dataset's epoch is Keras' epoch, also when a run resumes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import keras
import numpy as np
from tqdm import tqdm

from service.imaging import ImageDecodeError, decode_image, load_mask, resize_image, resize_mask
from training.augment import augment_pair, build_augmentation
from training.data import DataError, Sample
from training.sampling import SourceSampler


def load_pair(sample: Sample, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Decodes one pair and resizes it as training, evaluation and serving all do.

    Args:
        sample: the pair.
        image_size: side of the square output, pixels.

    Returns:
        uint8 ``(S, S, 3)`` RGB and bool ``(S, S)``.

    Raises:
        DataError: a file is missing or unreadable, or the mask is not the image's size.
    """
    try:
        image = decode_image(sample.image_path)
    except (ImageDecodeError, OSError) as error:
        raise DataError(f"{sample.image_path}: cannot read the image ({error})") from None
    try:
        mask = load_mask(sample.mask_path)
    except OSError as error:
        raise DataError(f"{sample.mask_path}: cannot read the mask ({error})") from None
    if mask.shape != image.shape[:2]:
        raise DataError(
            f"{sample.mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but image {sample.image_path} is "
            f"{image.shape[1]}x{image.shape[0]}"
        )
    size = (image_size, image_size)
    return resize_image(image, size), resize_mask(mask, size)


class SegmentationDataset(keras.utils.PyDataset):
    """Image/mask batches: ``x`` float32 ``(B, S, S, 3)`` RGB 0–255, ``y`` float32 ``(B, S, S, 1)`` 0/1.

    Every pair is decoded once, at construction, and kept resized to ``S x S`` (uint8 and bool: 150 kB per
    image at 224 px). ``x`` is not normalized: the network scales its input itself, as the ONNX model does.

    An epoch is one pass over the samples, its last batch possibly smaller; or, with ``steps_per_epoch``,
    that many full batches cut from an endless stream of passes (each pass its own order and augmentation),
    so that epochs of any length wrap around the data and together see every sample equally often.
    With ``source_weights``, each epoch is that many full batches (one pass's worth by default) whose items
    a :class:`training.sampling.SourceSampler` draws, each source taking its weighted share.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        image_size: int,
        batch_size: int,
        *,
        augment: bool,
        seed: int,
        shuffle: bool,
        workers: int = 1,
        use_multiprocessing: bool = False,
        max_queue_size: int = 10,
        progress: bool = True,
        steps_per_epoch: int | None = None,
        augmentation: Mapping[str, Any] | None = None,
        source_weights: Mapping[str, float] | None = None,
    ) -> None:
        """Loads every pair into memory.

        Args:
            samples: the pairs (from :func:`training.data.load_samples` or a split).
            image_size: side of the square network input, pixels.
            batch_size: images per batch.
            augment: apply :func:`training.augment.build_augmentation`'s random transform to every item.
            seed: seeds the order of each epoch and the augmentation.
            shuffle: a new sample order every epoch (else the given order, always).
            workers: Keras' batch workers; also the threads that decode the images at construction.
            use_multiprocessing: Keras' batch workers are processes, not threads.
            max_queue_size: batches Keras prepares ahead.
            progress: show a progress bar while loading.
            steps_per_epoch: batches per epoch, taken from the stream of passes (None: one pass per epoch).
                Give it here, not to ``model.fit``: Keras stops an epoch when a dataset runs out.
            augmentation: options of :func:`training.augment.build_augmentation` (default: the paper's).
            source_weights: sample the sources at these weights (``{}``: all equal; None: no per-source
                sampling, every sample once per pass); keys are the samples' ``dataset`` names.

        Raises:
            DataError: no samples, a pair cannot be read, or the source weights do not fit the sources.
            ValueError: ``image_size``, ``batch_size`` or ``steps_per_epoch`` below 1.
        """
        super().__init__(
            workers=workers, use_multiprocessing=use_multiprocessing, max_queue_size=max_queue_size
        )
        if image_size < 1 or batch_size < 1:
            raise ValueError(f"image size and batch size must be at least 1, not {image_size}, {batch_size}")
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise ValueError(f"steps per epoch must be at least 1, not {steps_per_epoch}")
        if not samples:
            raise DataError("no samples to make a dataset of")
        self.samples = list(samples)
        self.image_size = image_size
        self.batch_size = batch_size
        self.augment = augment
        self.seed = seed
        self.shuffle = shuffle
        self.augmentation = dict(augmentation or {})
        build_augmentation(**self.augmentation)  # bad options fail here, not in a worker
        self.sampler: SourceSampler | None = None
        if source_weights is not None:
            steps_per_epoch = steps_per_epoch or math.ceil(len(self.samples) / batch_size)
            self.sampler = SourceSampler(
                [sample.dataset for sample in self.samples],
                source_weights,
                steps_per_epoch * batch_size,
                seed,
                shuffle=shuffle,
            )
        self.steps_per_epoch = steps_per_epoch
        self.epoch = 0
        self._epoch_items: list[tuple[int, int]] = []
        self.images = np.empty((len(self.samples), image_size, image_size, 3), dtype=np.uint8)
        self.masks = np.empty((len(self.samples), image_size, image_size), dtype=bool)
        with ThreadPoolExecutor(max_workers=max(1, workers)) as executor:
            pairs = executor.map(lambda sample: load_pair(sample, image_size), self.samples)
            for position, (image, mask) in enumerate(
                tqdm(
                    pairs, total=len(self.samples), desc="loading images", unit="image", disable=not progress
                )
            ):
                self.images[position] = image
                self.masks[position] = mask
        self.set_epoch(0)

    def __len__(self) -> int:
        return self.steps_per_epoch or math.ceil(len(self.samples) / self.batch_size)

    @property
    def images_per_epoch(self) -> int:
        """Images one epoch feeds the network: the samples, or ``steps_per_epoch`` full batches."""
        return self.steps_per_epoch * self.batch_size if self.steps_per_epoch else len(self.samples)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} out of range for {len(self)} batches")
        items = self._batch_items(index)
        x = np.empty((len(items), self.image_size, self.image_size, 3), dtype=np.float32)
        y = np.empty((len(items), self.image_size, self.image_size, 1), dtype=np.float32)
        # One pipeline per batch: albumentations keeps per-call state, and batches run on several workers.
        transform = build_augmentation(**self.augmentation) if self.augment else None
        for row, (position, data_pass) in enumerate(items):
            image, mask = self.images[position], self.masks[position]
            if transform is not None:
                seed = self.item_seed(position, data_pass)
                image, mask = augment_pair(transform, image, mask, seed=seed)
            x[row] = image
            y[row, ..., 0] = mask
        return x, y

    def _batch_items(self, index: int) -> list[tuple[int, int]]:
        """``(position in samples, pass over the data)`` of each item of batch ``index`` of this epoch."""
        if self.sampler is not None:
            return self._epoch_items[index * self.batch_size : (index + 1) * self.batch_size]
        if self.steps_per_epoch is None:
            positions = self._order[index * self.batch_size : (index + 1) * self.batch_size]
            return [(int(position), self.epoch) for position in positions]
        # The epoch's batches are a window on the stream of passes, at the epoch's own place in it.
        start = (self.epoch * self.steps_per_epoch + index) * self.batch_size
        count = len(self.samples)
        orders: dict[int, np.ndarray] = {}
        items = []
        for item in range(start, start + self.batch_size):
            data_pass = item // count
            if data_pass not in orders:
                orders[data_pass] = self._order_for_epoch(data_pass)
            items.append((int(orders[data_pass][item % count]), data_pass))
        return items

    def item_seed(self, position: int, data_pass: int | None = None) -> int:
        """The augmentation seed of sample ``position`` (its index in ``samples``) in a pass over the data.

        A pass is an epoch unless ``steps_per_epoch`` is set (with source weights, a pass over the sample's
        own source); ``data_pass`` defaults to the current epoch.
        """
        data_pass = self.epoch if data_pass is None else data_pass
        return int(np.random.SeedSequence([self.seed, data_pass, position]).generate_state(1)[0])

    def set_epoch(self, epoch: int) -> None:
        """Puts the dataset at the start of ``epoch`` (0-based), e.g. when resuming a run."""
        self.epoch = epoch
        self._order = self._order_for_epoch(epoch)
        if self.sampler is not None:
            self._epoch_items = self.sampler.epoch_items(epoch)

    def on_epoch_end(self) -> None:
        """Advances to the next epoch: its own order (when shuffling) and its own augmentation."""
        self.set_epoch(self.epoch + 1)

    def _order_for_epoch(self, data_pass: int) -> np.ndarray:
        """The sample order of one pass over the data (an epoch unless ``steps_per_epoch`` is set)."""
        if not self.shuffle:
            return np.arange(len(self.samples))
        return np.random.default_rng([self.seed, data_pass]).permutation(len(self.samples))


class EpochSync(keras.callbacks.Callback):
    """Sets the dataset's epoch to Keras' epoch as each epoch begins.

    ``on_epoch_end`` alone counts calls, and Keras (3.15) calls it once more when ``fit`` starts, so without
    this callback Keras' epoch ``e`` gets the dataset's epoch ``e + 1``, and a run resumed at epoch ``k``
    would replay the augmentation of epoch 1 instead of continuing. With it, epoch ``e`` of a run always
    sees the same order and augmentation, whether the run was interrupted or not.
    """

    def __init__(self, dataset: SegmentationDataset) -> None:
        super().__init__()
        self.dataset = dataset

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.dataset.set_epoch(epoch)
