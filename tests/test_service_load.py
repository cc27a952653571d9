"""The load run in full (tests/load_run.py, also ``make load``): 2,000 requests at concurrency 16 mixing
good photos and bad inputs against the shipped model on loopback, then a burst beyond the queue.

About a minute on two cores. It fails on any unexpected status or code, any good answer whose mask differs
from the same photo's sent alone, resident memory growth of 10 % or more after warm-up, a burst never
refused with 503 + Retry-After, or a service not ready afterwards.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from service.config import DEFAULT_MODEL_PATH
from tests.load_run import run, summary


@pytest.mark.slow
def test_load_run(tmp_path: Path) -> None:
    if not DEFAULT_MODEL_PATH.is_file():
        pytest.skip(f"the shipped model is not at {DEFAULT_MODEL_PATH}")
    report = run(DEFAULT_MODEL_PATH, requests=2000, concurrency=16, workdir=tmp_path, log=lambda _: None)
    print(summary(report))
    assert report.passed, summary(report)
    assert report.mixed.requests == 2000
    assert report.bad_kinds >= 20
    assert report.mixed.good_answers >= 1000  # half the requests are good photos
    assert set(report.mixed.statuses) >= {"200", "400", "413", "415", "422"}
    assert report.saturation.statuses.get("503", 0) > 0
    assert report.rss_growth < 0.10
