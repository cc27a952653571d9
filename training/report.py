"""`python -m training.report`: docs/results.md from run directories, beside the paper's numbers.

Each run directory is one that `dermaseg train` wrote, plus the evaluations that `make reproduce` adds:
``eval_val.json`` (its own validation split) and ``eval_external.json`` (the external test set).
Figures go to ``docs/figures/``: training curves (the paper's Fig. 6), a bar chart of the models
(Fig. 7) and image / truth / prediction overlays of external-test images (Table 2), worst cases included.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from training.callbacks import read_history
from training.config import TrainConfig
from training.metrics import paired_difference

METRICS = ("dice", "jaccard", "sensitivity", "specificity", "accuracy")

#: The paper's Table 3 / text, for models (1) baseline, (2) focal without augmentation, (3) full method.
PAPER = {
    "baseline": {"dice": 0.882, "sensitivity": 0.863},
    "focal-noaug": {"dice": 0.929, "sensitivity": 0.906},
    "focal-aug": {"dice": 0.938, "jaccard": 0.884, "sensitivity": 0.921, "specificity": 0.980},
}
LABELS = {
    "baseline": "(1) U-Net, BCE, augmentation",
    "focal-noaug": "(2) ResNet50V2 U-Net, focal, no augmentation",
    "focal-aug": "(3) ResNet50V2 U-Net, focal, augmentation",
}

INCONSISTENCIES = """\
## The paper's inconsistencies that these numbers touch

- **Accuracy formula.** The paper prints accuracy as (TP+FP)/N; that is a typo. We compute (TP+TN)/N.
  With lesions covering a minority of pixels, (TP+FP)/N would be roughly the predicted lesion share,
  nowhere near the ~0.95 accuracies reported.
- **Loss in Table 1.** Table 1 lists binary cross-entropy as the loss while the text (and the title)
  trains with focal loss. We trained (2) and (3) with the focal loss of eq. 2 (α = 0.8, γ = 2) and the
  baseline (1) with BCE.
- **Abstract vs results.** The abstract claims Dice 96 % and Jaccard 97 %. Jaccard can never exceed
  Dice (J = D / (2 − D) ≤ D for one image, and the pooled values obey the same bound), so both cannot
  hold; the results section's Dice 0.938 / Jaccard 0.884 are consistent with each other
  (0.938 / (2 − 0.938) = 0.883).
