"""Thirty sessions over one connection in a real headless Chromium: one ``EventSource`` and one
browser ``WebSocket`` to ``/v1/stream``, against real processes (a redis-server, a
``python -m gateway``, two ``python -m workers`` and the scripted upstream). Mid-stream the
gateway is SIGKILLed and restarted on the same port, then the worker owning a session is
SIGKILLed; every session's events must reach the page once, in order, complete, over both.

The EventSource is left to the browser: it reconnects by itself, sending the last ``id:`` as
``Last-Event-ID``. The WebSocket is the page's: on a close it reconnects and subscribes again
after the last seq of each session, as a user's page would. Browser set-up as in
``test_ui_browser.py`` (Debian's ``/usr/bin/chromium``; ``LP_SKIP_BROWSER=1`` skips).
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
import redis
from playwright.sync_api import Browser, Page

from listenerpool.testing.redis_server import RedisServer
from listenerpool.testing.upstream import SSEUpstream
from tests.conftest import GatewayProcesses, WorkerProcesses
from tests.gateway.test_gateway_e2e import describe_gaps
from tests.gateway.test_ui_browser import PageWatch, browser  # noqa: F401 - the fixture

SIDS = [f"mux-{i:02d}" for i in range(30)]
WAIT_MS = 120_000

# The page: one EventSource and one WebSocket, each following every session; what they
# receive is kept per session as [seq, upstream event number] pairs.
FOLLOW = """
sids => {
  const got = {sse: {}, ws: {}, controls: [], sseOpens: 0, wsOpens: 0};
  for (const sid of sids) { got.sse[sid] = []; got.ws[sid] = []; }
  window.got = got;
  const keep = (kind, text) => {
    const frame = JSON.parse(text);
    if (frame.op) { got.controls.push([kind, frame]); return; }
    got[kind][frame.sid].push([frame.seq, JSON.parse(frame.data).n]);
  };
  const source = new EventSource('/v1/stream?sessions=' + sids.join(','));
  source.onopen = () => { got.sseOpens += 1; };
  source.onmessage = message => keep('sse', message.data);
  const connect = () => {
    const socket = new WebSocket(`ws://${location.host}/v1/stream`);
    socket.onopen = () => {
      got.wsOpens += 1;
      for (const sid of sids) {
        const mine = got.ws[sid];
        const after = mine.length ? mine[mine.length - 1][0] : 0;
        socket.send(JSON.stringify({op: 'subscribe', sid, after}));
      }
    };
    socket.onmessage = message => keep('ws', message.data);
    socket.onclose = () => setTimeout(connect, 300);
  };
  connect();
}
"""

# Every session has at least the given number of events on both transports.
ALL_AT_LEAST = """
([sids, wanted]) => sids.every(sid =>
  ['sse', 'ws'].every(kind => window.got[kind][sid].length >= wanted[sid]))
