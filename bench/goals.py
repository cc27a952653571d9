"""Issue 13's goals, each a target beside what one benchmark run measured, and their table.

On the 1024×768 photo at concurrency 8 the service answers at least 80 % of the raw session's best
images/s with full JSON answers and 90 % with the mask alone; on the 6 MP photo at concurrency 1,
(end-to-end latency − inference) is at most 1.0 × the inference time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bench.http_load import HttpResult, LevelResult
from bench.markdown import number as _f
from bench.markdown import percent as _pct
from bench.markdown import table
from bench.results import BenchResults

#: Service throughput at concurrency 8 (1024×768 photo) against the raw session's best images/s.
THROUGHPUT_CONCURRENCY = 8
THROUGHPUT_TARGET = 0.80  # full JSON answers (mask and confidence map)
THROUGHPUT_TARGET_MASK_ONLY = 0.90  # ?outputs=mask
#: (end-to-end latency − inference) / inference at concurrency 1 on the 6 MP sample.
LARGE_PHOTO_NAME = "ISIC_0012099.jpg"
LARGE_PHOTO_CONCURRENCY = 1
LARGE_PHOTO_TARGET = 1.0


@dataclass(frozen=True)
class Goal:
    """A target and what was measured; ``higher_is_better`` says which side of the target passes (the
    target itself passes). ``unit``: "points" for a fraction (missed by percentage points), "times" for a
    multiple."""

    name: str
    target: float
    measured: float | None
    higher_is_better: bool
    detail: str
    unit: str = "points"

    @property
    def met(self) -> bool | None:
        if self.measured is None or math.isnan(self.measured):
            return None
        return self.measured >= self.target if self.higher_is_better else self.measured <= self.target

    @property
    def shown(self) -> str:
        """The measured value as the report shows it."""
        if self.unit == "times":
            return _f(self.measured, 2) + "×" if self.measured is not None else "–"
        return _pct(self.measured, 1)

    @property
    def verdict(self) -> str:
        if self.met is None:
            return "not measured"
        if self.met:
            return "**met**"
        assert self.measured is not None
        miss = abs(self.measured - self.target)
        if self.unit == "times":
            return f"**missed** by {miss:.2f}×"
        return f"**missed** by {miss * 100:.1f} points"


def level_at(http: HttpResult, concurrency: int) -> LevelResult | None:
    return next((level for level in http.levels if level.concurrency == concurrency and level.ok), None)


def beyond_inference(level: LevelResult) -> float | None:
    """(end-to-end latency − inference) / inference, p50s, at one level (None without inference)."""
    inference = level.step("inference").p50
    if not inference > 0:
        return None
    return (level.latency.p50 - inference) / inference


def _throughput_goal(results: BenchResults, http: HttpResult) -> Goal:
    best = results.best_raw()
    answers = "mask-only answers" if http.config.mask_only else "full JSON answers"
    target = THROUGHPUT_TARGET_MASK_ONLY if http.config.mask_only else THROUGHPUT_TARGET
    level = level_at(http, THROUGHPUT_CONCURRENCY)
    ratio = level.requests_per_s / best.images_per_s if level and best else None
    return Goal(
        name=f"1024×768 at concurrency {THROUGHPUT_CONCURRENCY}, {answers} ({http.config.name}): ≥ "
        f"{target:.0%} of the raw session's best images/s",
        target=target,
        measured=ratio,
        higher_is_better=True,
        detail=(
            f"{level.requests_per_s:.2f} req/s against {best.images_per_s:.2f} images/s "
            f"(raw, batch {best.batch}, threads {best.setting.describe()})"
            if level and best
            else "needs the raw and http sections"
        ),
    )


def _large_photo_goal(http: HttpResult) -> Goal:
    level = level_at(http, LARGE_PHOTO_CONCURRENCY)
    ratio = beyond_inference(level) if level else None
    return Goal(
        name=f"6 MP photo ({LARGE_PHOTO_NAME}) at concurrency {LARGE_PHOTO_CONCURRENCY} "
        f"({http.config.name}): (end-to-end − inference) ≤ {LARGE_PHOTO_TARGET:.1f} × inference",
        target=LARGE_PHOTO_TARGET,
        measured=ratio,
        higher_is_better=False,
        detail=(
            f"latency p50 {level.latency.p50:.1f} ms, inference p50 {level.step('inference').p50:.1f} ms"
            if level
            else f"needs a configuration with photo={LARGE_PHOTO_NAME}, concurrency {LARGE_PHOTO_CONCURRENCY}"
        ),
        unit="times",
    )


def evaluate_goals(results: BenchResults) -> list[Goal]:
    """Issue 13's goals: throughput for each configuration on the benchmark's photo (with the mask-only
    target where it asks for the mask alone), the 6 MP ratio for each configuration on that photo."""
    goals = []
    for http in results.http:
        if http.config.photo is None:
            goals.append(_throughput_goal(results, http))
        elif http.config.photo.name == LARGE_PHOTO_NAME:
            goals.append(_large_photo_goal(http))
    return goals


def goals_section(results: BenchResults) -> str:
    goals = evaluate_goals(results)
    if not goals:
        return "## Goals\n\nNot evaluated: the http section was not run."
    rows = [(goal.name, goal.shown, goal.verdict, goal.detail) for goal in goals]
    return "## Goals\n\n" + table(["goal", "measured", "verdict", "from"], rows)
