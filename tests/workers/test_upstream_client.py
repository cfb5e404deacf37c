"""workers.upstream.UpstreamClient against scripted loopback servers: body framings, content
codings, redirects and their header rules, head deadline, idle timeout, TLS, and a worker
reading a chunked stream over TLS."""

from __future__ import annotations

import asyncio
import gzip
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from listenerpool.errors import UpstreamError, UpstreamNotAllowed
from listenerpool.metrics import ReconnectReason
from listenerpool.sse import SSEParser
from listenerpool.tasks import cancel_until_done
from tests.conftest import Pool, eventually, running_worker
from tests.workers.scripted_http import ScriptedServer, scripted_server, send
from workers import upstream as upstream_module
from workers.http1 import Http1Protocol, UpstreamBroken
from workers.upstream import UpstreamClient, tls_context

pytestmark = pytest.mark.timeout(60)

TLS_DIR = Path(__file__).resolve().parents[1] / "data" / "tls"
CA = str(TLS_DIR / "ca.pem")
SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
EVENTS = b"id: 1\ndata: one\n\nid: 2\ndata: two\n\n"


def client(**overrides: Any) -> UpstreamClient:
    options: dict[str, Any] = {
        "connect_timeout": 10.0,
        "head_timeout": 10.0,
        "idle_timeout": 10.0,
        "max_redirects": 5,
    }
    return UpstreamClient(**{**options, **overrides})


async def body_of(stream: Http1Protocol) -> bytes:
    parts = []
    while chunk := await stream.read():
        parts.append(chunk)
    stream.abort()
    return b"".join(parts)


def chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def server_tls() -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(TLS_DIR / "server.pem"), str(TLS_DIR / "server.key"))
    return context


def trusting_the_test_ca() -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=CA)
    context.set_alpn_protocols(["http/1.1"])
    return context