"""


def load_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def fmt(value: float | None, digits: int = 3) -> str:
    """A figure for a results table: ``digits`` decimals, or a dash where there is none."""
    return "–" if value is None else f"{value:.{digits}f}"


def _bar_chart(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, axis = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / max(len(rows), 1)
    positions = np.arange(len(METRICS[:4]))
    for index, row in enumerate(rows):
        values = [row["external"]["mean"][m] if row["external"] else 0.0 for m in METRICS[:4]]
        axis.bar(positions + index * width, values, width, label=row["label"])
    axis.set_xticks(positions + width * (len(rows) - 1) / 2, METRICS[:4])
    axis.set_ylim(0, 1)
    axis.set_ylabel("per-image mean, external test")
    axis.legend(fontsize=7, loc="lower right")
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _overlays(
    run: Path, external: dict[str, Any], roots: Sequence[Path], folder: Path, count: int
) -> list[tuple[str, str]]:
    """Re-predicts the worst, median and best external images and writes their overlays.

    Returns:
        ``(image id, figure file name)`` pairs, worst first; a figure is named by its rank
        (``worst-1-ISIC_….png``), the folder holding nothing else.
    """
    from training.data import load_samples
    from training.evaluate import evaluate

    ranked = sorted(external["per_image"], key=lambda row: row["dice"])
    middle = len(ranked) // 2
    chosen = ranked[:count] + ranked[middle : middle + 1] + ranked[-count:]
    wanted = {row["id"] for row in chosen}
    samples = [s for s in load_samples(list(roots)) if s.id in wanted]
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    evaluate(
        run / "best.keras",
        roots,
        samples=samples,
        overlays=folder,
        threshold=external.get("threshold"),
        **external.get("postprocess", {}),
    )
    ranks = [f"worst-{i + 1}" for i in range(count)] + ["median"]
    ranks += [f"best-{count - i}" for i in range(count)]
    named = []
    for rank, row in zip(ranks, chosen, strict=True):
        name = f"{rank}-{row['id']}.png"
        (folder / f"{row['id']}.png").rename(folder / name)
        named.append((row["id"], name))
    return named


def write_report(
    runs: dict[str, Path],
    release: Path | None,
    out: Path,
    external_roots: Sequence[Path],
    overlay_count: int = 3,
) -> str:
    """Writes the results page and its figures; returns the Markdown."""
    figures = out.parent / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    rows = []
    for key, run in runs.items():
        cfg = TrainConfig.load(run / "config.json")
        rows.append(
            {
                "key": key,
                "label": LABELS.get(key, key),
                "run": run,
                "config": cfg,
                "summary": load_json(run / "summary.json") or {},
                "val": load_json(run / "eval_val.json"),
                "external": load_json(run / "eval_external.json"),
            }
        )

    lines = [
        "# Results: reproducing Boudaieb et al. (2025) and the release models",
        "",
        "Generated by `python -m training.report` (`make report`) from the run directories; rerun it to",
        "regenerate. All metrics are computed by `training/metrics.py` at each image's original mask",
        "resolution, threshold 0.5, through the same pre- and post-processing the service runs.",
        "",
        "## Protocol and what differs from the paper",
        "",
    ]
    for row in rows:
        cfg, summary = row["config"], row["summary"]
        epochs = f"{summary.get('epochs_run', '?')} of {cfg.epochs} epochs"
        lines.append(
            f"- {row['label']}: `{row['run']}` — {cfg.arch}, loss {cfg.loss}, augmentation "
            f"{'on' if cfg.augment else 'off'}, {cfg.image_size}×{cfg.image_size}, batch {cfg.batch_size}, "
            f"{epochs} (best epoch {summary.get('best_epoch', '?')}), Adam {cfg.learning_rate:g}, "
            f"encoder weights `{cfg.encoder_weights}`, precision {cfg.precision}, "
            f"{summary.get('train_images', '?')} training / {summary.get('val_images', '?')} validation."
        )
    stopped_early = [
        row for row in rows if row["summary"].get("epochs_run", row["config"].epochs) < row["config"].epochs
    ]
    if rows and len(stopped_early) == len(rows):
        lines += [
            "",
            "Early stopping (patience "
            + "/".join(sorted({str(row["config"].early_stopping_patience) for row in rows}))
            + ") ended every run before its epoch cap, so a cap below the paper's 50 epochs did not bind.",
        ]
    lines += [
        "",
        "ImageNet weights cannot be downloaded on the machines these runs were made on, so every encoder",
        "here starts from random initialization (`--encoder-weights none`); the paper starts from ImageNet.",
        "",
        "*External* is every image of "
        + ", ".join(f"`{root}`" for root in external_roots)
        + " (the ISIC 2017 training images,",
        "which contain the ISIC 2016 challenge's training and test images; nothing in the data tells the",
        "2016 test part apart, so all are scored). Training never saw them.",
        "",
        "## Comparison (per-image mean; pooled in the JSON files)",
        "",
        "| model | set | n | Dice | Jaccard | sensitivity | specificity | accuracy | thr. Jaccard |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        for name, result in (("PH2 validation", row["val"]), ("external", row["external"])):
            if result is None:
                continue
            mean = result["mean"]
            lines.append(
                f"| {row['label']} | {name} | {result['n_images']} | "
                + " | ".join(fmt(mean[m]) for m in METRICS)
                + f" | {fmt(result['thresholded_jaccard'])} |"
            )
        paper = PAPER.get(row["key"])
        if paper:
            lines.append(
                f"| {row['label']} | paper (ISIC 2016 test) | 379 | "
                + " | ".join(fmt(paper.get(m)) for m in METRICS)
                + " | – |"
            )
    lines.append("")

    with_external = [row for row in rows if row["external"]]
    if len(with_external) > 1:
        ranked = sorted(with_external, key=lambda row: row["external"]["mean"]["dice"], reverse=True)
        lines += [
            "On the external set, by mean Dice: "
            + " > ".join(f"{row['label']} {row['external']['mean']['dice']:.3f}" for row in ranked)
            + ".",
            "",
        ]
    if with_external:
        _bar_chart(with_external, figures / "comparison.png")
        lines += ["![Models compared on the external test set](figures/comparison.png)", ""]
    lines += ["## Training curves", ""]
    for row in rows:
        if (row["run"] / "curves.png").is_file():
            target = figures / f"curves_{row['key']}.png"
            shutil.copyfile(row["run"] / "curves.png", target)
            lines += [f"**{row['label']}**", "", f"![curves]({target.relative_to(out.parent)})", ""]
        history = read_history(row["run"] / "history.csv")
        if history:
            lines.append(
                f"{len(history)} epochs; final learning rate {history[-1].get('learning_rate', 0):.2g}."
            )
            lines.append("")

    if with_external and (with_external[-1]["run"] / "best.keras").is_file():
        best = with_external[-1]
        folder = figures / f"overlays_{best['key']}"
        names = _overlays(best["run"], best["external"], external_roots, folder, overlay_count)
        by_id = {row["id"]: row["dice"] for row in best["external"]["per_image"]}
        lines += [
            f"## External-test overlays: {best['label']}",
            "",
            "Worst, median and best images by Dice (green: expert outline, red: prediction).",
            "",
        ]
        for image_id, name in names:
            lines += [
                f"{image_id}, Dice {by_id[image_id]:.3f}: ![{name}]({folder.relative_to(out.parent)}/{name})",
                "",
            ]

    if release is not None:
        lines += release_section(release, Path("models") / "dermaseg.json", figures)

    lines.append(INCONSISTENCIES)
    text = "\n".join(lines)
    out.write_text(text)
    return text


#: The release run's validation evaluations that `make release-eval` writes, by post-processing.
RELEASE_VARIANTS = {
    "plain": "none (the service's default)",
    "tta": "flip test-time augmentation",
    "lc": "largest component only",
    "fh": "holes filled",
    "all": "flip TTA + largest component + holes filled",
}


def _training_hours(run: Path, summary: dict[str, Any]) -> str:
    """``" (N h of training steps here)"`` from the history's throughput, or nothing."""
    history = read_history(run / "history.csv")
    train_images = summary.get("train_images")
    speeds = [row.get("images_per_second") for row in history]
    if not train_images or not speeds or not all(speeds):
        return ""
    hours = sum(train_images / speed for speed in speeds) / 3600
    return f" ({hours:.1f} h of training steps here, {len(history)} epochs)"


