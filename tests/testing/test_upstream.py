"""Tests of the scriptable SSE upstream used by the integration tests, benchmarks and soak."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from listenerpool.testing.upstream import SSEUpstream, await_until, wait_until

pytestmark = pytest.mark.timeout(30)


class RawClient:
    """A hand-driven HTTP client on a plain socket, to see exactly what the server writes."""

    def __init__(self, up: SSEUpstream, path: str, headers: dict[str, str] | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", up.port), timeout=5)
        lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{up.port}"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.buf = b""
        self.eof = False

    @classmethod
    def stream(cls, up: SSEUpstream, sid: str, last_event_id: str | None = None) -> RawClient:
        return cls(up, f"/events/{sid}", {"Last-Event-ID": last_event_id} if last_event_id else {})

    def _recv(self, timeout: float) -> bool:
        """Read once; False if nothing arrived within ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return False
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
        self.buf += data
        return True

    def read_until(self, marker: bytes, timeout: float = 5.0) -> bytes:
        """Everything up to and including ``marker``, consumed from the buffer."""
        deadline = time.monotonic() + timeout
        while marker not in self.buf:
            left = deadline - time.monotonic()
            if self.eof or left <= 0 or not self._recv(left):
                raise AssertionError(f"no {marker!r} in {self.buf[:200]!r} (eof={self.eof})")
        end = self.buf.index(marker) + len(marker)
        data, self.buf = self.buf[:end], self.buf[end:]
        return data

    def read_bytes(self, size: int, timeout: float = 5.0) -> bytes:
        deadline = time.monotonic() + timeout
        while len(self.buf) < size:
            left = deadline - time.monotonic()
            if self.eof or left <= 0 or not self._recv(left):
                raise AssertionError(f"got {len(self.buf)} of {size} bytes (eof={self.eof})")
        data, self.buf = self.buf[:size], self.buf[size:]
        return data

    def head(self) -> tuple[int, dict[str, str]]:
        lines = self.read_until(b"\r\n\r\n").decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        return int(lines[0].split()[1]), headers

    def frame(self, timeout: float = 5.0) -> bytes:
        """The next SSE block (event or comment), without its blank line."""
        return self.read_until(b"\n\n", timeout)[:-2]

    def frames(self, count: int, timeout: float = 5.0) -> list[bytes]:
        return [self.frame(timeout) for _ in range(count)]

    def events(self, count: int, timeout: float = 5.0) -> list[bytes]:
        """The next ``count`` events, skipping heartbeats."""
        found: list[bytes] = []
        while len(found) < count:
            frame = self.frame(timeout)
            if not frame.startswith(b":"):
                found.append(frame)
        return found

    def read_to_eof(self, timeout: float = 5.0) -> bytes:
        deadline = time.monotonic() + timeout
        while not self.eof:
            left = deadline - time.monotonic()
            if left <= 0 or not self._recv(left):
                raise AssertionError("the server did not close the connection")
        data, self.buf = self.buf, b""
        return data

    def drain_until_silent(self, quiet: float = 0.3, timeout: float = 5.0) -> None:
        """Read until nothing arrives for ``quiet`` seconds (a bounded observation window)."""
        deadline = time.monotonic() + timeout
        while self._recv(quiet) and not self.eof:
            assert time.monotonic() < deadline, "the server never went quiet"
        self.buf = b""

    def silent_for(self, seconds: float) -> bool:
        """True if the connection stays open and nothing arrives for ``seconds``."""
        before = len(self.buf)
        return not self._recv(seconds) and len(self.buf) == before and not self.eof

    def close(self) -> None:
        self.sock.close()


def parse(frame: bytes) -> dict[str, bytes]:
    fields = {}
    for line in frame.split(b"\n"):
        name, _, value = line.partition(b": ")
        fields[name.decode()] = value
    return fields


def numbers(frames: list[bytes]) -> list[int]:
    return [int(parse(frame)["id"]) for frame in frames]


@pytest.fixture
def up() -> Iterator[SSEUpstream]:
    with SSEUpstream(rate=200, heartbeat=0.05) as server:
        yield server