# -- opening -------------------------------------------------------------------------------------
async def test_connections_are_opened_a_few_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker taking thousands of sessions over opens their connections a bounded number
    at a time (``LP_CONNECT_CONCURRENCY``), so that its loop keeps time for lease renewals."""
    in_flight = 0
    resolvers_may_answer = asyncio.Event()
    real_resolve = upstream_module.resolve

    async def held_resolve(host: str, port: int) -> Any:
        nonlocal in_flight
        in_flight += 1
        try:
            await resolvers_may_answer.wait()
            return await real_resolve(host, port)
        finally:
            in_flight -= 1

    monkeypatch.setattr(upstream_module, "resolve", held_resolve)
    async with scripted_server() as server:
        server.scripts["/s"] = send(SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n")
        opener = client(connect_concurrency=2)
        opening = asyncio.gather(*(opener.open(server.url("/s"), {}) for _ in range(6)))
        try:
            await eventually(lambda: in_flight >= 2, 10, "no connection being opened")
            # All six asked by now: the four beyond the bound wait for a slot, not resolving.
            assert in_flight == 2
        finally:
            resolvers_may_answer.set()
            for stream in await opening:
                stream.abort()


async def test_an_upstream_slow_to_answer_holds_no_connect_slot() -> None:
    """The slot covers resolving, connecting and TLS only: an upstream that never sends its
    response head cannot keep the worker's other readers from connecting."""
    async with scripted_server() as server:
        server.scripts["/mute"] = send()  # connection accepted, no head ever
        server.scripts["/s"] = send(SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n")
        opener = client(connect_concurrency=1, head_timeout=60.0)
        mute = asyncio.create_task(opener.open(server.url("/mute"), {}))
        try:
            await eventually(lambda: len(server.requests) == 1, 10, "no request from the first")
            stream = await asyncio.wait_for(opener.open(server.url("/s"), {}), 30)
            assert (await stream.head()).status_code == 200
            stream.abort()
        finally:
            await cancel_until_done(mute)


# -- bodies --------------------------------------------------------------------------------------
async def test_a_chunked_body_is_read_to_its_last_chunk() -> None:
    async with scripted_server() as server:
        server.scripts["/c"] = send(
            SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n", chunked(b"id: 1\nda", b"ta: one\n\n")
        )
        stream = await client().open(server.url("/c"), {})
        assert (await stream.head()).status_code == 200
        events = SSEParser().feed(await body_of(stream))
        assert [(e.id, e.data) for e in events] == [("1", "one")]


async def test_a_content_length_body_ends_at_its_length_though_the_server_stays() -> None:
    async with scripted_server() as server:
        server.scripts["/n"] = send(SSE_HEAD + b"Content-Length: %d\r\n\r\n" % len(EVENTS), EVENTS)
        assert await body_of(await client().open(server.url("/n"), {})) == EVENTS


async def test_a_body_without_length_ends_when_the_server_closes() -> None:
    async with scripted_server() as server:
        server.scripts["/e"] = send(SSE_HEAD + b"\r\n", EVENTS, close=True)
        assert await body_of(await client().open(server.url("/e"), {})) == EVENTS


async def test_a_chunked_body_cut_short_is_a_protocol_error() -> None:
    async with scripted_server() as server:
        server.scripts["/cut"] = send(
            SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n", b"20\r\nid: 1\n", close=True
        )
        stream = await client().open(server.url("/cut"), {})
        with pytest.raises(UpstreamBroken) as info:
            await body_of(stream)
        assert info.value.reason is ReconnectReason.PROTOCOL_ERROR


async def test_a_gzip_body_is_decoded() -> None:
    packed = gzip.compress(EVENTS)
    async with scripted_server() as server:
        server.scripts["/z"] = send(
            SSE_HEAD + b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(packed),
            packed,
        )
        assert await body_of(await client().open(server.url("/z"), {})) == EVENTS


async def test_a_large_body_arrives_whole_through_a_slow_reader() -> None:
    # More than the protocol buffers before it stops reading the socket.
    body = bytes(range(256)) * 8192
    async with scripted_server() as server:
        server.scripts["/big"] = send(SSE_HEAD + b"Content-Length: %d\r\n\r\n" % len(body), body)
        stream = await client().open(server.url("/big"), {})
        received = bytearray()
        while chunk := await stream.read():
            received += chunk
            await asyncio.sleep(0)  # the reader's own publishing stands here
        stream.abort()
        assert bytes(received) == body


async def test_an_interim_response_before_the_head_is_skipped() -> None:
    async with scripted_server() as server:
        server.scripts["/i"] = send(
            b"HTTP/1.1 100 Continue\r\n\r\n", SSE_HEAD + b"\r\n", EVENTS, close=True
        )
        assert await body_of(await client().open(server.url("/i"), {})) == EVENTS


@pytest.mark.parametrize(
    "answer", [b"hello there\r\n\r\n", b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", b""]
)
async def test_what_is_not_an_http_response_is_a_protocol_error(answer: bytes) -> None:
    async with scripted_server() as server:
        server.scripts["/g"] = send(answer, close=True)
        with pytest.raises(UpstreamBroken) as info:
            await client().open(server.url("/g"), {})
        assert info.value.reason is ReconnectReason.PROTOCOL_ERROR


# -- the request ---------------------------------------------------------------------------------
async def test_the_request_names_its_host_and_carries_the_given_headers() -> None:
    async with scripted_server() as server:
        server.scripts["/h?x=a b"] = send(SSE_HEAD + b"\r\n", close=True)
        server.scripts["/h?x=a%20b"] = server.scripts["/h?x=a b"]
        url = server.url("/h?x=a b").replace("://", "://ann:s%40cret@")
        given = {"X-Token": "t1", "Last-Event-ID": "41", "Accept": "text/event-stream"}
        (await client().open(url, given)).abort()
        [request] = server.requests
        assert request.path == "/h?x=a%20b"
        assert request.headers["host"] == f"127.0.0.1:{server.port}"
        assert request.headers["x-token"] == "t1"
        assert request.headers["last-event-id"] == "41"
        assert request.headers["accept"] == "text/event-stream"
        assert request.headers["authorization"] == "Basic YW5uOnNAY3JldA=="  # ann:s@cret


async def test_no_request_goes_out_once_the_opener_no_longer_wants_it() -> None:
    """``before_connect`` is asked again once the connection is made: a reader whose lease
    clock ran out while it connected (a frozen process, woken) closes it unused."""
    asked: list[int] = []

    def lease_ran_out_meanwhile() -> None:
        asked.append(len(asked))
        if len(asked) > 1:
            raise UpstreamBroken("lease ran out", ReconnectReason.LEASE_UNCONFIRMED)

    async with scripted_server() as server:
        server.scripts["/s"] = send(SSE_HEAD + b"\r\n", close=True)
        with pytest.raises(UpstreamBroken, match="lease ran out"):
            await client().open(server.url("/s"), {}, before_connect=lease_ran_out_meanwhile)
        await eventually(lambda: len(server.closed) == 1 and server.closed[0].is_set(), 10)
        assert server.requests == []
        assert asked == [0, 1]


async def test_a_connect_cancelled_as_its_connection_is_made_sends_no_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A connect timeout (or a stop) that lands in the loop pass where the connection is made
    closes it: the request, which went out with the connection before, must not."""
    opener: asyncio.Task[Any] | None = None
    made = Http1Protocol.connection_made

    def made_then_cancelled(self: Http1Protocol, transport: asyncio.BaseTransport) -> None:
        made(self, transport)
        assert opener is not None
        opener.cancel()

    monkeypatch.setattr(Http1Protocol, "connection_made", made_then_cancelled)
    async with scripted_server() as server:
        server.scripts["/s"] = send(SSE_HEAD + b"\r\n", close=True)
        opener = asyncio.create_task(client().open(server.url("/s"), {}))
        with pytest.raises(asyncio.CancelledError):
            await opener
        await eventually(lambda: len(server.closed) == 1 and server.closed[0].is_set(), 10)
        assert server.requests == []


# -- redirects -----------------------------------------------------------------------------------
def redirect(status: int, location: str) -> bytes:
    return b"HTTP/1.1 %d Moved\r\nLocation: %s\r\nContent-Length: 0\r\n\r\n" % (
        status,
        location.encode(),
    )


async def test_redirects_keep_credentials_within_their_origin() -> None:
    async with scripted_server() as server:
        elsewhere = server.url("/c", host="localhost")  # another origin: another host name
        server.scripts["/a"] = send(redirect(302, "/b"))
        server.scripts["/b"] = send(redirect(307, elsewhere))
        server.scripts["/c"] = send(SSE_HEAD + b"\r\n", EVENTS, close=True)
        given = {"Authorization": "Bearer t", "Cookie": "k=v", "X-Keep": "1"}
        assert await body_of(await client().open(server.url("/a"), given)) == EVENTS
        a, b, c = server.requests
        assert (a.path, b.path, c.path) == ("/a", "/b", "/c")
        assert a.headers["authorization"] == b.headers["authorization"] == "Bearer t"
        assert "authorization" not in c.headers
        assert a.headers["cookie"] == "k=v" and "cookie" not in b.headers
        assert c.headers["x-keep"] == "1"
        assert c.headers["host"] == f"localhost:{server.port}"


async def test_redirects_beyond_the_limit_fail() -> None:
    async with scripted_server() as server:
        server.scripts["/loop"] = send(redirect(301, "/loop"))
        with pytest.raises(UpstreamBroken, match="redirected more than LP_MAX_REDIRECTS=3 times"):
            await client(max_redirects=3).open(server.url("/loop"), {})
        assert len(server.requests) == 4  # the request and 3 hops


async def test_without_redirects_a_redirect_is_the_answer() -> None:
    async with scripted_server() as server:
        server.scripts["/r"] = send(redirect(302, "/elsewhere"))
        stream = await client(max_redirects=0).open(server.url("/r"), {})
        assert (await stream.head()).status_code == 302
        stream.abort()
        assert len(server.requests) == 1


async def test_a_redirect_to_a_refused_address_is_not_followed() -> None:
    async with scripted_server() as server:
        server.scripts["/m"] = send(redirect(302, "http://169.254.169.254/latest/meta-data/"))
        with pytest.raises(UpstreamNotAllowed, match="cloud metadata address"):
            await client().open(server.url("/m"), {})


# -- time limits and ends ------------------------------------------------------------------------
async def test_a_head_dribbled_byte_by_byte_misses_the_head_deadline() -> None:
    async def dribble(writer: asyncio.StreamWriter) -> bool:
        for byte in SSE_HEAD * 1000:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.02)  # the slowloris's pace, not synchronisation
        return False

    async with scripted_server() as server:
        server.scripts["/slow"] = dribble
        with pytest.raises(UpstreamError, match=r"no complete response head within 0\.5s"):
            await client(head_timeout=0.5, idle_timeout=30).open(server.url("/slow"), {})


async def test_silence_after_the_head_is_the_idle_timeout() -> None:
    async with scripted_server() as server:
        server.scripts["/quiet"] = send(SSE_HEAD + b"\r\n", b": hello\n\n")
        stream = await client(idle_timeout=0.3).open(server.url("/quiet"), {})
        assert await stream.read() == b": hello\n\n"
        with pytest.raises(UpstreamBroken, match=r"no bytes from upstream for 0\.3s") as info:
            await stream.read()
        assert info.value.reason is ReconnectReason.IDLE_TIMEOUT
        await eventually(server.closed[0].is_set, 10, "the idle connection was not closed")


async def test_abort_ends_the_connection_for_the_server() -> None:
    async with scripted_server() as server:
        server.scripts["/s"] = send(SSE_HEAD + b"\r\n")
        stream = await client().open(server.url("/s"), {})
        stream.abort()
        await eventually(server.closed[0].is_set, 10, "the server did not see the end")
        with pytest.raises(UpstreamBroken):
            await stream.read()


async def test_a_refused_connection_is_a_connect_error() -> None:
    async with scripted_server() as server:
        url = server.url("/x")
    with pytest.raises(UpstreamBroken, match="upstream connection failed") as info:
        await client().open(url, {})
    assert info.value.reason is ReconnectReason.CONNECT_ERROR


# -- TLS -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("host", "trust", "error"),
    [
        ("localhost", trusting_the_test_ca, None),
        ("localhost", None, "CERTIFICATE_VERIFY_FAILED"),  # the default trust: not our CA
        ("127.0.0.1", trusting_the_test_ca, "CERTIFICATE_VERIFY_FAILED"),  # not its name
    ],
)
async def test_tls_checks_the_certificate_and_the_host_name(
    host: str, trust: Callable[[], ssl.SSLContext] | None, error: str | None
) -> None:
    async with scripted_server(tls=server_tls()) as server:
        server.scripts["/t"] = send(SSE_HEAD + b"\r\n", EVENTS, close=True)
        upstream = client(ssl_context=trust() if trust else None)
        url = server.url("/t", scheme="https", host=host)
        if error is None:
            assert await body_of(await upstream.open(url, {})) == EVENTS
            return
        with pytest.raises(UpstreamBroken, match=error) as info:
            await upstream.open(url, {})
        assert info.value.reason is ReconnectReason.CONNECT_ERROR
        assert server.requests == []


async def test_ssl_cert_file_names_the_trusted_authorities(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", CA)
    context = tls_context()
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname
    async with scripted_server(tls=server_tls()) as server:
        server.scripts["/t"] = send(SSE_HEAD + b"\r\n", EVENTS, close=True)
        url = server.url("/t", scheme="https", host="localhost")
        assert await body_of(await client(ssl_context=context).open(url, {})) == EVENTS


async def test_a_worker_reads_a_chunked_stream_over_tls_and_resumes_it(
    pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", CA)
    served: list[ScriptedServer] = []

    async def events(writer: asyncio.StreamWriter) -> bool:
        last = served[0].requests[-1].headers.get("last-event-id", "0")
        first = int(last) + 1
        writer.write(SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n")
        for n in range(first, first + 3):
            writer.write(chunked(b"id: %d\ndata: event %d\n\n" % (n, n))[:-5])  # no last chunk
        await writer.drain()
        return True  # the stream ends without its last chunk: cut short, then resumed

    async with scripted_server(tls=server_tls()) as server, running_worker(pool):
        served.append(server)
        server.scripts["/tls"] = events
        await pool.control.claim("tls", server.url("/tls", scheme="https", host="localhost"))

        async def six() -> bool:
            return len(await pool.stream("tls")) >= 6

        await eventually(six, 20, "the worker did not read the TLS stream")
        entries = (await pool.stream("tls"))[:6]
        assert [e["uid"] for e in entries] == ["1", "2", "3", "4", "5", "6"]
        assert server.requests[1].headers["last-event-id"] == "3"
