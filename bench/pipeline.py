"""Section 3: the service's steps in this process (no HTTP), release 1.0.0's against the served ones.

Each photo goes through :meth:`service.pipeline.Pipeline.run`, the code ``POST /segment``, ``dermaseg
predict`` and ``dermaseg evaluate`` run (decode → preprocess → inference → postprocess → encode, both
PNGs of a JSON answer), and the step times come from the pipeline's own :class:`StepTimes`. *after* is
the served pipeline (``OnnxModel.pipeline``); *before* is :class:`bench.baseline.Release100Pipeline`,
the same chain with each step as release 1.0.0 ran it. The two alternate call by call in one run, so
the machine's state weighs on both alike. The photos: the benchmark's own (1024×768) and the 6 MP and
12 MP samples, the sizes clinics send.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from bench.baseline import RELEASE, Release100Pipeline
from bench.decode_check import dice
from bench.inputs import Photo
from bench.markdown import number, percent, table
from bench.timing import Effort, Timing
from service.config import Settings
from service.inference import OnnxModel
from service.pipeline import STEPS, PhotoResult, Pipeline

#: zlib level of the service's PNGs (DERMASEG_PNG_COMPRESS_LEVEL's default); 1.0.0 ran the same level.
SERVICE_PNG_LEVEL = Settings.model_fields["png_compress_level"].default
BEFORE = f"before ({RELEASE})"
AFTER = "after (served)"

#: What each adopted change replaced, the steps it acts on, and the dependency it brought.
CHANGES = (
    (
        "JPEG decoded at the DCT scale the input needs (Pillow `draft`), resize shrinks by whole "
        "factors first (`reducing_gap` 3)",
        "none (Pillow)",
        ("decode", "preprocess"),
    ),
    ("probability map upsampled by `cv2.resize`", "opencv-python-headless", ("postprocess",)),
    (
        "PNGs by `cv2.imencode` (RLE for the mask, sub filter + RLE for the map), `cv2.convertScaleAbs` for "
        "the map's pixels",
        "opencv-python-headless",
        ("encode",),
    ),
)


@dataclass
class StepRow:
    """One implementation on one photo: each step's times, and the size of the PNGs it wrote."""

    steps: dict[str, Timing] = field(default_factory=dict)
    png_bytes: int = 0

    def p50(self, *names: str) -> float:
        return sum(self.steps[name].p50 for name in names if name in self.steps)

    @property
    def total_ms(self) -> float:
        return self.p50(*STEPS)

    @property
    def other_ms(self) -> float:
        """Every step but the inference (p50s summed)."""
        return self.p50(*(name for name in STEPS if name != "inference"))

    @property
    def other_per_inference(self) -> float:
        inference = self.p50("inference")
        return self.other_ms / inference if inference > 0 else float("nan")


@dataclass
class PhotoSteps:
    """Before and after on one photo, and how far their masks agree."""

    photo: str
    size: tuple[int, int]
    before: StepRow
    after: StepRow
    #: Dice between 1.0.0's mask and the served one (1.0: the same pixels).
    mask_agreement: float

    @property
    def label(self) -> str:
        height, width = self.size
        return f"{width}×{height} ({height * width / 1e6:.1f} MP)"


@dataclass
class PipelineResult:
    """Section 3: each photo's before and after, and the photos left out (with why)."""

    photos: list[PhotoSteps] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def main(self) -> PhotoSteps | None:
        """The benchmark's own photo (the first), which the other sections measure too."""
        return self.photos[0] if self.photos else None


def time_side_by_side(
    calls: dict[str, Callable[[], PhotoResult]], effort: Effort
) -> tuple[dict[str, dict[str, Timing]], dict[str, PhotoResult]]:
    """Calls each of ``calls`` in turn, round after round, and collects each step's times per call.

    Warm-up and the number of rounds follow ``effort`` (as :func:`bench.timing.measure`, with the time of
    a round, all calls together, counting toward ``effort.seconds``). Returns the step timings and the last
    result of each call.
    """
    last: dict[str, PhotoResult] = {}
    for _ in range(effort.warmup):
        for name, call in calls.items():
            last[name] = call()
    timings: dict[str, dict[str, Timing]] = {name: {} for name in calls}
    rounds, spent = 0, 0.0
    while rounds < effort.max_runs and (rounds < effort.min_runs or spent < effort.seconds):
        for name, call in calls.items():
            last[name] = result = call()
            for step, ms in result.times.ms.items():
                timings[name].setdefault(step, Timing()).samples_ms.append(ms)
                spent += ms / 1000.0
        rounds += 1
    return timings, last


def _png_bytes(result: PhotoResult) -> int:
    return len(result.encoded.mask_png or b"") + len(result.encoded.probability_png or b"")