def httpx_events(
    url: str, count: int, headers: dict[str, str] | None = None
) -> list[dict[str, str]]:
    """Read ``count`` events with an httpx streaming GET, then close."""
    events: list[dict[str, str]] = []
    fields: dict[str, str] = {}
    with httpx.stream("GET", url, headers=headers, timeout=5) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        for line in response.iter_lines():
            if line == "":
                if "id" in fields:
                    events.append(fields)
                fields = {}
                if len(events) == count:
                    break
            elif not line.startswith(":"):
                name, _, value = line.partition(": ")
                fields[name] = value
    return events


# -- payloads -------------------------------------------------------------------------------
def test_payload_is_deterministic_json_of_the_asked_size() -> None:
    up = SSEUpstream(payload_bytes=300)
    for n in (1, 9, 12345, 10**9):
        data = up.payload(n)
        assert data == up.payload(n)
        assert len(data) == 300
        assert json.loads(data)["n"] == n
        assert json.loads(data)["type"] == up.event_type(n)
        assert SSEUpstream.number_of(data) == n
    assert up.payload(1) != up.payload(2)
    with pytest.raises(ValueError):
        SSEUpstream.number_of('{"x": 1}')


def test_configure_rejects_bad_values() -> None:
    up = SSEUpstream()
    for kwargs in ({"mode": "nope"}, {"mode": "status:abc"}, {"mode": "status:99"}, {"rate": -1}):
        with pytest.raises(ValueError):
            up.configure("s", **kwargs)


# -- numbering, resume, heartbeats ----------------------------------------------------------
def test_events_are_numbered_from_one_with_ids_types_and_payloads(up: SSEUpstream) -> None:
    events = httpx_events(up.url("s1"), 12)
    assert [int(e["id"]) for e in events] == list(range(1, 13))
    for event in events:
        n = int(event["id"])
        assert event["event"] == up.event_type(n)
        assert event["data"] == up.payload(n)
        assert SSEUpstream.number_of(event["data"]) == n
    up.wait_until(lambda: up.stats("s1").highest_emitted >= 12, 10)


def test_last_event_id_resumes_after_it(up: SSEUpstream) -> None:
    assert [int(e["id"]) for e in httpx_events(up.url("s1"), 3, {"Last-Event-ID": "41"})] == [
        42,
        43,
        44,
    ]
    assert int(httpx_events(up.url("s1"), 1, {"last-event-id": "junk"})[0]["id"]) == 1
    assert int(httpx_events(up.url("s1"), 1)[0]["id"]) == 1
    stats = up.stats("s1")
    assert stats.last_event_ids == ["41", "junk", None]
    assert stats.connections_total == 3
    assert stats.request_headers[0]["last-event-id"] == "41"
    assert stats.request_headers[0]["host"] == f"127.0.0.1:{up.port}"
    assert up.sessions() == ["s1"]


def test_total_ends_the_events_then_only_heartbeats_keep_it_open(up: SSEUpstream) -> None:
    up.configure("s1", total=3)
    client = RawClient.stream(up, "s1")
    assert client.head()[0] == 200
    assert numbers(client.events(3)) == [1, 2, 3]
    assert client.frames(3) == [b": heartbeat"] * 3
    assert not client.eof
    assert up.stats("s1").highest_emitted == 3
    assert up.stats("s1").concurrent == 1
    client.close()


def test_resume_past_total_sends_only_heartbeats(up: SSEUpstream) -> None:
    up.configure("s1", total=5)
    client = RawClient.stream(up, "s1", last_event_id="5")
    client.head()
    assert client.frames(2) == [b": heartbeat"] * 2
    client.close()


def test_heartbeats_every_interval_while_idle() -> None:
    with SSEUpstream(rate=0.5, heartbeat=0.05) as up:
        # Behaviour, not speed: heartbeats never come faster than their interval. The clock
        # starts before the connection, so a late reader cannot make them look faster.
        started = time.monotonic()
        client = RawClient.stream(up, "s1")
        client.head()
        assert numbers(client.events(1)) == [1]
        assert client.frames(3) == [b": heartbeat"] * 3
        assert time.monotonic() - started >= 0.12
        client.close()


