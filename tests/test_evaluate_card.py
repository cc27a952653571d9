"""`dermaseg evaluate --card`: results land in the card of the very file they were measured on."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.onnx_models import write_darkness_model
from training.cli import main


@pytest.fixture
def model_and_card(tmp_path: Path) -> tuple[Path, Path]:
    model = write_darkness_model(tmp_path / "tiny.onnx")
    card = tmp_path / "tiny.json"
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    card.write_text(json.dumps({"name": "tiny", "sha256": digest, "evaluation": []}))
    return model, card


def _evaluate(model: Path, card: Path, data: Path, out: Path, *options: str) -> int:
    return main(
        [
            "evaluate",
            "--model",
            str(model),
            "--data",
            str(data),
            "--out",
            str(out),
            "--card",
            str(card),
            *options,
        ]
    )


def test_results_are_recorded_and_replaced(
    model_and_card: tuple[Path, Path], synthetic_dataset: Path, tmp_path: Path
) -> None:
    model, card = model_and_card
    assert _evaluate(model, card, synthetic_dataset, tmp_path / "a.json") == 0
    assert _evaluate(model, card, synthetic_dataset, tmp_path / "b.json", "--flip-tta") == 0
    assert _evaluate(model, card, synthetic_dataset, tmp_path / "c.json") == 0  # replaces the first

    entries = json.loads(card.read_text())["evaluation"]
    assert [entry["label"] for entry in entries] == ["flip_tta", "plain"]
    measured = json.loads((tmp_path / "c.json").read_text())
    plain = entries[1]
    assert plain["mean"] == measured["mean"] and plain["n_images"] == 6
    assert plain["postprocess"]["flip_tta"] is False and entries[0]["postprocess"]["flip_tta"] is True
    assert "per_image" not in plain and plain["model"] == "tiny.onnx"


def test_a_card_of_another_file_is_refused(
    model_and_card: tuple[Path, Path],
    synthetic_dataset: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, card = model_and_card
    other = write_darkness_model(tmp_path / "other.onnx", gray_level=100.0)
    assert _evaluate(other, card, synthetic_dataset, tmp_path / "m.json") == 2
    err = capsys.readouterr().err
    assert "describes a file with sha256" in err and "Traceback" not in err
    assert json.loads(card.read_text())["evaluation"] == []


def test_each_source_is_scored_on_its_own(model_and_card: tuple[Path, Path], tmp_path: Path) -> None:
    from tests.conftest import make_dataset
    from training.evaluate import evaluate

    model, _ = model_and_card
    first = make_dataset(tmp_path / "first", "normalized", n=3, size=48, seed=0)
    second = make_dataset(tmp_path / "second", "ph2", n=2, size=48, seed=10)

    result = evaluate(model, [first, second])

    per_dataset = result["per_dataset"]
    assert {name: entry["n_images"] for name, entry in per_dataset.items()} == {"first": 3, "ph2": 2}
    assert "per_image" not in per_dataset["ph2"]
    rows = result["per_image"]  # sorted by dataset, then id: the first source's three images come first
    for name, part in (("first", rows[:3]), ("ph2", rows[3:])):
        mean_dice = sum(row["dice"] for row in part) / len(part)
        assert per_dataset[name]["mean"]["dice"] == pytest.approx(mean_dice)
    overall = (3 * per_dataset["first"]["mean"]["jaccard"] + 2 * per_dataset["ph2"]["mean"]["jaccard"]) / 5
    assert result["mean"]["jaccard"] == pytest.approx(overall)
