"""The Makefile, dry-run: the leave-one-source-out target trains without the held-out source and scores on it,
a release exports the checkpoint its recipe names, and
release-score scores the candidate and the previous release on the same photos."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _loso_commands(*variables: str) -> tuple[list[str], list[str]]:
    """The --data folders of `make loso`'s training and of its scoring, from a dry run."""
    out = subprocess.run(
        ["make", "-n", "loso", "NAME=dry", "DATA=/data", *variables],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.replace("\\\n", " ")
    train = next(line for line in out.splitlines() if "dermaseg train --data" in line)
    score = next(line for line in out.splitlines() if "dermaseg evaluate" in line)
    return re.findall(r"--data (\S+)", train), re.findall(r"--data (\S+)", score)


@pytest.mark.parametrize(
    ("held_out", "trained_on"),
    [
        (None, ["/data/ph2", "/data/ham10000"]),
        ("ham10000", ["/data/ph2", "/data/isic2017_train"]),
        ("ph2", ["/data/isic2017_train", "/data/ham10000"]),
    ],
)
def test_loso_holds_one_source_out(held_out: str | None, trained_on: list[str]) -> None:
    train, score = _loso_commands(*([f"HELD_OUT={held_out}"] if held_out else []))
    assert train == trained_on
    assert score == [f"/data/{held_out or 'isic2017_train'}"]


@pytest.mark.parametrize(("release", "checkpoint"), [("2.2.0", "best.keras"), ("2.3.0", "last.keras")])
def test_a_release_exports_the_checkpoint_its_recipe_names(release: str, checkpoint: str) -> None:
    out = subprocess.run(
        ["make", "-n", "release-export", f"RELEASE={release}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"--checkpoint runs/release-{release}/{checkpoint} " in out


def test_release_score_runs_the_candidate_and_the_previous_release_on_one_split() -> None:
    out = subprocess.run(
        ["make", "-n", "release-score", "RELEASE=2.4.0", "DATA=/data"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.replace("\\\n", " ")
    evaluations = [line for line in out.splitlines() if "dermaseg evaluate" in line]
    assert len(evaluations) == 2
    models = [re.findall(r"--model (\S+)", line)[0] for line in evaluations]
    assert models == ["runs/release-2.4.0/model/dermaseg.onnx", "runs/v2.3.0/dermaseg.onnx"]
    for line in evaluations:
        assert "--split runs/release-2.4.0/split.json" in line
        assert re.findall(r"--data (\S+)", line) == ["/data/ph2", "/data/isic2017_train", "/data/ham10000"]
