"""Paired comparison of two evaluations of the same photos: `python -m training.compare A.json B.json`.

Made for the leave-one-source-out ranking of issue 12 (``make loso``, then ``make loso-compare``): two
recipes scored on the same held-out source, compared photo by photo. For each evaluation it gives the mean
Jaccard, the ISIC 2018 thresholded Jaccard and the failures (Jaccard below 0.65); then the paired
difference B − A of the Jaccard and of the thresholded Jaccard, with its 95 % interval and how many photos
got worse / better. No TensorFlow: it reads the ``dermaseg evaluate`` JSON files only.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from training.metrics import ISIC_JACCARD_CUTOFF, paired_difference, thresholded_jaccard


class ComparisonError(ValueError):
    """The two files cannot be compared: unreadable, without per-image rows, or without photos in common."""


def load_evaluation(path: Path) -> dict[str, Any]:
    """Reads an evaluation written by ``dermaseg evaluate --out``; its per-image ids must be unique.

    Raises:
        ComparisonError: unreadable, no ``per_image`` Jaccard, or an id listed twice.
    """
    try:
        evaluation = json.loads(Path(path).read_text())
        rows = evaluation["per_image"]
        ids = [str(row["id"]) for row in rows]
        if not all(0.0 <= float(row["jaccard"]) <= 1.0 for row in rows):
            raise ValueError("a Jaccard outside [0, 1]")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ComparisonError(f"{path}: not an evaluation with per-image Jaccard ({error})") from None
    repeated = [(key, count) for key, count in Counter(ids).items() if count > 1]
    if repeated:
        raise ComparisonError(
            f"{path}: image id {repeated[0][0]} occurs {repeated[0][1]} times (several datasets in one "
            "evaluation?): photos could not be paired; evaluate one source per file"
        )
    return evaluation


def summarize(evaluation: dict[str, Any], cutoff: float = ISIC_JACCARD_CUTOFF) -> dict[str, float | int]:
    """``n``, mean Jaccard, thresholded Jaccard, and the failures: photos with Jaccard below ``cutoff``."""
    jaccards = [float(row["jaccard"]) for row in evaluation["per_image"]]
    return {
        "n": len(jaccards),
        "jaccard": sum(jaccards) / len(jaccards),
        "thresholded_jaccard": thresholded_jaccard(jaccards, cutoff),
        "failures": sum(value < cutoff for value in jaccards),
    }


#: The lesion's share of the frame in truth, the bins the failures are counted in: (label, up to).
LESION_SHARES = (("< 10 %", 0.1), ("10–50 %", 0.5), ("≥ 50 %", float("inf")))


def failure_kinds(evaluation: dict[str, Any], cutoff: float = ISIC_JACCARD_CUTOFF) -> dict[str, Any]:
    """The failures (Jaccard below ``cutoff``) by kind, from each photo's pixel counts.

    A failed mask is under-segmented when it misses more of the lesion than it adds (false negatives above
    false positives), else over-segmented. Photos and failures are also counted by the lesion's share of
    the frame in truth (:data:`LESION_SHARES`). Rows without pixel counts (``tp``, ``fp``, ``fn``, ``tn``)
    are left out.

    Returns:
        ``{"photos": n, "failures": k, "under_segmented": u, "over_segmented": o,
        "by_lesion_share": {label: {"photos": n, "failures": k}}}``.
    """
    kinds: dict[str, Any] = {"photos": 0, "failures": 0, "under_segmented": 0, "over_segmented": 0}
    shares = {label: {"photos": 0, "failures": 0} for label, _ in LESION_SHARES}
    for row in evaluation["per_image"]:
        if not all(key in row for key in ("tp", "fp", "fn", "tn")):
            continue
        total = row["tp"] + row["fp"] + row["fn"] + row["tn"]
        share = (row["tp"] + row["fn"]) / total if total else 0.0
        label = next(label for label, limit in LESION_SHARES if share < limit)
        failed = float(row["jaccard"]) < cutoff
        kinds["photos"] += 1
        shares[label]["photos"] += 1
        if failed:
            kinds["failures"] += 1
            shares[label]["failures"] += 1
            kinds["under_segmented" if row["fn"] > row["fp"] else "over_segmented"] += 1
    return kinds | {"by_lesion_share": shares}


def _thresholded_rows(evaluation: dict[str, Any], cutoff: float) -> dict[str, Any]:
    return {
        "per_image": [
            {"id": row["id"], "jaccard": 0.0 if row["jaccard"] < cutoff else row["jaccard"]}
            for row in evaluation["per_image"]
        ]
    }


def compare(
    base: dict[str, Any], other: dict[str, Any], cutoff: float = ISIC_JACCARD_CUTOFF
) -> dict[str, Any]:
    """Both summaries, computed on the photos the two have in common, and the paired differences other − base.

    Returns:
        ``{"paired": n, "base": summary, "other": summary, "failure_kinds": {"base", "other"},
        "jaccard": difference, "thresholded_jaccard": difference}``, each difference ``{"mean",
        "ci95": [low, high], "worse", "better"}`` (see :func:`failure_kinds` for the failures by kind).

    Raises:
        ComparisonError: no photo in common.
    """
    common = {row["id"] for row in base["per_image"]} & {row["id"] for row in other["per_image"]}
    if not common:
        raise ComparisonError("the two evaluations share no image id: they scored different photos")
    base = {"per_image": [row for row in base["per_image"] if row["id"] in common]}
    other = {"per_image": [row for row in other["per_image"] if row["id"] in common]}
    result: dict[str, Any] = {
        "paired": len(common),
        "base": summarize(base, cutoff),
        "other": summarize(other, cutoff),
        "failure_kinds": {"base": failure_kinds(base, cutoff), "other": failure_kinds(other, cutoff)},
    }
    for name, (before, after) in {
        "jaccard": (base, other),
        "thresholded_jaccard": (_thresholded_rows(base, cutoff), _thresholded_rows(other, cutoff)),
    }.items():
        mean, half, worse, better = paired_difference(before, after, metric="jaccard")
        result[name] = {"mean": mean, "ci95": [mean - half, mean + half], "worse": worse, "better": better}
    return result


def format_comparison(result: dict[str, Any], base_name: str, other_name: str) -> str:
    """The comparison as a small text table and two lines of paired differences."""
    width = max(len(base_name), len(other_name), 4)
    lines = [
        f"{'':{width}}  {'n':>5}  {'Jaccard':>8}  {'thresholded':>11}  {'failures (<0.65)':>16}",
    ]
    for label, summary in ((base_name, result["base"]), (other_name, result["other"])):
        lines.append(
            f"{label:{width}}  {summary['n']:>5}  {summary['jaccard']:>8.4f}  "
            f"{summary['thresholded_jaccard']:>11.4f}  {summary['failures']:>16}"
        )
    kinds = result["failure_kinds"]
    if kinds["base"]["photos"] and kinds["other"]["photos"]:
        lines.append(
            "failures under- / over-segmented: "
            + ", ".join(
                f"{side} {kinds[key]['under_segmented']} / {kinds[key]['over_segmented']}"
                for side, key in (("A", "base"), ("B", "other"))
            )
        )
    lines.append(f"paired difference B − A over {result['paired']} photos (95 % CI; photos worse / better):")
    for name, label in (("jaccard", "Jaccard"), ("thresholded_jaccard", "thresholded Jaccard")):
        difference = result[name]
        low, high = difference["ci95"]
        lines.append(
            f"  {label:<20} {difference['mean']:+.4f}  [{low:+.4f}, {high:+.4f}]  "
            f"{difference['worse']} / {difference['better']}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: prints the comparison of evaluation A (the base) with B; exit status 2 on bad input."""
    parser = argparse.ArgumentParser(
        prog="python -m training.compare",
        description="Compare two `dermaseg evaluate` results on the same photos, paired photo by photo.",
    )
    parser.add_argument("base", type=Path, help="evaluation A (the base), e.g. runs/loso-base/eval.json")
    parser.add_argument("other", type=Path, help="evaluation B, compared with A")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    try:
        result = compare(load_evaluation(args.base), load_evaluation(args.other))
    except ComparisonError as error:
        print(f"compare: error: {error}", file=sys.stderr)
        return 2
    print(
        json.dumps(result, indent=2)
        if args.json
        else format_comparison(result, f"A {args.base}", f"B {args.other}")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