"""


def counts(page: Page) -> dict[str, dict[str, int]]:
    result: dict[str, dict[str, int]] = page.evaluate(
        "() => ({sse: Object.fromEntries(Object.entries(window.got.sse)"
        ".map(([s, l]) => [s, l.length])), ws: Object.fromEntries("
        "Object.entries(window.got.ws).map(([s, l]) => [s, l.length]))})"
    )
    return result


def wait_all(page: Page, wanted: dict[str, int], what: str) -> None:
    try:
        page.wait_for_function(ALL_AT_LEAST, arg=[SIDS, wanted], timeout=WAIT_MS, polling=200)
    except Exception as exc:
        now = counts(page)
        behind = {
            kind: {s: n for s, n in now[kind].items() if n < wanted[s]} for kind in ("sse", "ws")
        }
        raise AssertionError(f"{what}: sessions behind {behind}") from exc


def heads(client: redis.Redis) -> dict[str, int]:
    return {sid: int(client.hget(f"lp:{{{sid}}}:state", "seq") or 0) for sid in SIDS}


@pytest.mark.timeout(600)
def test_thirty_sessions_over_one_event_source_and_one_websocket_survive_kills(
    browser: Browser,  # noqa: F811 - the fixture
    redis_server: RedisServer,
    gateway_processes: GatewayProcesses,
    worker_processes: WorkerProcesses,
) -> None:
    started = time.monotonic()
    workers = {name: worker_processes.start(redis_server.url, name) for name in ("w-a", "w-b")}
    gateway, base = gateway_processes.start(redis_server.url, "gw-mux")
    port = int(base.rsplit(":", 1)[1])
    store = redis.Redis.from_url(redis_server.url)
    with SSEUpstream(rate=10.0, heartbeat=0.5) as upstream:
        with httpx.Client(base_url=base, trust_env=False, timeout=10) as client:
            for sid in SIDS:
                upstream.configure(sid, total=None)  # endless, 10 events/s each
                resp = client.put(f"/v1/sessions/{sid}", json={"url": upstream.url(sid)})
                assert resp.status_code == 201, resp.text

        context = browser.new_context()
        page = context.new_page()
        watch = PageWatch(page)
        try:
            page.goto(f"{base}/healthz")  # any page of the gateway's origin
            page.evaluate(FOLLOW, SIDS)
            wait_all(page, dict.fromkeys(SIDS, 20), "before the gateway kill")

            # The gateway dies mid-stream and comes back on the same port.
            gateway.kill()
            gateway.wait()
            at_kill = heads(store)
            gateway, _ = gateway_processes.start(redis_server.url, "gw-mux-2", port=port)
            wait_all(page, {s: n + 20 for s, n in at_kill.items()}, "after the gateway restart")

            # The worker owning the first session dies mid-stream: its sessions move.
            with httpx.Client(base_url=base, trust_env=False, timeout=10) as client:
                owner = client.get(f"/v1/sessions/{SIDS[0]}").json()["owner"]
            assert owner in workers, owner
            workers[owner].kill()
            workers[owner].wait()
            at_worker_kill = heads(store)
            wait_all(page, {s: n + 20 for s, n in at_worker_kill.items()}, "after the worker kill")
            with httpx.Client(base_url=base, trust_env=False, timeout=10) as client:
                new_owner = client.get(f"/v1/sessions/{SIDS[0]}").json()["owner"]
            got: dict[str, Any] = page.evaluate("() => window.got")
        finally:
            context.close()
    store.close()

    problems = []
    for kind in ("sse", "ws"):
        for sid in SIDS:
            pairs = got[kind][sid]
            seqs = [seq for seq, _ in pairs]
            if seqs != list(range(1, len(seqs) + 1)):
                problems.append(f"{kind} {sid}: {describe_gaps(seqs)}")
            if any(seq != number for seq, number in pairs):
                problems.append(f"{kind} {sid}: upstream numbers differ from seqs")
            if len(seqs) < at_worker_kill[sid] + 20:
                problems.append(f"{kind} {sid}: incomplete, {len(seqs)} events")
    unexpected = [c for c in got["controls"] if c[1]["op"] not in ("subscribed",)]
    if unexpected:
        problems.append(f"control frames other than subscribed: {unexpected[:5]}")
    if got["sseOpens"] < 2:
        problems.append(f"the EventSource never reconnected ({got['sseOpens']} opens)")
    if got["wsOpens"] < 2:
        problems.append(f"the WebSocket never reconnected ({got['wsOpens']} opens)")
    if watch.errors:
        problems.append(f"page errors: {watch.errors[:5]}")
    if new_owner == owner:
        problems.append(f"{SIDS[0]} still owned by the killed worker {owner}")
    assert not problems, "\n".join(problems)
    total = sum(len(got[k][s]) for k in ("sse", "ws") for s in SIDS)
    print(
        f"30 sessions x 2 connections: {total} events, gateway and worker ({owner}) killed, "
        f"in {time.monotonic() - started:.1f}s"
    )
