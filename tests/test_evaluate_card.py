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