def test_rate_limits_events_per_connection() -> None:
    with SSEUpstream(rate=50) as up:
        # Behaviour, not speed: the rate is an upper bound. The clock starts before the
        # connection, so a late reader cannot make the events look faster.
        started = time.monotonic()
        client = RawClient.stream(up, "s1")
        client.head()
        assert numbers(client.events(11)) == list(range(1, 12))
        assert time.monotonic() - started >= 0.18  # 10 intervals of 20 ms after the first
        client.close()


def test_rate_zero_streams_as_fast_as_the_socket_takes_them() -> None:
    with SSEUpstream(rate=0) as up:
        client = RawClient.stream(up, "s1")
        client.head()
        assert numbers(client.events(5000, timeout=10)) == list(range(1, 5001))
        client.close()
        up.wait_until(lambda: up.stats("s1").concurrent == 0, 5)


def test_rate_change_applies_to_open_connections(up: SSEUpstream) -> None:
    up.configure("s1", rate=0.1)
    client = RawClient.stream(up, "s1")
    client.head()
    assert numbers(client.events(1)) == [1]
    up.configure("s1", rate=200)
    assert numbers(client.events(5, timeout=10)) == [2, 3, 4, 5, 6]
    client.close()


# -- concurrency and disconnects ------------------------------------------------------------
def test_concurrency_and_disconnect_detection(up: SSEUpstream) -> None:
    clients = [RawClient.stream(up, "s1") for _ in range(3)]
    other = RawClient.stream(up, "s2")
    up.wait_until(lambda: up.total_concurrent() == 4, 5, "four connections not seen")
    assert up.stats("s1").concurrent == 3
    assert sorted(up.sessions()) == ["s1", "s2"]

    closed_at = time.monotonic()
    clients[0].close()
    up.wait_until(lambda: up.stats("s1").concurrent == 2, 10, "close not noticed")
    stats = up.stats("s1")
    assert stats.max_concurrent == 3
    assert stats.connections_total == 3
    assert len(stats.disconnects) == 1
    assert stats.disconnects[0] >= closed_at  # the time it was noticed, not opened
    for client in [*clients[1:], other]:
        client.close()
    up.wait_until(lambda: up.total_concurrent() == 0, 10)
    assert len(up.stats("s1").disconnects) == 3


def test_disconnect_noticed_while_stalled(up: SSEUpstream) -> None:
    up.configure("s1", mode="stall")
    client = RawClient.stream(up, "s1")
    assert client.head()[0] == 200
    assert client.silent_for(0.2)
    closed_at = time.monotonic()
    client.close()
    # Nothing is written while stalled, so a close noticed at all was read, not written into.
    up.wait_until(lambda: up.stats("s1").disconnects != [], 10, "close not noticed")
    assert up.stats("s1").disconnects[0] >= closed_at
    assert up.stats("s1").concurrent == 0


def test_many_idle_connections() -> None:
    with SSEUpstream(total=0, heartbeat=15) as up:
        clients = [RawClient.stream(up, f"s{i % 10}") for i in range(1000)]
        up.wait_until(lambda: up.total_concurrent() == 1000, 20, "not all connections seen")
        assert up.stats("s3").concurrent == 100
        up.stop()
        for client in clients[:20]:
            client.read_to_eof()
        for client in clients:
            client.close()
        assert up.total_concurrent() == 0


# -- modes ------------------------------------------------------------------------------------
def test_stall_silences_open_and_new_connections_then_resumes(up: SSEUpstream) -> None:
    client = RawClient.stream(up, "s1")
    client.head()
    assert numbers(client.events(3)) == [1, 2, 3]
    up.configure("s1", mode="stall")
    client.drain_until_silent()
    emitted = up.stats("s1").highest_emitted
    assert client.silent_for(0.3)  # no events and no heartbeats (heartbeat is 50 ms)
    assert up.stats("s1").highest_emitted == emitted

    fresh = RawClient.stream(up, "s1")
    status, headers = fresh.head()
    assert (status, headers["content-type"]) == (200, "text/event-stream")
    assert fresh.silent_for(0.2)

    up.configure("s1", mode="normal")
    assert numbers(client.events(2)) == [emitted + 1, emitted + 2]
    assert numbers(fresh.events(2)) == [1, 2]
    client.close()
    fresh.close()


