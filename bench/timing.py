"""Repeating a call until enough samples are in, and the statistics of the samples (median, p95, p99).

Kept free of TensorFlow and ONNX Runtime, so that both the ONNX Runtime process and the Keras subprocess
time things the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Effort:
    """How hard each measurement tries: repetitions and time per measured cell.

    Attributes:
        warmup: untimed calls first (allocation, lazy set-up).
        min_runs / max_runs: timed calls, at least / at most.
        seconds: keep repeating (up to ``max_runs``) until this much time has been spent timing.
        http_requests: requests per concurrency level (at least ``2 × concurrency``).
        http_seconds: stop a concurrency level after this long, however many requests are done.
        validation_images: photos with expert masks for the variants' Dice.
        calibration_images: photos to calibrate an int8 variant on, when one has to be made.
    """

    warmup: int
    min_runs: int
    max_runs: int
    seconds: float
    http_requests: int
    http_seconds: float
    validation_images: int
    calibration_images: int


#: ``--quick``: every section runs, with few repetitions (for tests and smoke runs, not for figures).
QUICK = Effort(
    warmup=1,
    min_runs=3,
    max_runs=5,
    seconds=0.2,
    http_requests=4,
    http_seconds=20.0,
    validation_images=4,
    calibration_images=4,
)
#: The default: enough repetitions for a p95 (and a p99 where calls are fast enough to reach 100 runs).
FULL = Effort(
    warmup=3,
    min_runs=20,
    max_runs=300,
    seconds=12.0,
    http_requests=150,
    http_seconds=60.0,
    validation_images=32,
    calibration_images=64,
)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0–100) with linear interpolation; NaN for no values."""
    if not len(values):
        return float("nan")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


@dataclass
class Timing:
    """Samples of one measured operation, in milliseconds."""

    samples_ms: list[float] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.samples_ms)

    @property
    def p50(self) -> float:
        return percentile(self.samples_ms, 50)

    @property
    def p95(self) -> float:
        return percentile(self.samples_ms, 95)

    @property
    def p99(self) -> float:
        return percentile(self.samples_ms, 99)

    @property
    def mean(self) -> float:
        return float(np.mean(self.samples_ms)) if self.samples_ms else float("nan")

    def summary(self) -> dict[str, Any]:
        """n, p50, p95, p99 and mean (ms), for the JSON results."""
        return {"n": self.n, "p50": self.p50, "p95": self.p95, "p99": self.p99, "mean": self.mean}


def measure(call: Callable[[], Any], effort: Effort) -> Timing:
    """Calls ``call`` ``effort.warmup`` times untimed, then times it as ``effort`` says.

    Stops after ``max_runs`` calls, or once at least ``min_runs`` calls have taken ``seconds`` together.
    """
    for _ in range(effort.warmup):
        call()
    timing = Timing()
    spent = 0.0
    while timing.n < effort.max_runs and (timing.n < effort.min_runs or spent < effort.seconds):
        start = time.perf_counter()
        call()
        elapsed = time.perf_counter() - start
        spent += elapsed
        timing.samples_ms.append(elapsed * 1000.0)
    return timing
