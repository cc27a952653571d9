"""`python -m training.release_report`: a release's section, computed from the run's files, in place."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.config import TrainConfig
from training.release_report import main, markers, update_page

BEGIN, END = markers("2.0.0")

SOURCES = {
    "ISIC_0000001": "isic2017_train",
    "ISIC_0000002": "isic2017_train",
    "IMD002": "ph2",
    "ISIC_0030000": "ham10000",
}


def _evaluation(jaccards: dict[str, float]) -> dict:
    rows = [{"id": key, "jaccard": value, "dice": 2 * value / (1 + value)} for key, value in jaccards.items()]
    mean = {"dice": 0.9, "jaccard": 0.8, "sensitivity": 0.85, "specificity": 0.97, "accuracy": 0.95}
    return {
        "n_images": len(rows),
        "per_image": rows,
        "mean": mean,
        "per_dataset": {source: {"mean": mean} for source in set(SOURCES.values())},
        "data": ["../shared/data/isic2017_train"],
    }


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    previous = tmp_path / "v1.0.0"
    previous.mkdir()
    (previous / "recovered.keras").write_bytes(b"")
    (previous / "dermaseg.json").write_text(
        json.dumps({"version": "1.0.0", "training": {"config": TrainConfig(image_size=224).to_json()}})
    )
    release = tmp_path / "release-2.0.0"
    release.mkdir()
    TrainConfig(
        data=["a/ph2", "a/isic2017_train", "a/ham10000"],
        loss="focal+jaccard",
        image_size=192,
        init_from=str(previous / "recovered.keras"),
        precision="mixed_bfloat16",
    ).save(release / "config.json")
    split = {"train": [{"id": "ISIC_0030001", "dataset": "ham10000"}], "val": []}
    split["val"] = [{"id": key, "dataset": source} for key, source in SOURCES.items()]
    (release / "split.json").write_text(json.dumps(split))
    old = {"ISIC_0000001": 0.5, "ISIC_0000002": 0.9, "IMD002": 0.8, "ISIC_0030000": 0.6}
    new = {"ISIC_0000001": 0.7, "ISIC_0000002": 0.9, "IMD002": 0.8, "ISIC_0030000": 0.8}
    (release / "previous_val_plain.json").write_text(json.dumps(_evaluation(old)))
    (release / "eval_val_plain.json").write_text(json.dumps(_evaluation(new)))
    (release / "eval_val_t0.4.json").write_text(
        json.dumps(_evaluation({**new, "ISIC_0000001": 0.75}) | {"threshold": 0.4})
    )
    (release / "eval_val_t0.45.json").write_text(
        json.dumps(_evaluation({**new, "ISIC_0000001": 0.66}) | {"threshold": 0.45})
    )
    for name, value in (("base", 0.6), ("bundle", 0.7)):
        _loso_run(tmp_path, name, value)
    return tmp_path


def _loso_run(runs: Path, name: str, value: float, **options) -> None:
    """runs/loso-NAME: a LOSO run's config (``options`` on top of the shared recipe) and its two scores."""
    loso = runs / f"loso-{name}"
    loso.mkdir()
    TrainConfig(data=["a/ph2", "a/ham10000"], image_size=128, epochs=12, steps_per_epoch=60, **options).save(
        loso / "config.json"
    )
    (loso / "eval_held_out.json").write_text(
        json.dumps(_evaluation({"ISIC_1": value, "ISIC_2": value + 0.1}))
    )


def _loso_report(runs: Path, names: tuple[str, ...]) -> str:
    """The release section written with the LOSO runs ``names`` (the first is the base)."""
    page = runs / "results.md"
    page.write_text("# Results\n")
    loso = [item for name in names for item in ("--loso", name, str(runs / f"loso-{name}"))]
    arguments = [
        "--release",
        str(runs / "release-2.0.0"),
        *loso,
        "--card",
        str(runs / "none.json"),
        "--out",
        str(page),
    ]
    assert main(arguments) == 0
    return _section(page.read_text())


