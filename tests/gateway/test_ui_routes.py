"""The dashboard's files at ``/ui``: served by the gateway itself, public, locked to its own
origin, and shipped as package data."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from collections.abc import AsyncIterator
from importlib.resources import files
from typing import Any

import httpx
import pytest

from gateway import create_app
from gateway.ui_routes import router
from tests.conftest import ROOT, fast_settings

TOKEN = "api-token-0123456789"
FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}


@pytest.fixture
async def client(fake_redis: Any, fake_sync_redis: Any) -> AsyncIterator[httpx.AsyncClient]:
    settings = fast_settings(redis_url="redis://unused", api_token=TOKEN, signing_key="k" * 32)
    app = create_app(settings, redis=fake_redis, sync=fake_sync_redis)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
        yield c


async def test_ui_redirects_to_the_page_which_loads_its_own_script_and_styles(
    client: httpx.AsyncClient,
) -> None:
    resp = await client.get("/ui")
    assert resp.status_code == 308
    assert resp.headers["location"] == "ui/"
    page = await client.get("/ui/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert 'src="app.js"' in page.text
    assert 'href="style.css"' in page.text


async def test_the_files_are_public_while_the_api_needs_a_token(
    client: httpx.AsyncClient,
) -> None:
    assert (await client.get("/v1/sessions")).status_code == 401
    for name, media_type in FILES.items():
        resp = await client.get(f"/ui/{name}")
        assert resp.status_code == 200, name
        assert resp.headers["content-type"].startswith(media_type), name
        csp = resp.headers["content-security-policy"]
        assert "script-src 'self'" in csp
        assert "connect-src 'self'" in csp
        assert resp.headers["x-content-type-options"] == "nosniff"


async def test_only_the_dashboard_files_are_served(client: httpx.AsyncClient) -> None:
    for path in ("/ui/ui_routes.py", "/ui/py.typed", "/ui/index.htm"):
        resp = await client.get(path)
        assert resp.status_code == 404, path
        assert resp.json()["error"]["code"] == "unknown_file", path
    assert (await client.get("/ui/..%2Fapp.py")).status_code == 404


def test_the_page_loads_nothing_from_elsewhere() -> None:
    for name in FILES:
        text = (files("gateway") / "ui" / name).read_text()
        assert not re.search(r"(src|href)=\"(https?:)?//", text), name
        assert "import(" not in text, name


def test_every_dashboard_file_is_package_data_and_hidden_from_the_schema() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["gateway"]
    for name in FILES:
        assert any(fnmatch.fnmatch(f"ui/{name}", p) for p in patterns), name
    assert all(not getattr(r, "include_in_schema", True) for r in router.routes)
