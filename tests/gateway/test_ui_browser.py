"""The dashboard at ``/ui`` in a real headless Chromium, driven by Playwright, against real
processes: a redis-server, a ``python -m gateway``, a ``python -m workers`` and the scripted
upstream. Each auth set-up is run: API token + signing key, API token only, and open.

The browser is Debian's ``/usr/bin/chromium`` (Playwright's own browser builds are never used).
Without it the test fails, unless ``LP_SKIP_BROWSER=1`` says to skip it. Screenshots go to
``test-output/ui/<set-up>/``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from playwright.sync_api import (
    Browser,
    ConsoleMessage,
    Dialog,
    Page,
    WebSocket,
    expect,
    sync_playwright,
)

from listenerpool.testing.redis_server import RedisServer
from listenerpool.testing.upstream import SSEUpstream
from tests.conftest import ROOT, GatewayProcesses, WorkerProcesses

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
OUTPUT = ROOT / "test-output" / "ui"
TOKEN = "ui-api-token-0123456789"
KEY = "ui-signing-key-0123456789abcdef0123"
ALPHA, BETA = "ui-alpha", "ui-beta"
QUIET = [f"ui-quiet-{i:02d}" for i in range(10)]  # enough for two pages of 10
WAIT_MS = 20_000

AUTH_SETUPS: dict[str, dict[str, str]] = {
    "signed": {"api_token": TOKEN, "signing_key": KEY},
    "api-token-only": {"api_token": TOKEN},
    "open": {},
}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        if os.environ.get("LP_SKIP_BROWSER") == "1":
            pytest.skip(f"{CHROMIUM} is missing and LP_SKIP_BROWSER=1: dashboard test skipped")
        pytest.fail(
            f"{CHROMIUM} is missing: install it (apt-get install -y chromium), or set "
            "LP_SKIP_BROWSER=1 to skip the dashboard's browser test"
        )
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        yield chromium
        chromium.close()


class PageWatch:
    """What the page did that a user would not see in its DOM: uncaught script errors,
    Content-Security-Policy refusals, WebSocket URLs and dialogs."""

    def __init__(self, page: Page) -> None:
        self.errors: list[str] = []
        self.sockets: list[str] = []
        self.closed: list[str] = []
        self.sent: list[str] = []
        self.dialogs: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on("console", self._console)
        page.on("websocket", self._socket)
        page.on("dialog", self._accept)

    def _socket(self, ws: WebSocket) -> None:
        self.sockets.append(ws.url)
        ws.on("framesent", lambda payload: self.sent.append(str(payload)))
        ws.on("close", lambda closed: self.closed.append(closed.url))

    @property
    def open_sockets(self) -> int:
        return len(self.sockets) - len(self.closed)

    def _console(self, message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text:
            self.errors.append(message.text)

    def _accept(self, dialog: Dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.accept()


def put_sessions(base: str, headers: dict[str, str], upstream: SSEUpstream) -> None:
    """Two busy sessions (50 events/s) and ten quiet ones (an event every 100 s)."""
    for sid in QUIET:
        upstream.configure(sid, rate=0.01)
    with httpx.Client(base_url=base, headers=headers, trust_env=False, timeout=10) as client:
        for sid in (*QUIET, ALPHA, BETA):
            resp = client.put(f"/v1/sessions/{sid}", json={"url": upstream.url(sid)})
            assert resp.status_code == 201, resp.text


def tail_of(page: Page, sid: str) -> Any:
    return page.locator(f".tail[data-sid='{sid}']")


def tail_seqs(page: Page, sid: str) -> list[int]:
    seqs: list[int] = (
        tail_of(page, sid)
        .locator("li[data-seq]")
        .evaluate_all("items => items.map(li => Number(li.dataset.seq))")
    )
    return seqs


def enter_token(page: Page, out: Path) -> None:
    """The page asks for a token on the API's 401, refuses a wrong one with the gateway's
    message, and keeps the right one in session storage only."""
    form = page.locator("#token-form")
    expect(form).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("#token-reason")).to_contain_text("401")
    expect(page.locator("#token-input")).to_have_attribute("type", "password")
    page.screenshot(path=out / "1-token.png", full_page=True)
    page.fill("#token-input", "not-the-token-0123456789")
    page.click("#token-form button[type=submit]")
    expect(page.locator("#token-reason")).to_contain_text("the API token is not valid")
    page.fill("#token-input", TOKEN)
    page.click("#token-form button[type=submit]")
    expect(form).to_be_hidden(timeout=WAIT_MS)
    assert page.evaluate("sessionStorage.getItem('listenerpool.apiToken')") == TOKEN
    assert page.evaluate("localStorage.length") == 0
    assert TOKEN not in page.url


@pytest.mark.timeout(90)
@pytest.mark.parametrize("setup", list(AUTH_SETUPS))
def test_dashboard_lists_tails_and_cancels_a_live_session(
    setup: str,
    browser: Browser,
    redis_server: RedisServer,
    upstream: SSEUpstream,
    gateway_processes: GatewayProcesses,
    worker_processes: WorkerProcesses,
) -> None:
    settings: dict[str, Any] = AUTH_SETUPS[setup]
    _, base = gateway_processes.start(redis_server.url, "gw-ui", **settings)
    worker_processes.start(redis_server.url, "w-ui")
    headers = {"Authorization": f"Bearer {TOKEN}"} if "api_token" in settings else {}
    put_sessions(base, headers, upstream)
    out = OUTPUT / setup
    out.mkdir(parents=True, exist_ok=True)
    print(f"dashboard screenshots: {out}")

    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    watch = PageWatch(page)
    try:
        page.goto(f"{base}/ui")
        expect(page).to_have_url(f"{base}/ui/")
        if "api_token" in settings:
            enter_token(page, out)
        expect(page.locator("#status")).to_contain_text("updated", timeout=WAIT_MS)
        expect(page.locator("#token-form")).to_be_hidden()

        # Workers and sessions as the API reports them.
        worker = page.locator("#workers tr[data-worker='w-ui']")
        expect(worker).to_be_visible(timeout=WAIT_MS)
        expect(worker.locator("td").nth(3)).to_have_text(re.compile(r"^\d+$"))
        expect(worker.locator("td").nth(4)).to_have_text(re.compile(r"^\d+\.\d s$"))
        alpha = page.locator(f"#sessions tr[data-sid='{ALPHA}']")
        beta = page.locator(f"#sessions tr[data-sid='{BETA}']")
        expect(alpha.locator("td.state")).to_have_text("listening", timeout=WAIT_MS)
        expect(alpha.locator("td.owner")).to_have_text("w-ui")
        expect(alpha.locator("td.epoch")).to_have_text("1")
        expect(beta.locator("td.state")).to_have_text("listening", timeout=WAIT_MS)
        # Events/s from seq deltas between refreshes: the upstream sends 50 a second. The
        # factor-2 window checks the page's arithmetic (units, the division by the time), not
        # the pool's speed: any one refresh within the wait may show it.
        page.wait_for_function(
            """sid => {
                const cell = document.querySelector(`#sessions tr[data-sid="${sid}"] td.rate`);
                const rate = cell ? Number(cell.textContent) : NaN;
                return rate >= 25 && rate <= 100;
            }""",
            arg=ALPHA,
            timeout=WAIT_MS,
        )
        expect(page.locator("#page-info")).to_have_text("1\N{EN DASH}12 of 12")

        # Paging: 10 a page.
        rows = page.locator("#sessions tbody tr")
        page.select_option("#page-size", "10")
        expect(page.locator("#page-info")).to_have_text("1\N{EN DASH}10 of 12")
        expect(rows).to_have_count(10)
        expect(page.locator("#prev-page")).to_be_disabled()
        page.click("#next-page")
        expect(page.locator("#page-info")).to_have_text("11\N{EN DASH}12 of 12")
        expect(rows).to_have_count(2)
        expect(page.locator("#next-page")).to_be_disabled()
        page.click("#prev-page")
        expect(page.locator("#page-info")).to_have_text("1\N{EN DASH}10 of 12")
        page.select_option("#page-size", "50")
        expect(rows).to_have_count(12)

        # The text filter.
        page.fill("#filter", "alpha")
        expect(rows).to_have_count(1)
        expect(alpha).to_be_visible()
        expect(page.locator("#page-info")).to_contain_text("1 match")
        page.fill("#filter", "QUIET")
        expect(rows).to_have_count(len(QUIET))
        page.fill("#filter", "")
        expect(rows).to_have_count(12)

        # Live tails over one WebSocket to /v1/stream: seq numbers arrive in order.
        alpha.locator("button.tail").click()
        expect(page.locator("#tail-state")).to_contain_text("live", timeout=WAIT_MS)
        alpha_tail = tail_of(page, ALPHA)
        expect(alpha_tail.locator(".status")).to_have_text("live", timeout=WAIT_MS)
        expect(alpha_tail.locator("dd[data-field='owner']")).to_have_text("w-ui")
        expect(alpha_tail.locator("dd[data-field='url']")).to_have_text(upstream.url(ALPHA))
        items = alpha_tail.locator("li[data-seq]")
        expect(items.first).to_be_attached(timeout=WAIT_MS)
        first = int(items.first.get_attribute("data-seq") or 0)
        expect(alpha_tail.locator(f"li[data-seq='{first + 50}']")).to_be_attached(timeout=WAIT_MS)
        seqs = tail_seqs(page, ALPHA)
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
        last = alpha_tail.locator(f"li[data-seq='{first + 50}']")
        assert SSEUpstream.number_of(last.locator(".data").inner_text()) == first + 50
        assert last.locator(".event").inner_text() == SSEUpstream.event_type(first + 50)
        subscribe = {"op": "subscribe", "sid": ALPHA, "after": first - 1}
        assert subscribe in [json.loads(frame) for frame in watch.sent], watch.sent

        # A second tail joins the same connection (with a signing key, a new one whose token
        # names both sessions replaces it): one connection open, both tails live and in order.
        beta.locator("button.tail").click()
        beta_tail = tail_of(page, BETA)
        expect(beta_tail.locator(".status")).to_have_text("live", timeout=WAIT_MS)
        beta_first = beta_tail.locator("li[data-seq]").first
        expect(beta_first).to_be_attached(timeout=WAIT_MS)
        beta_from = int(beta_first.get_attribute("data-seq") or 0)
        expect(beta_tail.locator(f"li[data-seq='{beta_from + 20}']")).to_be_attached(
            timeout=WAIT_MS
        )
        for sid in (ALPHA, BETA):
            seqs = tail_seqs(page, sid)
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), (sid, seqs)
        assert watch.open_sockets == 1, (watch.sockets, watch.closed)
        assert all(urlsplit(url).path == "/v1/stream" for url in watch.sockets), watch.sockets
        page.screenshot(path=out / "2-live.png", full_page=True)

        # How the WebSocket authenticated: never the API token when a subscribe token exists.
        query = parse_qs(urlsplit(watch.sockets[-1]).query)
        if setup == "signed":
            assert query["token"] != [TOKEN]
            assert query["token"][0].count(".") == 1
            expect(page.locator("#tail-state")).to_contain_text("subscribe token")
        elif setup == "api-token-only":
            assert query["token"] == [TOKEN]
            assert len(watch.sockets) == 1, watch.sockets
            expect(page.locator("#tail-state")).to_contain_text("API token (no signing key)")
        else:
            assert "token" not in query
            assert len(watch.sockets) == 1, watch.sockets

        # Stopping a tail unsubscribes it; the other goes on.
        beta.locator("button.tail").click()
        expect(beta_tail).to_have_count(0)
        assert {"op": "unsubscribe", "sid": BETA} in [json.loads(f) for f in watch.sent]
        expect(alpha_tail.locator(".status")).to_have_text("live")

        # Cancel from the page: the upstream sees its connection closed; the other stays.
        assert upstream.stats(ALPHA).concurrent == 1
        alpha.locator("button.cancel").click()
        upstream.wait_until(
            lambda: upstream.stats(ALPHA).concurrent == 0,
            10,
            "the cancelled session's upstream connection stayed open",
        )
        assert upstream.stats(ALPHA).disconnects, "the reader did not close its connection"
        assert upstream.stats(BETA).concurrent == 1
        assert watch.dialogs == [f"Cancel session {ALPHA}? Its reader stops, wherever it runs."]
        expect(alpha.locator("td.state")).to_contain_text("(cancelled)", timeout=WAIT_MS)
        expect(alpha.locator("button.cancel")).to_be_disabled()
        expect(beta.locator("button.cancel")).to_be_enabled()
        expect(alpha_tail.locator("dd[data-field='desired']")).to_have_text(
            "no (cancelled)", timeout=WAIT_MS
        )
        expect(page.locator("#error")).to_be_hidden()
        page.screenshot(path=out / "3-cancelled.png", full_page=True)

        # A failing API shows in the page, and the message goes once the gateway answers again.
        redis_server.kill()
        expect(page.locator("#error")).to_contain_text("Redis is unavailable", timeout=WAIT_MS)
        expect(page.locator("#status")).to_have_text("error")
        page.screenshot(path=out / "4-redis-down.png", full_page=True)
        redis_server.start()
        expect(page.locator("#error")).to_be_hidden(timeout=WAIT_MS)
        expect(page.locator("#status")).to_contain_text("updated")
        assert not watch.errors, watch.errors
    except BaseException:
        page.screenshot(path=out / "failure.png", full_page=True)
        raise
    finally:
        context.close()