def _section(page: str) -> str:
    return page[page.index(BEGIN) : page.index(END)]


def test_the_section_is_computed_from_the_runs_and_replaces_only_itself(runs: Path) -> None:
    page = runs / "results.md"
    page.write_text(
        "# Results\n\n## The release model\n\n1.0.0 stays.\n\n## The paper's inconsistencies\n\nx\n"
    )
    arguments = ["--release", str(runs / "release-2.0.0"), "--loso", "base", str(runs / "loso-base"),
                 "--loso", "bundle", str(runs / "loso-bundle"), "--card", str(runs / "none.json"),
                 "--out", str(page)]  # fmt: skip

    assert main(arguments) == 0
    text = page.read_text()
    assert text.index("1.0.0 stays.") < text.index(BEGIN) < text.index("## The paper's inconsistencies")
    section = _section(text)
    # 1.0.0 → 2.0.0 over the four photos: Jaccard 0.700 → 0.800, one failure (< 0.65) → none.
    assert "| all sources | 4 | 0.700 → 0.800 | +0.100" in section
    assert (
        "| isic2017_train | 2 | 0.700 → 0.800 |" in section and "| ham10000 | 1 | 0.600 → 0.800 |" in section
    )
    assert "| 2 → 0 |" in section.split("| all sources |")[1].splitlines()[0]
    assert "| `bundle` | 0.750 |" in section and "| `base` | 0.650 |" in section
    assert "That held for `bundle`." in section
    assert "| threshold 0.4 | 0.812 |" in section
    assert section.index("| threshold 0.4 | 0.812 |") < section.index("| threshold 0.45 | 0.790 |")
    assert "| ham10000 | 1 | 1 | HAM10000 images and Tschandl et al.'s lesion masks: CC BY-NC 4.0" in section
    assert "trained on ph2 + ham10000 only" in section and "128², 12 epochs × 60 steps of 16" in section

    assert main(arguments) == 0
    assert page.read_text() == text, "rerunning rewrites the same section, once"


def test_a_page_without_the_section_gets_it_at_the_end() -> None:
    assert update_page("# Results\n", [BEGIN, "x", END]).endswith(f"{BEGIN}\nx\n{END}\n")


def test_the_card_gets_the_evidence_behind_the_recipe_and_the_threshold(runs: Path) -> None:
    card = runs / "card.json"
    card.write_text(json.dumps({"version": "2.0.0", "sha256": "x"}))
    arguments = ["--release", str(runs / "release-2.0.0"), "--loso", "base", str(runs / "loso-base"),
                 "--loso", "bundle", str(runs / "loso-bundle"), "--card", str(card),
                 "--out", str(runs / "results.md"), "--write-card"]  # fmt: skip

    assert main(arguments) == 0

    written = json.loads(card.read_text())
    assert written["sha256"] == "x", "the rest of the card stays"
    evidence = written["recipe_evidence"]
    paired = evidence["leave_one_source_out"]["paired_vs_base"]["bundle"]["jaccard"]
    assert paired["mean"] == pytest.approx(0.1) and paired["better"] == 2
    assert evidence["leave_one_source_out"]["recipes"]["bundle"]["image_size"] == 128
    assert evidence["against_previous_release_on_validation"]["jaccard"]["mean"] == pytest.approx(0.1)
    thresholds = evidence["threshold_on_validation"]
    assert list(thresholds) == ["0.4", "0.45"]
    assert thresholds["0.4"]["jaccard"] == pytest.approx(0.8125)
    assert thresholds["0.45"]["jaccard"] == pytest.approx(0.79)


def _run_report(runs: Path, *extra: str) -> str:
    page = runs / "results.md"
    arguments = ["--release", str(runs / "release-2.0.0"), "--card", str(runs / "candidate.json"),
                 "--shipped-card", str(runs / "shipped.json"), "--out", str(page), *extra]  # fmt: skip
    assert main(arguments) == 0
    return _section(page.read_text())