def release_section(release: Path, card_path: Path, figures: Path) -> list[str]:
    """The release model: how it was trained, the evidence behind its variant, and what it scores."""
    card = load_json(card_path) or {}
    cfg = TrainConfig.load(release / "config.json")
    summary = load_json(release / "summary.json") or {}
    lines = [
        "## Release 1.0.0",
        "",
        f"Release 1.0.0 (its card is `{card_path}` at commit adc9ade; the runs behind this section are "
        "1.0.0's, made before release 2.0.0). "
        f"Trained by `dermaseg train` into `{release}` on {', '.join(f'`{d}`' for d in cfg.data)}: "
        f"{summary.get('train_images', '?')} training / {summary.get('val_images', '?')} validation images "
        f"(seeded split, seed {cfg.seed}, stratified by diagnosis), {cfg.arch} with decoder "
        f"{'/'.join(str(f) for f in cfg.decoder_filters)}, loss {cfg.loss} (α {cfg.focal_alpha}, "
        f"γ {cfg.focal_gamma}), augmentation {'on' if cfg.augment else 'off'}, {cfg.image_size}×"
        f"{cfg.image_size}, batch {cfg.batch_size}, {summary.get('epochs_run', '?')} of {cfg.epochs} epochs "
        f"(best epoch {summary.get('best_epoch', '?')}), Adam {cfg.learning_rate:g} with ReduceLROnPlateau "
        f"({cfg.lr_factor}/{cfg.lr_patience}), encoder weights `{cfg.encoder_weights}`, precision "
        f"{cfg.precision}.",
        "",
        "Why it differs from the paper's schedule: on this 2-core CPU a 224×224 step of the full model",
        "runs at about 6 images/s, so 50 epochs of ~2,000 images would take most of a day; the slimmer",
        "decoder keeps the float16 file under the 64 MiB a model in git may weigh, and 192×192 with a",
        "higher learning rate and a shorter plateau patience fit the run into a few hours"
        + _training_hours(release, summary)
        + ".",
        "",
    ]
    if (release / "curves.png").is_file():
        shutil.copyfile(release / "curves.png", figures / "curves_release.png")
        lines += ["![release training curves](figures/curves_release.png)", ""]

    plain = load_json(release / "eval_val_plain.json")
    if plain is not None:
        lines += [
            "### Post-processing, chosen on the validation split",
            "",
            "Dice change against no post-processing: per-image mean, 95 % interval, images worse / better.",
            "",
            "| post-processing | n | Dice | Jaccard | sensitivity | specificity | ΔDice (95 % CI) "
            "| worse / better |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for key, label in RELEASE_VARIANTS.items():
            result = load_json(release / f"eval_val_{key}.json")
            if result is None:
                continue
            mean = result["mean"]
            delta, half, worse, better = paired_difference(plain, result)
            change = "–" if key == "plain" else f"{delta:+.4f} (±{half:.4f})"
            counts = "–" if key == "plain" else f"{worse} / {better}"
            lines.append(
                f"| {label} | {result['n_images']} | "
                + " | ".join(fmt(mean[m]) for m in METRICS[:4])
                + f" | {change} | {counts} |"
            )
        lines += [
            "",
            "No option's gain is distinguishable from zero at this sample size, while flip TTA costs",
            "three network passes per photo; the service therefore runs none by default and offers each",
            "per request",
            "(`flip_tta`, `largest_component`, `fill_holes`).",
            "",
        ]

    variants = card.get("variants") or {}
    if variants:
        lines += [
            "### Precision variants (measured by `dermaseg export`)",
            "",
            "| precision | size (MiB) | latency batch 1 (ms) | Dice vs float32 | Dice vs truth | images |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for precision, variant in variants.items():
            lines.append(
                f"| {precision}{' (shipped)' if variant.get('file') == card.get('file') else ''} | "
                f"{variant['size_bytes'] / 2**20:.1f} | {variant['latency_ms_batch1']:.1f} | "
                f"{fmt(variant.get('dice_vs_float32'))} | {fmt(variant.get('dice_vs_truth'))} | "
                f"{variant.get('n_images', '–')} |"
            )
        lines += [
            "",
            f"Shipped: {card.get('precision')}, the variant chosen with `--ship` on these figures.",
            "",
        ]

    samples = load_json(release / "eval_samples.json")
    split = load_json(release / "split.json")
    if samples is not None and split is not None:
        seen = {row["id"]: "training" for row in split["train"]}
        seen.update({row["id"]: "validation" for row in split["val"]})
        rows = samples["per_image"]
        unseen = [row["dice"] for row in rows if row["id"] not in seen]
        lines += [
            "### The sample photos at their original size",
            "",
            f"`{samples['data'][0]}`, photos of 765 px to 4288 px as clinics send them. Some are in the "
            "training data (at lower resolution), so only the unseen ones say anything about new photos, "
            "and they are few.",
            "",
            "| photo | in the release run | Dice | Jaccard |",
            "| --- | --- | --- | --- |",
        ]
        lines += [
            f"| {row['id']} | {seen.get(row['id'], 'no')} | {row['dice']:.3f} | {row['jaccard']:.3f} |"
            for row in rows
        ]
        if unseen:
            lines += ["", f"Unseen photos: {len(unseen)}, mean Dice {sum(unseen) / len(unseen):.3f}."]
        lines.append("")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.report", description=__doc__)
    parser.add_argument(
        "--run",
        nargs=2,
        action="append",
        metavar=("KEY", "RUN_DIR"),
        default=None,
        help="a model of the comparison: baseline, focal-noaug or focal-aug, and its run",
    )
    parser.add_argument("--release", type=Path, default=Path("runs/release"))
    parser.add_argument(
        "--external",
        type=Path,
        action="append",
        default=None,
        help="the external test set's folder (for overlays)",
    )
    parser.add_argument("--out", type=Path, default=Path("docs/results.md"))
    args = parser.parse_args(argv)
    runs = {
        key: Path(path)
        for key, path in (
            args.run
            or [
                ("baseline", "runs/repro-baseline"),
                ("focal-noaug", "runs/repro-focal-noaug"),
                ("focal-aug", "runs/repro-focal-aug"),
            ]
        )
    }
    runs = {key: path for key, path in runs.items() if (path / "config.json").is_file()}
    external = args.external or [Path("../shared/data/isic2017_train")]
    release = args.release if (args.release / "config.json").is_file() else None
    write_report(runs, release, args.out, external)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
