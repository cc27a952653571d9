"""Per-source sampling: which sample fills each slot of a fixed-length epoch when sources are weighted.

The sources of a combined training set differ in size (PH2 200, ISIC 2017 2,000, HAM10000 ~10,000 photos),
so one pass over all of them is mostly HAM10000. A :class:`SourceSampler` gives every epoch a fixed number
of items and each source a fixed share of them (equal shares for ``balanced``). Within a source the items
walk through passes over its samples, each pass in its own seeded order, so every sample of a source is
seen equally often; a small source is repeated, a large one spread over several epochs.

Everything depends on ``(seed, epoch)`` only, never on earlier epochs having run: a resumed run draws the
same items as an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from training.data import DataError


def allocate(total: int, weights: Mapping[str, float]) -> dict[str, int]:
    """Splits ``total`` items between names in proportion to their weights (largest remainder, ties by name).

    Raises:
        ValueError: no positive weight, or a negative one.
    """
    if any(weight < 0 for weight in weights.values()) or not any(weights.values()):
        raise ValueError(f"weights must be >= 0 with at least one positive, not {dict(weights)}")
    scale = sum(weights.values())
    exact = {name: total * weight / scale for name, weight in weights.items()}
    counts = {name: math.floor(share) for name, share in exact.items()}
    by_remainder = sorted(weights, key=lambda name: (-(exact[name] - counts[name]), name))
    for name in by_remainder[: total - sum(counts.values())]:
        counts[name] += 1
    return counts


class SourceSampler:
    """The ``(position, pass)`` of every item of an epoch, each source taking its weighted share of the epoch.

    ``position`` indexes the samples as given; ``pass`` counts the passes over that sample's own source (it
    seeds the augmentation, so each pass over a source is augmented anew).
    """

    def __init__(
        self,
        sources: Sequence[str],
        weights: Mapping[str, float],
        items_per_epoch: int,
        seed: int,
        shuffle: bool = True,
    ) -> None:
        """Plans the epochs.

        Args:
            sources: the source (dataset name) of each sample, in the samples' order.
            weights: each source's weight; empty means every source weighs 1 (``balanced``). A source with
                weight 0 is never drawn.
            items_per_epoch: the epoch's length in samples (steps × batch size).
            seed: seeds each source's pass orders and each epoch's interleaving of the sources.
            shuffle: seeded orders (else every pass in sample order, the sources one after the other).

        Raises:
            DataError: a weight names no source of the data, or a source has no weight.
            ValueError: ``items_per_epoch`` below 1.
        """
        if items_per_epoch < 1:
            raise ValueError(f"items per epoch must be at least 1, not {items_per_epoch}")
        labels = np.asarray(sources, dtype=object)
        self.names = sorted(set(sources))
        weights = dict(weights) or {name: 1.0 for name in self.names}
        unknown = sorted(set(weights) - set(self.names))
        missing = sorted(set(self.names) - set(weights))
        if unknown or missing:
            raise DataError(
                f"source weights: the training sources are {', '.join(self.names)}"
                + (f"; no source is called {', '.join(unknown)}" if unknown else "")
                + (f"; no weight given for {', '.join(missing)}" if missing else "")
            )
        self.weights = {name: float(weights[name]) for name in self.names}
        self.positions = {name: np.flatnonzero(labels == name) for name in self.names}
        self.counts = allocate(items_per_epoch, self.weights)
        self.items_per_epoch = items_per_epoch
        self.seed = seed
        self.shuffle = shuffle

    def epoch_items(self, epoch: int) -> list[tuple[int, int]]:
        """The ``(position, pass)`` of each item of ``epoch`` (0-based), in the order they are batched."""
        slots = np.concatenate(
            [np.full(self.counts[name], index) for index, name in enumerate(self.names) if self.counts[name]]
        )
        if self.shuffle:
            slots = np.random.default_rng([self.seed, epoch, len(self.names)]).permutation(slots)
        else:
            slots = np.sort(slots, kind="stable")
        # Every epoch takes the same number of items of each source, so where this epoch starts in each
        # source's stream of passes follows from the epoch alone.
        cursors = {index: epoch * self.counts[name] for index, name in enumerate(self.names)}
        orders: dict[tuple[int, int], np.ndarray] = {}
        items = []
        for index in slots.tolist():
            positions = self.positions[self.names[index]]
            item = cursors[index]
            cursors[index] += 1
            data_pass, offset = divmod(item, len(positions))
            if (index, data_pass) not in orders:
                orders[index, data_pass] = self._order(index, data_pass, len(positions))
            items.append((int(positions[orders[index, data_pass][offset]]), data_pass))
        return items

    def _order(self, source_index: int, data_pass: int, count: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(count)
        return np.random.default_rng([self.seed, data_pass, 1_000 + source_index]).permutation(count)

    def describe(self) -> str:
        """One line for the log: each source's images per epoch and its size."""
        return ", ".join(
            f"{name} {self.counts[name]} per epoch of {len(self.positions[name])}" for name in self.names
        )
