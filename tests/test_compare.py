"""`python -m training.compare`: two evaluations of the same photos, compared photo by photo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.compare import ComparisonError, compare, failure_kinds, load_evaluation, main


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


def _counted(jaccard: float, tp: int, fp: int, fn: int, tn: int, key: str) -> dict:
    return {"id": key, "jaccard": jaccard, "tp": tp, "fp": fp, "fn": fn, "tn": tn}


# 100-pixel frames: a small lesion outlined well; an under-segmented failure (half the lesion missed); an
# over-segmented one (60 pixels of skin added); a lesion filling the frame, 40 % missed; one row without
# pixel counts, left out.
COUNTED = [
    _counted(0.8, tp=4, fp=0, fn=1, tn=95, key="small"),
    _counted(0.5, tp=10, fp=0, fn=10, tn=80, key="under"),
    _counted(0.4, tp=40, fp=60, fn=0, tn=0, key="over"),
    _counted(0.6, tp=60, fp=0, fn=40, tn=0, key="filling"),
    {"id": "uncounted", "jaccard": 0.1},
]


def test_failures_are_counted_by_kind_and_by_the_lesions_share_of_the_frame() -> None:
    kinds = failure_kinds({"per_image": COUNTED})
    assert (kinds["photos"], kinds["failures"]) == (4, 3)
    assert (kinds["under_segmented"], kinds["over_segmented"]) == (2, 1)
    assert kinds["by_lesion_share"] == {
        "< 10 %": {"photos": 1, "failures": 0},
        "10–50 %": {"photos": 2, "failures": 2},
        "≥ 50 %": {"photos": 1, "failures": 1},
    }


def test_the_command_says_how_the_failures_failed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fixed = {"jaccard": 0.9, "tp": 18, "fp": 0, "fn": 2, "tn": 80}
    better = [{**row, **fixed} if row["id"] == "under" else row for row in COUNTED]
    for name, rows in (("a.json", COUNTED), ("b.json", better)):
        (tmp_path / name).write_text(json.dumps({"per_image": rows}))
    assert main([str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    assert "failures under- / over-segmented: A 2 / 1, B 1 / 1" in capsys.readouterr().out


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