def test_the_recipe_table_sets_the_release_beside_the_one_it_started_from(runs: Path) -> None:
    section = _run_report(runs)
    assert "| release 1.0.0 | release 2.0.0 |" in section
    assert "| input | 224² | 224² | 192² |" in section, "paper default, 1.0.0's own recipe, the candidate"
    assert "| precision | float32 | float32 | mixed_bfloat16 |" in section
    assert "### Against release 1.0.0, on the same validation photos" in section


def test_a_candidate_is_called_shipped_only_when_models_holds_the_same_file(runs: Path) -> None:
    (runs / "candidate.json").write_text(json.dumps({"version": "2.0.0", "sha256": "new"}))
    (runs / "shipped.json").write_text(json.dumps({"version": "1.0.0", "sha256": "old"}))
    section = _run_report(runs, "--write-card")
    assert "It is not the shipped model" in section
    assert "recipe_evidence" in json.loads((runs / "candidate.json").read_text())
    assert "recipe_evidence" not in json.loads((runs / "shipped.json").read_text()), "another model's card"

    (runs / "shipped.json").write_text((runs / "candidate.json").read_text())
    section = _run_report(runs, "--write-card")
    assert "It is the shipped model" in section
    shipped = json.loads((runs / "shipped.json").read_text())
    assert shipped["recipe_evidence"]["against_previous_release_on_validation"]["previous"] == "1.0.0"
    per_source = shipped["recipe_evidence"]["against_previous_release_on_validation"]["per_source"]
    assert per_source["ham10000"]["jaccard"]["mean"] == pytest.approx(0.2)


def _counted(rows: dict[str, tuple[float, int, int, int, int]]) -> dict:
    """An evaluation whose rows carry pixel counts: id → (Jaccard, tp, fp, fn, tn)."""
    counted = {key: value[0] for key, value in rows.items()}
    evaluation = _evaluation(counted)
    for row in evaluation["per_image"]:
        row.update(zip(("tp", "fp", "fn", "tn"), rows[row["id"]][1:], strict=True))
    return evaluation


def test_the_failures_are_shown_by_kind_where_the_rows_carry_pixel_counts(runs: Path) -> None:
    assert "### The failures, by kind" not in _run_report(runs), "the fixture's rows have no pixel counts"
    release = runs / "release-2.0.0"
    # 100-pixel frames. 1.0.0 misses half of ISIC_0000001's lesion and adds 40 pixels of skin to
    # ISIC_0030000's, which fills 60 % of the frame; 2.0.0 outlines every photo at 0.7 or better.
    old = {"ISIC_0000001": (0.5, 10, 0, 10, 80), "ISIC_0000002": (0.9, 9, 0, 1, 90),
           "IMD002": (0.8, 8, 0, 2, 90), "ISIC_0030000": (0.6, 60, 40, 0, 0)}  # fmt: skip
    new = {**old, "ISIC_0000001": (0.7, 14, 0, 6, 80), "ISIC_0030000": (0.8, 60, 15, 0, 25)}
    (release / "previous_val_plain.json").write_text(json.dumps(_counted(old)))
    (release / "eval_val_plain.json").write_text(json.dumps(_counted(new)))

    section = _run_report(runs)

    assert "### The failures, by kind" in section
    assert "| all sources | 2 → 0 | 1 → 0 | 1 → 0 | 0 → 0 of 0 | 1 → 0 of 3 | 1 → 0 of 1 |" in section
    assert "| ham10000 | 1 → 0 | 0 → 0 | 1 → 0 | 0 → 0 of 0 | 0 → 0 of 0 | 1 → 0 of 1 |" in section


