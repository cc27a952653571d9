"""`python -m training.compare`: two evaluations of the same photos, compared photo by photo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.compare import ComparisonError, compare, load_evaluation, main


def _write(path: Path, jaccards: dict[str, float]) -> Path:
    rows = [{"id": key, "jaccard": value, "dice": 2 * value / (1 + value)} for key, value in jaccards.items()]
    path.write_text(json.dumps({"n_images": len(rows), "per_image": rows}))
    return path


# A: 0.8, 0.6 (a failure), 0.9, 0.5 (a failure); B: 0.85, 0.7, 0.9, 0.4 (one failure).
A = {"p1": 0.8, "p2": 0.6, "p3": 0.9, "p4": 0.5}
B = {"p1": 0.85, "p2": 0.7, "p3": 0.9, "p4": 0.4, "extra": 0.99}  # "extra" has no pair: left out


def test_comparison_by_hand(tmp_path: Path) -> None:
    result = compare(
        load_evaluation(_write(tmp_path / "a.json", A)), load_evaluation(_write(tmp_path / "b.json", B))
    )
    assert result["paired"] == 4
    assert result["base"] == {
        "n": 4,
        "jaccard": pytest.approx(0.7),
        "thresholded_jaccard": pytest.approx((0.8 + 0 + 0.9 + 0) / 4),
        "failures": 2,
    }
    assert result["other"]["jaccard"] == pytest.approx(0.7125)
    assert result["other"]["thresholded_jaccard"] == pytest.approx((0.85 + 0.7 + 0.9 + 0) / 4)
    assert result["other"]["failures"] == 1
    # Jaccard differences +0.05, +0.1, 0, −0.1: mean 0.0125, sample sd 0.0853913, half-width 1.96 sd / 2.
    jaccard = result["jaccard"]
    assert jaccard["mean"] == pytest.approx(0.0125)
    half = 1.96 * 0.08539126 / 2
    assert jaccard["ci95"] == pytest.approx([0.0125 - half, 0.0125 + half], rel=1e-5)
    assert (jaccard["worse"], jaccard["better"]) == (1, 2)
    # Thresholded: +0.05, +0.7 (p2 no longer fails), 0, 0 (p4 fails both times).
    assert result["thresholded_jaccard"]["mean"] == pytest.approx(0.1875)
    assert (result["thresholded_jaccard"]["worse"], result["thresholded_jaccard"]["better"]) == (0, 2)


def test_command_prints_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main([str(_write(tmp_path / "a.json", A)), str(_write(tmp_path / "b.json", B))])
    out = capsys.readouterr().out
    assert code == 0
    assert "0.7000" in out and "0.7125" in out and "failures (<0.65)" in out
    assert "Jaccard              +0.0125" in out and "1 / 2" in out
    assert main(["--json", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    assert json.loads(capsys.readouterr().out)["paired"] == 4


def test_bad_inputs_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _write(tmp_path / "a.json", A)
    other_photos = _write(tmp_path / "c.json", {"q1": 0.5})
    assert main([str(a), str(other_photos)]) == 2
    assert "share no image id" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text("{")
    assert main([str(a), str(tmp_path / "broken.json")]) == 2
    assert "not an evaluation" in capsys.readouterr().err
    twice = tmp_path / "twice.json"
    twice.write_text(json.dumps({"per_image": [{"id": "p1", "jaccard": 0.5}, {"id": "p1", "jaccard": 0.6}]}))
    with pytest.raises(ComparisonError, match="occurs 2 times"):
        load_evaluation(twice)
