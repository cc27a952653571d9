"""Section 1: the raw ONNX Runtime session (``service.inference.OnnxModel``) at several batch sizes.

The photo is resized to the network's input once and repeated to fill each batch, so the session sees
exactly what the service would feed it. Images per second at the best batch size is the service's ceiling.

Session settings can be compared in the same run: intra-op thread counts, and whether ONNX Runtime's
worker threads spin while waiting for work (``session.intra_op.allow_spinning``, on by default). Spinning
saves a wake-up per operator on an idle machine, and burns the cores other work needs on a busy one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from bench.timing import Effort, Timing, measure
from service.inference import OnnxModel
from service.pipeline import preprocess

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionSetting:
    """Intra-op threads (0: ONNX Runtime's choice) and thread spinning (None: ONNX Runtime's default)."""

    threads: int = 0
    spinning: bool | None = None

    @property
    def is_default(self) -> bool:
        return self.threads == 0 and self.spinning is None

    def describe(self) -> str:
        threads = "default" if self.threads == 0 else str(self.threads)
        spinning = "" if self.spinning is None else f", spinning {'on' if self.spinning else 'off'}"
        return threads + spinning


@dataclass
class RawResult:
    """One batch size at one session setting."""

    setting: SessionSetting
    batch: int
    timing: Timing

    @property
    def images_per_s(self) -> float:
        return self.batch / (self.timing.p50 / 1000.0)

    @property
    def ms_per_image(self) -> float:
        return self.timing.p50 / self.batch


def network_batch(rgb: np.ndarray, input_size: tuple[int, int], batch: int) -> np.ndarray:
    """The photo resized to the network's input, repeated ``batch`` times: float32 ``(batch, h, w, 3)``."""
    single = preprocess(rgb, input_size)
    return np.ascontiguousarray(np.repeat(single[np.newaxis], batch, axis=0))


def open_model(path: Path, setting: SessionSetting, providers: Sequence[str] = ("cpu",)) -> OnnxModel:
    """``OnnxModel`` with ``setting``'s threads and spinning."""
    return OnnxModel(path, providers, intra_op_threads=setting.threads, thread_spinning=setting.spinning)


def time_session(model: OnnxModel, rgb: np.ndarray, batches: Sequence[int], effort: Effort) -> list[Timing]:
    """Times ``model`` on the photo at each batch size (one warm-up per size: the arena grows to it)."""
    timings = []
    for batch_size in batches:
        batch = network_batch(rgb, model.info.input_size, batch_size)
        timing = measure(partial(model, batch), effort)
        logger.info("raw batch %d: p50 %.1f ms (n=%d)", batch_size, timing.p50, timing.n)
        timings.append(timing)
    return timings


def bench_raw(
    model_path: Path,
    rgb: np.ndarray,
    batches: Sequence[int],
    settings: Sequence[SessionSetting],
    effort: Effort,
) -> list[RawResult]:
    """Latency and images/s of a fresh session per setting, at each batch size."""
    results = []
    for setting in settings:
        logger.info("raw session, threads %s", setting.describe())
        model = open_model(model_path, setting)
        for batch_size, timing in zip(batches, time_session(model, rgb, batches, effort), strict=True):
            results.append(RawResult(setting, batch_size, timing))
        del model  # one session's arena at a time
    return results