def test_vanish_goes_silent_without_closing_until_stop(up: SSEUpstream) -> None:
    client = RawClient.stream(up, "s1")
    client.head()
    client.frames(2)
    up.configure("s1", mode="vanish")
    client.drain_until_silent()
    assert client.silent_for(0.3)

    fresh = RawClient.stream(up, "s1")
    assert fresh.silent_for(0.3)
    assert fresh.buf == b""  # not even a status line
    up.wait_until(lambda: up.stats("s1").connections_total == 2, 10)
    assert up.stats("s1").concurrent == 2

    up.configure("s1", mode="normal")  # a dead peer does not come back
    assert client.silent_for(0.2)

    up.stop()
    client.read_to_eof()
    fresh.read_to_eof()
    client.close()
    fresh.close()


def test_vanished_connection_still_records_the_client_close(up: SSEUpstream) -> None:
    up.configure("s1", mode="vanish")
    client = RawClient.stream(up, "s1")
    up.wait_until(lambda: up.stats("s1").concurrent == 1, 10)
    client.close()
    up.wait_until(lambda: up.stats("s1").concurrent == 0, 10, "close not noticed")
    assert len(up.stats("s1").disconnects) == 1


@pytest.mark.parametrize("status", [500, 404, 429])
def test_status_mode_answers_new_and_closes_open_connections(up: SSEUpstream, status: int) -> None:
    client = RawClient.stream(up, "s1")
    client.head()
    client.frame()
    up.configure("s1", mode=f"status:{status}")
    client.read_to_eof()
    client.close()
    up.wait_until(lambda: up.stats("s1").concurrent == 0, 10)
    assert up.stats("s1").disconnects == []  # the server closed it, not the client

    response = httpx.get(up.url("s1"), timeout=5)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.json()["status"] == status
    assert up.stats("s1").connections_total == 2


def test_garbage_is_binary_without_blank_lines(up: SSEUpstream) -> None:
    up.configure("s1", mode="garbage")
    client = RawClient.stream(up, "s1")
    status, headers = client.head()
    assert (status, headers["content-type"]) == (200, "text/event-stream")
    body = client.read_bytes(1500)  # ~4 KiB/s: under a second
    assert b"\x00" in body
    with pytest.raises(UnicodeDecodeError):
        body.decode("utf-8")
    assert b"\r" not in body
    assert b"\n\n" not in body
    assert not body.startswith(b"\n")
    client.close()


def test_oversized_sends_one_endless_data_line() -> None:
    with SSEUpstream(oversized_bytes=300_000) as up:
        up.configure("s1", mode="oversized")
        client = RawClient.stream(up, "s1")
        assert client.head()[0] == 200
        assert client.read_bytes(6 + 300_000) == b"data: " + b"x" * 300_000
        assert client.silent_for(0.2)
        client.close()


def test_huge_event_sends_one_event_of_many_data_lines() -> None:
    with SSEUpstream(oversized_bytes=200_000) as up:
        up.configure("s1", mode="huge_event")
        client = RawClient.stream(up, "s1")
        assert client.head()[0] == 200
        event = client.frame(timeout=10)
        lines = event.split(b"\n")
        assert len(event) >= 200_000
        assert all(line == b"data: " + b"y" * 1018 for line in lines)
        assert client.silent_for(0.2)
        client.close()


