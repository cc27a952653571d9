# ruff: noqa: E501  (Markdown lines: the page wraps them, not Python)
"""`python -m training.quality_report`: docs/quality.md from the calibration report.

`dermaseg calibrate-quality` (``make calibrate-quality``) writes ``docs/quality-calibration.json``; this
turns it into the page, so that every figure on the page is the report's and a recalibration for a new
model rewrites them all.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from training.report import fmt as _num

CALIBRATE = """\
    make calibrate-quality
    # = python -m training.cli calibrate-quality --model models/dermaseg.onnx --card models/dermaseg.json \\
    #     --data ../shared/data/ham10000 --data ../shared/data/isic2017_train --data ../shared/data/ph2 \\
    #     --max-per-source 3000 --seed 14 --flip-agreement --rows runs/quality/rows.csv \\
    #     --out models/dermaseg.quality.json --report docs/quality-calibration.json
    #   then python -m training.quality_report (this page)"""


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def _row(name: str, part: dict[str, Any]) -> str:
    return (
        f"| {name} | {part['n_images']} | {part['failures']} | {_num(part['auroc_failures'])} | "
        f"{_num(part['spearman'])} | {_num(part['mae'])} | {_pct(part['flagged_share'])} | "
        f"{_pct(part['failures_caught'])} |"
    )


