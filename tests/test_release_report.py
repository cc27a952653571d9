"""`python -m training.release_report`: the release 2.0.0 section, computed from the run's files, in place."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.config import TrainConfig
from training.release_report import BEGIN, END, main, update_page

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
    release = tmp_path / "release-2.0.0"
    release.mkdir()
    TrainConfig(data=["a/ph2", "a/isic2017_train", "a/ham10000"], loss="focal+jaccard", image_size=192).save(
        release / "config.json"
    )
    split = {"train": [{"id": "ISIC_0030001", "dataset": "ham10000"}], "val": []}
    split["val"] = [{"id": key, "dataset": source} for key, source in SOURCES.items()]
    (release / "split.json").write_text(json.dumps(split))
    old = {"ISIC_0000001": 0.5, "ISIC_0000002": 0.9, "IMD002": 0.8, "ISIC_0030000": 0.6}
    new = {"ISIC_0000001": 0.7, "ISIC_0000002": 0.9, "IMD002": 0.8, "ISIC_0030000": 0.8}
    (release / "v1_val_plain.json").write_text(json.dumps(_evaluation(old)))
    (release / "eval_val_plain.json").write_text(json.dumps(_evaluation(new)))
    (release / "eval_val_t0.4.json").write_text(
        json.dumps(_evaluation({**new, "ISIC_0000001": 0.75}) | {"threshold": 0.4})
    )
    for name, value in (("base", 0.6), ("bundle", 0.7)):
        loso = tmp_path / f"loso-{name}"
        loso.mkdir()
        TrainConfig(data=["a/ph2", "a/ham10000"], image_size=128, epochs=12, steps_per_epoch=60).save(
            loso / "config.json"
        )
        (loso / "eval_held_out.json").write_text(
            json.dumps(_evaluation({"ISIC_1": value, "ISIC_2": value + 0.1}))
        )
    return tmp_path


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
    (at_04,) = evidence["threshold_on_validation"].items()
    assert at_04[0] == "0.4" and at_04[1]["jaccard"] == pytest.approx(0.8125)
