"""Markdown for the report: tables and the number formats every section uses."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def number(value: float | None, digits: int = 1) -> str:
    """``value`` with thousands separators and ``digits`` decimals; "–" for None, NaN or infinity."""
    if value is None or (isinstance(value, float) and (math.isnan(value) or math.isinf(value))):
        return "–"
    return f"{value:,.{digits}f}"


def percent(value: float | None, digits: int = 0) -> str:
    """A fraction as a percentage; "–" for None or NaN."""
    return "–" if value is None or math.isnan(value) else f"{value * 100:.{digits}f} %"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (numbers right-aligned is left to the renderer)."""
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
