"""``GET /``: the viewer, one static page (HTML, CSS, plain JavaScript) that calls ``POST /segment``.

The files live in ``service/viewer/`` and are read once, when the router is built. Everything the page
needs comes from this origin: its Content-Security-Policy allows nothing else (no CDN, no inline script,
no other origin to connect to), which also keeps an injected script from sending a photo elsewhere.
The routes are not part of the API contract (they are left out of the OpenAPI document).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

#: The page's files, in the ``service`` package (package data).
VIEWER_FILES = resources.files("service") / "viewer"

#: URL prefix of the page's assets (the page itself is ``/``).
ASSET_PREFIX = "/viewer/"

#: Files served under :data:`ASSET_PREFIX`, with their media types.
ASSETS = {
    "viewer.css": "text/css; charset=utf-8",
    "viewer.js": "text/javascript; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}

#: Same origin only. ``blob:`` for the mask download link's images; no inline script or style.
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' blob:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)

#: Sent with the page and its assets.
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    # Revalidate on every load, so that a new release's page never runs against an old script.
    "Cache-Control": "no-cache",
}


def _read(name: str) -> bytes:
    return (VIEWER_FILES / name).read_bytes()


def build_router() -> APIRouter:
    """The page and its assets, read from the package now (a missing file fails the app's creation)."""
    router = APIRouter(include_in_schema=False)
    page = _read("index.html")
    assets = {name: (_read(name), media_type) for name, media_type in ASSETS.items()}

    @router.get("/")
    async def viewer_page() -> Response:
        """The viewer page."""
        return Response(page, media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)

    for name, (content, media_type) in assets.items():
        router.add_api_route(
            ASSET_PREFIX + name,
            _asset_endpoint(content, media_type),
            methods=["GET"],
            name=f"viewer_{name}",
        )
    return router


def _asset_endpoint(content: bytes, media_type: str) -> Callable[[], Awaitable[Response]]:
    async def asset() -> Response:
        return Response(content, media_type=media_type, headers=SECURITY_HEADERS)

    return asset
