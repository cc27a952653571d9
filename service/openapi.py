"""``python -m service.openapi``: writes the API contract to ``openapi/openapi.json`` (committed).

``--check`` writes nothing and exits 1 when the committed file differs from what the app generates (a test
does the same). The document is built from the app with default settings and no model: it depends on the
code only.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from service.config import PACKAGE_ROOT, Settings
from service.main import create_app

OPENAPI_PATH = PACKAGE_ROOT / "openapi" / "openapi.json"


def build_openapi() -> dict[str, Any]:
    """The OpenAPI document of the app built with default settings (the environment is not read)."""
    return create_app(Settings.model_construct()).openapi()


def render_openapi() -> str:
    """The document as committed: indented JSON with a final newline."""
    return json.dumps(build_openapi(), indent=2, ensure_ascii=False) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.openapi", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OPENAPI_PATH, help=f"default: {OPENAPI_PATH}")
    parser.add_argument("--check", action="store_true", help="exit 1 if --out is not up to date")
    args = parser.parse_args(argv)
    text = render_openapi()
    if args.check:
        current = args.out.read_text() if args.out.is_file() else ""
        if current != text:
            print(f"{args.out} is out of date: run `python -m service.openapi`", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
