"""Section 8: the reduced-scale JPEG decode against the full decode, mask by mask (issue 13's rule).

The served pipeline decodes a JPEG at the smallest DCT scale still at least the network's input
(``service.imaging.decode_photo``), which changes the network's input slightly. Before that is kept, every
photo large enough for the scaling to act goes through the pipeline twice, once with the full decode
(:class:`bench.baseline.FullDecodePipeline`) and once as served, everything else identical, and:

* the two masks must agree to Dice ≥ :data:`AGREEMENT_RULE` on every photo;
* Dice against the expert's mask must not drop beyond the paired 95 % interval
  (``training.metrics.paired_difference``: the mean difference served − full, ± 1.96 standard errors;
  the rule holds when that interval reaches 0 or above).

Photos: ``../shared/data/samples`` at full size and ``../shared/data/ph2`` (512 px: half scale where both
sides are at least twice the input). A photo the scaling does not act on (not a JPEG, or too small) is
left out and counted. Measures masks, not time: any machine will do.

Runs inside ``python -m bench`` and alone: ``python -m bench.decode_check [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.baseline import FullDecodePipeline
from bench.markdown import number, table
from service.imaging import load_mask
from service.inference import OnnxModel
from service.pipeline import Pipeline
from training.data import DataError, Sample, load_samples
from training.metrics import confusion_counts, metrics_from_counts, paired_difference

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
DEFAULT_ROOTS = (SHARED_DATA / "samples", SHARED_DATA / "ph2")
#: Masks of the full and the reduced decode must agree at least this well on every photo.
AGREEMENT_RULE = 0.995


def dice(first: object, second: object) -> float:
    """Dice between two boolean masks (1.0 when both are empty, ``training.metrics``' convention)."""
    return metrics_from_counts(*confusion_counts(first, second))["dice"]


@dataclass(frozen=True)
class PhotoCheck:
    """One photo: its sizes, the two masks' agreement, and each mask's Dice against the expert's."""

    id: str
    size: tuple[int, int]
    decoded_size: tuple[int, int]
    agreement: float
    dice_full: float
    dice_reduced: float


@dataclass
class DecodeCheck:
    """The check over every photo, and the photos it left out (with why)."""

    photos: list[PhotoCheck] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    source: str = ""
    rule: float = AGREEMENT_RULE

    @property
    def below(self) -> list[PhotoCheck]:
        """Photos whose masks agree less than the rule asks, worst first."""
        return sorted((p for p in self.photos if p.agreement < self.rule), key=lambda p: p.agreement)

    @property
    def min_agreement(self) -> float | None:
        return min((p.agreement for p in self.photos), default=None)

    def paired(self) -> tuple[float, float, int, int] | None:
        """Dice against the expert, reduced − full: mean, 95 % half-width, worse and better counts."""
        if not self.photos:
            return None
        full = {"per_image": [{"id": p.id, "dice": p.dice_full} for p in self.photos]}
        reduced = {"per_image": [{"id": p.id, "dice": p.dice_reduced} for p in self.photos]}
        return paired_difference(full, reduced)

    @property
    def dice_holds(self) -> bool | None:
        """Whether Dice against the expert does not drop beyond the paired interval (mean + half ≥ 0)."""
        paired = self.paired()
        return None if paired is None else paired[0] + paired[1] >= 0.0

    @property
    def passed(self) -> bool | None:
        """Both rules hold (None when no photo was checked)."""
        if not self.photos:
            return None
        return not self.below and bool(self.dice_holds)

    @property
    def verdict(self) -> str:
        if self.passed is None:
            return "not checked: no photo the reduced decode acts on"
        if self.passed:
            return "**passed**: the reduced decode may stay"
        reasons = []
        if self.below:
            reasons.append(f"{len(self.below)} photo(s) below Dice {self.rule}")
        if not self.dice_holds:
            reasons.append("Dice against the experts drops beyond the paired interval")
        return "**failed**: " + "; ".join(reasons)


def check_photo(full: Pipeline, served: Pipeline, sample: Sample) -> PhotoCheck | None:
    """Both pipelines on one photo; None when the served decode does not reduce it (nothing to check).

    Raises:
        ValueError: the expert's mask is not the photo's size.
    """
    data = sample.image_path.read_bytes()
    photo = served.decode(data)
    if photo.pixels.shape[:2] == photo.size:
        return None
    truth = load_mask(sample.mask_path)
    reference = full.run(data, mask=False).segmentation.mask
    reduced = served.run(data, mask=False).segmentation.mask
    if truth.shape != reference.shape:
        raise ValueError(f"{sample.mask_path}: mask {truth.shape} is not the photo's size {reference.shape}")
    return PhotoCheck(
        id=f"{sample.dataset}/{sample.id}",
        size=photo.size,
        decoded_size=(int(photo.pixels.shape[0]), int(photo.pixels.shape[1])),
        agreement=dice(reference, reduced),
        dice_full=dice(reference, truth),
        dice_reduced=dice(reduced, truth),
    )


def run_check(
    full: Pipeline,
    served: Pipeline,
    samples: Sequence[Sample],
    progress: Callable[[int, int], None] | None = None,
) -> DecodeCheck:
    """:func:`check_photo` on every sample; the ones the reduced decode does not act on are counted."""
    result = DecodeCheck()
    for index, sample in enumerate(samples):
        suffix = sample.image_path.suffix.lower()
        checked = check_photo(full, served, sample)
        if checked is None:
            reason = "not a JPEG" if suffix not in (".jpg", ".jpeg") else "too small for a reduced scale"
            result.skipped[reason] = result.skipped.get(reason, 0) + 1
        else:
            result.photos.append(checked)
        if progress is not None:
            progress(index + 1, len(samples))
    return result


def bench_decode_check(model_path: Path, roots: Sequence[Path] = DEFAULT_ROOTS) -> DecodeCheck:
    """The check on the photos of ``roots`` with the model at ``model_path`` (missing roots are noted)."""
    model = OnnxModel(model_path)
    served = model.pipeline(batch_size=1)
    full = FullDecodePipeline(model, model.info.input_size, model.info.threshold, batch_size=1)
    present = [Path(root) for root in roots if Path(root).is_dir()]
    missing = [str(root) for root in roots if not Path(root).is_dir()]
    try:
        samples = load_samples(present) if present else []
    except DataError as error:
        logger.warning("decode check: %s", error)
        samples = []

    def progress(done: int, total: int) -> None:
        if done % 50 == 0 or done == total:
            logger.info("decode check: %d / %d photos", done, total)

    result = run_check(full, served, samples, progress)
    result.source = ", ".join(f"`{_shown(root)}`" for root in present) or "no data"
    if missing:
        result.source += " (not found: " + ", ".join(f"`{_shown(Path(root))}`" for root in missing) + ")"
    return result


def _shown(path: Path) -> str:
    try:
        return f"../shared/data/{path.resolve().relative_to(SHARED_DATA.resolve())}"
    except ValueError:
        return str(path)


# ------------------------------------------------------------------------------------------------------------
# Markdown


def render_section(check: DecodeCheck | None) -> str:
    """Section 8 of docs/performance.md."""
    if check is None:
        return ""
    head = (
        "## 8. Reduced-scale JPEG decoding against the full decode\n\n"
        "Issue 13's rule for keeping the reduced decode: on every photo it acts on, the served pipeline's "
        "mask and the mask of the same pipeline with a full decode agree to Dice ≥ "
        f"{check.rule}, and Dice against the expert's mask does not drop beyond the paired 95 % interval "
        f"(reduced − full, per photo). Photos: {check.source}; each at its own size, the model's threshold. "
        "Masks, not times: the machine's load does not matter here."
    )
    skipped = ", ".join(f"{count} {reason}" for reason, count in sorted(check.skipped.items()))
    if skipped:
        head += f" Left out (the decode is the full one there): {skipped}."
    if not check.photos:
        return head + f"\n\nVerdict: {check.verdict}."
    paired = check.paired()
    assert paired is not None
    mean, half, worse, better = paired
    below = ", ".join(f"{p.id} ({p.agreement:.4f})" for p in check.below) or "none"
    mean_full = sum(p.dice_full for p in check.photos) / len(check.photos)
    mean_reduced = sum(p.dice_reduced for p in check.photos) / len(check.photos)
    rows = [
        ("photos checked", str(len(check.photos))),
        ("decoded at (scale)", _scales(check)),
        ("lowest agreement (Dice full vs reduced mask)", f"{check.min_agreement:.4f}"),
        (f"photos below {check.rule}", f"{len(check.below)}: {below}"),
        ("mean Dice vs expert, full → reduced decode", f"{mean_full:.4f} → {mean_reduced:.4f}"),
        (
            "paired difference (reduced − full)",
            f"{mean:+.5f} ± {half:.5f} (95 %), {worse} worse, {better} better, "
            f"{len(check.photos) - worse - better} unchanged",
        ),
        ("verdict", check.verdict),
    ]
    per_photo = [
        [
            p.id,
            f"{p.size[1]}×{p.size[0]}",
            f"{p.decoded_size[1]}×{p.decoded_size[0]}",
            f"{p.agreement:.4f}",
            f"{p.dice_full:.4f}",
            f"{p.dice_reduced:.4f}",
            f"{p.dice_reduced - p.dice_full:+.4f}",
        ]
        for p in sorted(check.photos, key=lambda p: (p.agreement, p.id))
    ]
    headers = ["photo", "size", "decoded at", "agreement", "Dice full", "Dice reduced", "Δ"]
    return (
        head
        + "\n\n"
        + table(["", ""], rows)
        + "\n\n<details><summary>Every photo, lowest agreement first</summary>\n\n"
        + table(headers, per_photo)
        + "\n\n</details>"
    )


def _scales(check: DecodeCheck) -> str:
    counts: dict[str, int] = {}
    for p in check.photos:
        scale = p.size[0] / p.decoded_size[0]
        label = f"1/{number(scale, 0)}"
        counts[label] = counts.get(label, 0) + 1
    return ", ".join(f"{label}: {count} photos" for label, count in sorted(counts.items()))


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the check alone; prints section 8 and exits 0 when it passes, 1 when it fails."""
    parser = argparse.ArgumentParser(prog="python -m bench.decode_check", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO_ROOT / "models" / "dermaseg.onnx")
    parser.add_argument(
        "--data", type=Path, action="append", default=None, help="a dataset folder, repeatable"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write every photo's figures here")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    check = bench_decode_check(args.model, args.data or DEFAULT_ROOTS)
    print(render_section(check))
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(check), indent=1) + "\n", encoding="utf-8")
    return 0 if check.passed else 1


if __name__ == "__main__":
    sys.exit(main())
