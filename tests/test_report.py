"""`python -m training.report`: the release section's evidence is computed from the evaluations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.config import TrainConfig
from training.report import paired_difference, release_section


def _evaluation(dice: dict[str, float]) -> dict[str, object]:
    rows = [{"id": key, "dice": value, "jaccard": value / (2 - value)} for key, value in dice.items()]
    mean = {
        m: sum(r["dice"] for r in rows) / len(rows) for m in ("dice", "jaccard", "sensitivity", "specificity")
    }
    return {"n_images": len(rows), "mean": mean, "per_image": rows, "data": ["somewhere"]}


def test_paired_difference() -> None:
    base = _evaluation({"a": 0.8, "b": 0.9, "c": 0.7})
    other = _evaluation({"a": 0.9, "b": 0.9, "c": 0.6, "d": 0.1})  # "d" has no pair: ignored
    mean, half, worse, better = paired_difference(base, other)
    assert mean == pytest.approx(0.0)
    assert half == pytest.approx(1.96 * 0.1 / 3**0.5)
    assert (worse, better) == (1, 1)


def test_release_section(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    TrainConfig(data=["d"], out=str(run), image_size=96, epochs=3).save(run / "config.json")
    (run / "summary.json").write_text(json.dumps({"train_images": 40, "val_images": 2, "epochs_run": 3}))
    (run / "history.csv").write_text("epoch,images_per_second\n0,4\n1,4\n2,2\n")
    (run / "eval_val_plain.json").write_text(json.dumps(_evaluation({"a": 0.8, "b": 0.6})))
    (run / "eval_val_tta.json").write_text(json.dumps(_evaluation({"a": 0.9, "b": 0.7})))
    (run / "split.json").write_text(json.dumps({"train": [{"id": "a"}], "val": [{"id": "b"}]}))
    (run / "eval_samples.json").write_text(json.dumps(_evaluation({"a": 0.5, "x": 0.9, "y": 0.7})))
    card = tmp_path / "card.json"
    variant = {"size_bytes": 2**20, "latency_ms_batch1": 5.0, "dice_vs_float32": 1.0, "n_images": 2}
    card.write_text(
        json.dumps(
            {"file": "m.onnx", "precision": "float16", "variants": {"float16": {**variant, "file": "m.onnx"}}}
        )
    )
    figures = tmp_path / "figures"
    figures.mkdir()

    text = "\n".join(release_section(run, card, figures))
    assert "(0.0 h of training steps here, 3 epochs)" in text  # 40/4 + 40/4 + 40/2 s
    assert "| flip test-time augmentation | 2 | 0.800 |" in text and "+0.1000 (±0.0000) | 0 / 2 |" in text
    assert "| float16 (shipped) | 1.0 | 5.0 | 1.000 |" in text
    assert "| x | no | 0.900 |" in text and "| a | training | 0.500 |" in text
    assert "Unseen photos: 2, mean Dice 0.800." in text
