"""The one error of the export: bad arguments, missing files, or a result that failed a check."""

from __future__ import annotations


class ExportError(ValueError):
    """The export cannot be done (bad arguments, missing files) or its result failed a check."""