@pytest.mark.slow  # the hostile-upstream tests exercise this mode in every run
def test_slow_head_dribbles_the_response_head() -> None:
    with SSEUpstream(rate=50.0, heartbeat=0.5) as up:
        up.configure("s1", mode="slow_head")
        # Behaviour, not speed: the ~100-byte head comes one byte per 0.1 s, so it takes more
        # than 5 s from before the request, and in many reads, not one.
        started = time.monotonic()
        client = RawClient.stream(up, "s1")
        reads = 0
        while b"\r\n\r\n" not in client.buf:
            assert client._recv(20) and not client.eof, f"head cut short: {client.buf!r}"
            reads += 1
        assert time.monotonic() - started > 5
        assert reads > 10, f"the head came in {reads} reads"
        head = client.read_until(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert numbers(client.events(2)) == [1, 2]
        client.close()


def test_redirect_mode_answers_302_with_the_location(up: SSEUpstream) -> None:
    up.configure("s1", mode="redirect:" + up.url("s1"))
    response = httpx.get(up.url("s1"), timeout=5)
    assert response.status_code == 302
    assert response.headers["location"] == up.url("s1")
    with pytest.raises(ValueError, match="bad redirect mode"):
        up.configure("s2", mode="redirect:")


def test_invalid_utf8_events_are_still_numbered(up: SSEUpstream) -> None:
    up.configure("s1", mode="invalid_utf8")
    client = RawClient.stream(up, "s1", last_event_id="7")
    client.head()
    for frame in client.frames(3):
        fields = parse(frame)
        assert b"\xff\xfe" in fields["data"]
        with pytest.raises(UnicodeDecodeError):
            fields["data"].decode("utf-8")
        n = SSEUpstream.number_of(fields["data"].decode("utf-8", errors="replace"))
        assert n == int(fields["id"])
    assert numbers(client.events(1)) == [11]
    client.close()


def test_wrong_type_answers_html_and_closes(up: SSEUpstream) -> None:
    up.configure("s1", mode="wrong_type")
    response = httpx.get(up.url("s1"), timeout=5)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "<html>" in response.text
    up.wait_until(lambda: up.stats("s1").concurrent == 0, 10)


def test_drop_closes_open_connections_and_new_ones_work(up: SSEUpstream) -> None:
    clients = [RawClient.stream(up, "s1") for _ in range(2)]
    for client in clients:
        client.head()
        client.frame()
    up.drop("s1")
    for client in clients:
        client.read_to_eof()
        client.close()
    assert up.stats("s1").concurrent == 0
    assert up.stats("s1").disconnects == []
    assert [int(e["id"]) for e in httpx_events(up.url("s1"), 2)] == [1, 2]
    up.drop("never-seen")


def test_reset_restores_defaults(up: SSEUpstream) -> None:
    up.configure("s1", mode="stall", total=1)
    client = RawClient.stream(up, "s1")
    client.head()
    assert client.silent_for(0.2)
    up.reset("s1")
    assert numbers(client.events(3)) == [1, 2, 3]
    client.close()
    assert up.stats("s1").connections_total == 1  # stats survive a reset


# -- HTTP details and lifecycle -------------------------------------------------------------
def test_other_paths_get_404_json_and_other_methods_405(up: SSEUpstream) -> None:
    response = httpx.get(f"http://127.0.0.1:{up.port}/nope", timeout=5)
    assert response.status_code == 404
    assert response.json()["status"] == 404
    assert httpx.post(up.url("s1"), timeout=5).status_code == 405
    assert up.sessions() == []


def test_stop_closes_every_socket_and_leaves_no_thread() -> None:
    before = set(threading.enumerate())
    up = SSEUpstream()
    up.start()
    client = RawClient.stream(up, "s1")
    client.head()
    up.stop()
    client.read_to_eof()
    client.close()
    assert set(threading.enumerate()) == before
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", up.port), timeout=1).close()
    up.stop()  # idempotent


def test_restart_binds_the_same_port_and_keeps_configs() -> None:
    with SSEUpstream() as up:
        port = up.port
        up.configure("s1", total=2)
        up.stop()
        up.start()
        assert up.port == port
        client = RawClient.stream(up, "s1")
        client.head()
        assert numbers(client.events(2)) == [1, 2]
        client.close()


def test_public_methods_are_thread_safe(up: SSEUpstream) -> None:
    errors: list[BaseException] = []

    def hammer(i: int) -> None:
        try:
            for k in range(50):
                up.configure(f"s{i}", rate=100 + k)
                up.stats(f"s{i}")
                up.total_concurrent()
                up.sessions()
        except BaseException as exc:
            errors.append(exc)

    clients = [RawClient.stream(up, f"s{i}") for i in range(4)]
    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    for client in clients:
        client.head()
        client.frames(3)
        client.close()


def test_wait_until_raises_with_the_message() -> None:
    with pytest.raises(AssertionError, match="never true"):
        wait_until(lambda: False, 0.05, "never true")
    wait_until(lambda: True, 0)


async def test_usable_from_an_async_test_with_its_own_loop() -> None:
    with SSEUpstream(rate=200) as up:
        async with (
            httpx.AsyncClient(timeout=5) as client,
            client.stream("GET", up.url("a1"), headers={"Last-Event-ID": "9"}) as response,
        ):
            ids = []
            async for line in response.aiter_lines():
                if line.startswith("id: "):
                    ids.append(int(line[4:]))
                if len(ids) == 3:
                    break
        assert ids == [10, 11, 12]
        await await_until(lambda: up.stats("a1").concurrent == 0, 10, "close not noticed")


def test_scripted_events_are_sent_once_in_order_and_wait_for_a_connection() -> None:
    with SSEUpstream(total=0, heartbeat=0) as up:
        up.send("s", "line one\nline two", event="CUSTOM", id="7")
        up.send("s", "{}")
        assert up.queued("s") == 2
        with httpx.stream("GET", up.url("s"), timeout=5) as response:
            chunks = response.iter_bytes()
            body = b""
            while body.count(b"\n\n") < 2:
                body += next(chunks)
        assert body == b"id: 7\nevent: CUSTOM\ndata: line one\ndata: line two\n\ndata: {}\n\n"
        wait_until(lambda: up.queued("s") == 0, 5)
        up.fail("s", 503)
        assert httpx.get(up.url("s"), timeout=5).status_code == 503
        with pytest.raises(ValueError, match="line breaks"):
            up.send("s", "x", event="A\nB")


# -- connection records and finishing ---------------------------------------------------------
def test_connection_records_tell_when_each_was_open_and_what_it_wrote(up: SSEUpstream) -> None:
    first = RawClient.stream(up, "s1")
    first_port = first.sock.getsockname()[1]
    first.events(5)
    up.wait_until(lambda: (up.stats("s1").connections[0].last or 0) >= 5, 10)
    second = RawClient.stream(up, "s1", last_event_id="3")  # overlaps the first
    second_port = second.sock.getsockname()[1]
    second.events(2)
    first.close()
    up.wait_until(lambda: up.stats("s1").connections[0].closed is not None, 10)
    second.close()
    up.wait_until(lambda: up.stats("s1").concurrent == 0, 10)

    a, b = up.stats("s1").connections
    assert (a.first, b.first, b.last_event_id) == (1, 4, "3")
    assert a.last is not None and b.last is not None and b.last >= 5
    assert a.closed is not None and b.closed is not None
    assert a.opened < b.opened < a.closed  # the overlap is visible
    assert (a.peer_port, b.peer_port) == (first_port, second_port)


def events_within(client: RawClient, seconds: float) -> list[bytes]:
    """The events (not heartbeats) that arrive within ``seconds`` (an observation window)."""
    found: list[bytes] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        with contextlib.suppress(AssertionError):
            frame = client.frame(left)
            if not frame.startswith(b":"):
                found.append(frame)
    return found


def test_finish_all_ends_every_stream_at_its_highest_number(up: SSEUpstream) -> None:
    client = RawClient.stream(up, "s1")
    client.events(3)
    totals = up.finish_all()
    assert totals["s1"] >= 3
    tail = events_within(client, 0.3)  # what was already written, then heartbeats only
    assert all(int(parse(e)["id"]) <= totals["s1"] for e in tail)
    assert up.stats("s1").highest_emitted == totals["s1"]
    client.close()
    # A reader resuming from an older id gets the rest, then nothing more.
    late = RawClient.stream(up, "s1", last_event_id=str(totals["s1"] - 2))
    assert numbers(late.events(2)) == [totals["s1"] - 1, totals["s1"]]
    assert events_within(late, 0.3) == []
    assert up.stats("s1").highest_emitted == totals["s1"]
    late.close()