def bench_photo(served: Pipeline, before: Pipeline, photo: Photo, effort: Effort) -> PhotoSteps:
    """Before and after on one photo, a JSON answer's work (mask and confidence-map PNGs)."""
    calls = {
        name: (lambda pipeline=pipeline: pipeline.run(photo.data, mask=True, probability=True))
        for name, pipeline in ((BEFORE, before), (AFTER, served))
    }
    timings, last = time_side_by_side(calls, effort)
    rows = {name: StepRow(timings[name], _png_bytes(last[name])) for name in calls}
    return PhotoSteps(
        photo=photo.description,
        size=last[AFTER].segmentation.mask.shape,
        before=rows[BEFORE],
        after=rows[AFTER],
        mask_agreement=dice(last[BEFORE].segmentation.mask, last[AFTER].segmentation.mask),
    )


def bench_pipeline(
    model: OnnxModel, photos: Sequence[Photo], effort: Effort, skipped: Sequence[str] = ()
) -> PipelineResult:
    """Before and after on each photo at batch 1; ``skipped`` says which photos were not found."""
    served = model.pipeline(batch_size=1, png_compress_level=SERVICE_PNG_LEVEL)
    before = Release100Pipeline(
        model, model.info.input_size, model.info.threshold, batch_size=1, png_compress_level=SERVICE_PNG_LEVEL
    )
    result = PipelineResult(skipped=list(skipped))
    for photo in photos:
        result.photos.append(bench_photo(served, before, photo, effort))
    return result


# ------------------------------------------------------------------------------------------------------------
# Markdown


def _saving(before: float, after: float) -> str:
    if before <= 0:
        return "–"
    return f"{number(before)} → {number(after)} ({percent((after - before) / before)})"


def justification(result: PipelineResult) -> list[str]:
    """One sentence per dependency (and the reduced decode), from the figures of this run."""
    lines = []
    largest = max(result.photos, key=lambda p: p.size[0] * p.size[1], default=None)
    if largest is None:
        return lines
    dependencies: dict[str, list[str]] = {}
    for _, dependency, steps in CHANGES:
        dependencies.setdefault(dependency, []).extend(steps)
    for dependency, steps in dependencies.items():
        cells = "; ".join(
            f"{photo.label}: {number(photo.before.p50(*steps))} → {number(photo.after.p50(*steps))} ms"
            for photo in result.photos
        )
        what = " + ".join(steps)
        subject = (
            "The reduced decode (no new dependency)" if dependency.startswith("none") else f"`{dependency}`"
        )
        lines.append(f"{subject} is worth its place by {what}, p50 before → after: {cells}.")
    return lines


def render_section(result: PipelineResult | None) -> str:
    """Section 3 of docs/performance.md."""
    if result is None:
        return ""
    text = (
        "## 3. The service's steps, in process (no HTTP)\n\n"
        "`Pipeline.run`, the code `POST /segment`, `dermaseg predict` and `dermaseg evaluate` run, on each "
        "photo at batch 1 with both PNGs of a JSON answer (base64 and JSON are in section 4); each step's "
        f"time is the pipeline's own. *{AFTER}* is the served pipeline; *{BEFORE}* is the same chain with "
        f"each step as release {RELEASE} ran it (`bench.baseline`: full decode, one-pass Pillow resize, "
        "Pillow upsampling of the probability, Pillow PNGs at the same zlib level). The two alternate call "
        "by call in this run. p50 in ms; *other / inference* = (every step but inference) / inference."
    )
    if result.skipped:
        text += "\n\n" + "\n".join(f"Skipped: {line}." for line in result.skipped)
    if not result.photos:
        return text
    headers = ["photo", "code", "n", *STEPS, "sum", "other / inference", "PNGs KiB"]
    rows = []
    for photo in result.photos:
        for name, row in ((BEFORE, photo.before), (AFTER, photo.after)):
            rows.append(
                [
                    photo.label,
                    name,
                    row.steps[STEPS[0]].n if STEPS[0] in row.steps else 0,
                    *(number(row.p50(step)) for step in STEPS),
                    number(row.total_ms),
                    number(row.other_per_inference, 2) + "×",
                    number(row.png_bytes / 1024, 0),
                ]
            )
    text += "\n\n" + table(headers, rows)
    text += "\n\nPhotos: " + "; ".join(f"{photo.label} = {photo.photo}" for photo in result.photos) + "."
    text += (
        " The masks of both agree to Dice "
        + ", ".join(f"{photo.mask_agreement:.4f} ({photo.label})" for photo in result.photos)
        + " (the reduced decode's check on every photo is section 8)."
    )
    change_rows = [
        [change, dependency, " + ".join(steps)]
        + [_saving(photo.before.p50(*steps), photo.after.p50(*steps)) for photo in result.photos]
        for change, dependency, steps in CHANGES
    ]
    text += "\n\nWhat each adopted change buys (p50 ms of the steps it acts on, before → after):\n\n" + table(
        ["change", "dependency", "steps", *(photo.label for photo in result.photos)], change_rows
    )
    text += "\n\n" + "\n".join(f"- {line}" for line in justification(result))
    return text
