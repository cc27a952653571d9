"""``python -m bench.model_cost A.onnx B.onnx``: what serving one model file costs against another.

For a candidate release that changes the network's cost (a larger input, another encoder): each photo goes
through the served pipeline of each model (:meth:`service.pipeline.Pipeline.run`, a JSON answer's work:
decode → preprocess → inference → postprocess → encode, mask and confidence-map PNGs), the two alternating
call by call in one run (:func:`bench.pipeline.time_side_by_side`), so the machine's state weighs on both
alike. Prints the p50 of each step and of the whole per photo, and B's over A's. The photos: the
benchmark's own (1024×768) and the 6 MP and 12 MP samples, as ``make bench`` uses. Run it on a quiet
machine; ``--note`` says what else ran.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.inputs import LARGE_PHOTOS, Photo, load_photo, load_photos
from bench.markdown import number, table
from bench.pipeline import SERVICE_PNG_LEVEL, time_side_by_side
from bench.timing import FULL, QUICK, Effort, Timing
from service.inference import OnnxModel
from service.pipeline import STEPS


@dataclass
class PhotoCost:
    """One photo: each model's step timings, keyed by the model's label."""

    photo: str
    steps: dict[str, dict[str, Timing]]

    def p50(self, label: str, step: str | None = None) -> float:
        """The median of one step, or of the whole pipeline (the sum of the steps' medians)."""
        timings = self.steps[label]
        names = [step] if step else STEPS
        return sum(timings[name].p50 for name in names if name in timings)


def label(model: OnnxModel) -> str:
    """``version (W×H)``: what tells two model files apart in the table."""
    height, width = model.info.input_size
    return f"{model.info.version} ({width}×{height})"


def compare(a: OnnxModel, b: OnnxModel, photos: Sequence[Photo], effort: Effort) -> list[PhotoCost]:
    """Both models' served pipelines on each photo, alternating call by call."""
    labels = (label(a), label(b))
    if labels[0] == labels[1]:
        labels = (f"A {labels[0]}", f"B {labels[1]}")
    pipelines = {
        name: model.pipeline(batch_size=1, png_compress_level=SERVICE_PNG_LEVEL)
        for name, model in zip(labels, (a, b), strict=True)
    }
    costs = []
    for photo in photos:
        calls = {
            name: (lambda pipeline=pipeline, data=photo.data: pipeline.run(data, mask=True, probability=True))
            for name, pipeline in pipelines.items()
        }
        timings, _ = time_side_by_side(calls, effort)
        costs.append(PhotoCost(photo.description, timings))
    return costs


def render(costs: Sequence[PhotoCost], note: str | None = None) -> str:
    """A Markdown table: per photo and step, each model's p50 (ms) and B / A."""
    if not costs:
        return "No photos were measured.\n"
    a, b = list(costs[0].steps)
    rows = []
    for cost in costs:
        steps = [name for name in STEPS if name in cost.steps[a]]
        for step in [*steps, None]:
            before, after = cost.p50(a, step), cost.p50(b, step)
            rows.append(
                [
                    cost.photo,
                    step or "**whole answer**",
                    number(before, 1),
                    number(after, 1),
                    f"{after / before:.2f}×" if before > 0 else "–",
                ]
            )
    lines = [table(["photo", "step", f"{a} p50 ms", f"{b} p50 ms", "B / A"], rows)]
    if note:
        lines.append(f"\nBeside the run: {note}")
    return "\n".join(lines) + "\n"


def to_json(costs: Sequence[PhotoCost]) -> list[dict]:
    return [
        {
            "photo": cost.photo,
            "models": {
                name: {step: timing.summary() for step, timing in steps.items()}
                for name, steps in cost.steps.items()
            },
        }
        for cost in costs
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.model_cost", description=__doc__.split("\n")[0])
    parser.add_argument("a", type=Path, help="the reference model (e.g. models/dermaseg.onnx)")
    parser.add_argument("b", type=Path, help="the candidate (e.g. runs/release-X/model/dermaseg.onnx)")
    parser.add_argument(
        "--photos",
        type=Path,
        nargs="*",
        default=None,
        help="photos to send (default: the benchmark's own and the 6 MP and 12 MP samples)",
    )
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: all cores)")
    parser.add_argument("--quick", action="store_true", help="few repetitions: checks the run, not figures")
    parser.add_argument("--json", type=Path, default=None, help="also write the timings as JSON here")
    parser.add_argument("--note", default=None, help="what else was running")
    args = parser.parse_args(argv)

    if args.photos is None:
        large, missing = load_photos(LARGE_PHOTOS)
        photos = [load_photo(), *large]
    else:
        photos, missing = load_photos(args.photos)
    for line in missing:
        print(f"left out: {line}")
    a, b = (OnnxModel(path, intra_op_threads=args.threads) for path in (args.a, args.b))
    costs = compare(a, b, photos, QUICK if args.quick else FULL)
    print(render(costs, args.note), end="")
    if args.json:
        args.json.write_text(json.dumps(to_json(costs), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