def test_the_shipping_rule_is_judged_on_the_paired_comparison(runs: Path) -> None:
    # ISIC 2017: 0.5 → 0.7 and 0.9 → 0.9, too few photos for an interval above 0.
    section = _run_report(runs, "--rule", "isic2017_train:0.005")
    assert "The rule was not met, so it did not replace 1.0.0." in section

    release = runs / "release-2.0.0"
    steady = {"ISIC_0000001": 0.6, "ISIC_0000002": 1.0, "IMD002": 0.8, "ISIC_0030000": 0.8}
    (release / "eval_val_plain.json").write_text(json.dumps(_evaluation(steady)))
    section = _run_report(runs, "--rule", "isic2017_train:0.005")
    assert "here +0.100 [+0.100, +0.100]" in section and "The rule was met." in section

    worse = {**steady, "ISIC_0030000": 0.1}  # pooled −0.05 with ISIC 2017 still +0.1 throughout
    (release / "eval_val_plain.json").write_text(json.dumps(_evaluation(worse)))
    assert "The rule was not met" in _run_report(runs, "--rule", "isic2017_train:0.005")


def test_a_second_release_gets_its_own_section_after_the_first(runs: Path) -> None:
    page = runs / "results.md"
    page.write_text(
        "# Results\n\n" + "\n".join([BEGIN, "2.0.0 stays.", END]) + "\n\n## The paper's inconsistencies\n"
    )
    arguments = ["--release", str(runs / "release-2.0.0"), "--version", "2.1.0", "--out", str(page)]
    assert main(arguments) == 0
    text = page.read_text()
    begin, end = markers("2.1.0")
    assert text.index("2.0.0 stays.") < text.index(begin) < text.index(end) < text.index("## The paper's")
    assert "## Release 2.1.0" in text


@pytest.mark.parametrize(
    ("checkpoint", "expected"),
    [
        ("runs/release-2.0.0/best.keras", "The model file holds that epoch's weights (`best.keras`)."),
        (
            "runs/release-2.0.0/last.keras",
            "The model file holds the last epoch's weights (`last.keras`, epoch 2).",
        ),
    ],
)
def test_the_section_says_which_epoch_the_model_file_holds(
    runs: Path, checkpoint: str, expected: str
) -> None:
    release = runs / "release-2.0.0"
    (release / "history.csv").write_text(
        "epoch,images_per_second,learning_rate,val_loss,val_jaccard,val_sensitivity\n"
        "0,6.0,5e-05,0.30,0.85,0.90\n"
        "1,6.5,1e-06,0.31,0.86,0.91\n"
    )
    (release / "summary.json").write_text(json.dumps({"best_epoch": 1}))
    (runs / "candidate.json").write_text(
        json.dumps({"version": "2.0.0", "export": {"checkpoint": checkpoint}})
    )
    section = _run_report(runs)
    assert f"lowest validation loss at epoch 1. {expected}" in section


def test_a_seed_control_sets_how_far_an_option_must_gain(runs: Path) -> None:
    # base 0.65; `seed` is base's recipe with seed 43 at 0.50 (0.150 off); `bundle` gains +0.100, with every
    # photo better, and `sog` +0.200: only sog gains more than the seed alone moves the check.
    _loso_run(runs, "seed", 0.45, seed=43)
    _loso_run(runs, "sog", 0.8, color_constancy=True)
    section = _loso_report(runs, ("base", "seed", "bundle", "sog"))

    assert "| `seed` (base, seed 43) | 0.500 |" in section and "| `sog` | 0.850 |" in section
    assert "Retraining alone moves this check by up to 0.150 Jaccard" in section
    assert "and by more than that (0.150). That held for `sog`." in section


def test_without_a_winner_over_the_seed_control_none_is_kept(runs: Path) -> None:
    _loso_run(runs, "seed", 0.2, seed=7)
    section = _loso_report(runs, ("base", "seed", "bundle"))

    assert "by up to 0.400 Jaccard" in section
    assert "None did: at this size and length the check cannot tell them from retraining." in section
