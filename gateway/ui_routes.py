"""The live dashboard at ``/ui``: three static files shipped inside the ``gateway`` package.

The files hold no data, so the route is public; the page itself calls the control API and asks
for an API token when that answers 401. Each file is read once, on first request.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from fastapi import APIRouter
from starlette.responses import RedirectResponse, Response

from gateway.errors import ApiError

router = APIRouter(include_in_schema=False)

_TYPES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
# Only the gateway's own origin: no inline script, no third-party resource, no framing.
_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
    "cache-control": "no-cache",
}


@cache
def _read(name: str) -> bytes:
    return (files("gateway") / "ui" / name).read_bytes()


@router.get("/ui")
async def ui_root() -> RedirectResponse:
    """The page lives at ``/ui/`` so that its relative links resolve inside it."""
    return RedirectResponse("ui/", status_code=308)


@router.get("/ui/")
async def ui_index() -> Response:
    return _file("index.html")


@router.get("/ui/{name}")
async def ui_file(name: str) -> Response:
    if name not in _TYPES:
        raise ApiError(404, "unknown_file", f"the dashboard has no file {name!r}")
    return _file(name)


def _file(name: str) -> Response:
    return Response(_read(name), media_type=_TYPES[name], headers=_HEADERS)