def render(report: dict[str, Any], version: str) -> str:
    """The page, every figure taken from ``report`` (``docs/quality-calibration.json``)."""
    test, data, limits = report["test"], report["data"], report["reason_limits"]
    terms = ", ".join(report["estimator"]["terms"])
    sources = ", ".join(f"{name} {count}" for name, count in data["sources"].items())
    lines = [
        "# Outline quality: estimated Jaccard and review flag",
        "",
        "Every mask comes with `estimated_jaccard` (0–1: how well it probably matches an expert's outline),",
        f"`review_recommended` (the estimate is below `review_below`, {report['review_below']} by default) and",
        "short `reasons` for a flagged mask. The code is `service/quality.py` (numpy and scipy only); the fitted",
        "numbers are `models/dermaseg.quality.json`, beside the model, written by `dermaseg calibrate-quality`",
        "(`training/quality.py`). Every figure here is from `docs/quality-calibration.json`, the report of the",
        f"last calibration (model `{report['model']}` {version}, sha256 `{report['model_sha256'][:12]}…`,",
        f"{report['date']}); `python -m training.quality_report` writes this page from it.",
        "",
        "## How it works",
        "- **Features** of the network's probability map at its own resolution, the mask being",
        "  `p ≥ threshold`: mean probability inside the mask, undecided pixels (0.2 < p < 0.8) per outline edge,",
        "  the map's own expected Jaccard, share of the frame's edge covered, area share, compactness, and the",
        "  share of the mask in its largest piece. Optional: agreement with a mirrored pass (see below).",
        "- **Estimator**: `sigmoid(intercept + Σ weight · standardized(transform(feature)))`, "
        f"{len(report['estimator']['terms'])} terms",
        f"  ({terms}), fitted by least squares (small ridge) on the true Jaccard; 0 when no lesion is found.",
        f"- **Review threshold**: {report['review_below_chosen_by']}.",
        "- **Reasons** (flagged masks only): `no_lesion_found`; `lesion_touches_border` (more than",
        f"  {_pct(limits['border_fraction'])} of the frame's edge); `low_confidence` (mean probability inside the",
        f"  mask below {limits['mean_confidence']}; {report['reason_limits_chosen_by']}); `fragmented_outline`",
        f"  (largest piece under {_pct(limits['largest_share'])} of the mask); `low_estimated_jaccard` when none",
        "  of these applies.",
        "",
        "## Calibration data",
        f"Only photos the model never trained on ({data['left_out']}): {sources}, at most",
        f"{data['max_per_source']} per source (seed {data['seed']}). Split {data['split']}:",
        f"{data['fit_images']} photos for fitting, {data['test_images']} for the test. A failure is a",
        f"{report['failure']}, after the service's resize-back and threshold: what `dermaseg evaluate` scores,",
        "so the estimate speaks of the mask a client receives.",
        "",
        "## How well it works (test part, default threshold)",
        "| source | photos | failures | AUROC (failures) | Spearman | MAE | flagged | failures caught |",
        "|---|---|---|---|---|---|---|---|",
        _row("all", test),
        *(_row(name, part) for name, part in report["test_per_source"].items()),
        "",
        f"Among flagged test masks {_pct(test['failure_rate_among_flagged'])} are failures (base rate "
        f"{_pct(test['failure_rate'])}). A source without a failure in its test part has no AUROC.",
        "Targets of issue 14: AUROC ≥ 0.85, Spearman ≥ 0.6, MAE ≤ 0.15.",
        "",
        "Each feature alone (test AUROC for failures; `low`: low values mean failure):",
        "",
        "| feature | AUROC | failure when |",
        "|---|---|---|",
    ]
    features = sorted(report["feature_auroc_test"].items(), key=lambda item: -(item[1]["auroc"] or 0))
    lines += [f"| `{name}` | {_num(value['auroc'])} | {value['failure_when']} |" for name, value in features]
    border = report["feature_auroc_test"].get("border_fraction", {}).get("auroc")
    if border is not None and border < 0.6:
        lines += [
            "",
            f"Frame contact does not predict failure on these photos (AUROC {_num(border)}). It stays a reason,",
            "for the frame-filling lesions that failed on the external set (issue 12).",
        ]
    flip = report.get("flip_agreement")
    if flip:
        with_flip = flip["test_with_flip"]
        lines += [
            "",
            f"**The mirrored pass** (agreement between the plain and the horizontally flipped mask; AUROC "
            f"{_num(flip['feature_auroc_test']['auroc'])} alone) would give the estimator AUROC "
            f"{_num(with_flip['auroc_failures'])}, Spearman {_num(with_flip['spearman'])}, MAE "
            f"{_num(with_flip['mae'])} (from {_num(test['auroc_failures'])}, {_num(test['spearman'])}, "
            f"{_num(test['mae'])}) for {flip['cost']}; the service does not run it.",
        ]
    lines += [
        "",
        "**Choosing `DERMASEG_REVIEW_BELOW`** (test part):",
        "",
        "| review below | flagged | failures caught |",
        "|---|---|---|",
        *(
            f"| {row['review_below']:.2f} | {_pct(row['flagged_share'])} | {_pct(row['failures_caught'])} |"
            for row in report["test_trade_off"]
        ),
        "",
        "**Reasons** on flagged test masks:",
        "",
        "| reason | masks | of which failures |",
        "|---|---|---|",
        *(
            f"| `{name}` | {reason['count']} | {_pct(reason['failure_rate'])} |"
            for name, reason in sorted(test["reasons"].items())
        ),
    ]
    cost = report["cost"]
    lines += [
        "",
        "## Cost",
        f"Features and estimate: {cost['features_and_estimate_ms']:.2f} ms per photo against "
        f"{cost['network_ms_batch1']:.1f} ms for the network at batch 1 ({_pct(cost['share_of_inference'])}),",
        "both measured in the calibration run (not a quiet benchmark); no second inference. The budget is 5 %",
        "of inference.",
        "",
        "## Rerun",
        "When the release model changes, recalibrate and rewrite this page (`tests/test_quality.py` fails until",
        "the estimator names the shipped model's sha256, and the service refuses an estimator of another model):",
        "",
        CALIBRATE,
        "",
        "It takes 10–20 minutes on a 2-core machine; the mirrored pass doubles the network time (drop",
        "`--flip-agreement` to halve it). `--from-rows runs/quality/rows.csv` refits without the network.",
        "",
        "## Watching for drift",
        "Without labels, the share of flagged answers tracks how unfamiliar the incoming photos are. On unseen",
        f"test photos it is {_pct(test['flagged_share'])} at the default threshold. `/metrics` exports",
        "`dermaseg_estimated_jaccard` (a histogram of every answer's estimate), `dermaseg_review_recommended_total`",
        "(flagged answers) and `dermaseg_review_reasons_total{reason}`. A Prometheus rule that fires when the",
        "1-hour share of flagged answers exceeds twice the test rate, or the 1-hour mean estimate falls 0.1",
        f"below the test mean ({_num(test['mean_estimate'])}):",
        "",
        "```yaml",
        "groups:",
        "  - name: dermaseg-quality",
        "    rules:",
        "      - alert: DermaSegFlaggedShareHigh",
        "        expr: |",
        "          sum(rate(dermaseg_review_recommended_total[1h]))",
        f"            / sum(rate(dermaseg_estimated_jaccard_count[1h])) > 2 * {test['flagged_share']:.3f}",
        "        for: 15m",
        "        annotations:",
        '          summary: "Over twice the validation share of outlines flagged for review: are the photos different?"',
        "      - alert: DermaSegEstimatedJaccardLow",
        "        expr: |",
        "          sum(rate(dermaseg_estimated_jaccard_sum[1h]))",
        f"            / sum(rate(dermaseg_estimated_jaccard_count[1h])) < {test['mean_estimate']:.3f} - 0.1",
        "        for: 15m",
        "```",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.quality_report", description=__doc__)
    parser.add_argument("--report", type=Path, default=Path("docs/quality-calibration.json"))
    parser.add_argument("--card", type=Path, default=Path("models/dermaseg.json"))
    parser.add_argument("--out", type=Path, default=Path("docs/quality.md"))
    args = parser.parse_args(argv)
    report = json.loads(args.report.read_text())
    card = json.loads(args.card.read_text()) if args.card.is_file() else {}
    version = (
        card.get("version", "?") if card.get("sha256") == report["model_sha256"] else "(not the shipped one)"
    )
    args.out.write_text(render(report, version))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
