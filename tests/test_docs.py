"""The README's operator tables stay in step with the code they describe."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.config import Settings
from service.errors import ERROR_CODES

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


@pytest.mark.parametrize("name", sorted(Settings.model_fields))
def test_every_setting_is_documented(name: str) -> None:
    assert f"`DERMASEG_{name.upper()}`" in README, f"README lacks DERMASEG_{name.upper()}"


@pytest.mark.parametrize(("code", "status"), sorted(ERROR_CODES.items()))
def test_every_error_code_is_documented(code: str, status: int) -> None:
    assert f"`{code}` {status}" in README, f"README's error list lacks {code} ({status})"
