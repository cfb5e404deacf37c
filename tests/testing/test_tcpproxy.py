"""Tests of the fault-injecting TCP proxy, against a small echo server."""

from __future__ import annotations

import os
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from listenerpool.testing.tcpproxy import TCPProxy
from listenerpool.testing.upstream import wait_until

pytestmark = pytest.mark.timeout(30)


class EchoServer(socketserver.ThreadingTCPServer):
    """Echoes every byte back; counts connections it accepted and those still open."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), EchoHandler)
        self.accepted = 0
        self.open = 0
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05})

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def push(self, data: bytes) -> None:
        """Send ``data`` unasked on every open connection (target-to-client traffic)."""
        with self.lock:
            for sock in self.sockets:
                sock.sendall(data)

    def __enter__(self) -> EchoServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join()


class EchoHandler(socketserver.BaseRequestHandler):
    server: EchoServer

    def handle(self) -> None:
        with self.server.lock:
            self.server.accepted += 1
            self.server.open += 1
            self.server.sockets.append(self.request)
        try:
            while data := self.request.recv(65536):
                self.request.sendall(data)
        except OSError:
            pass
        finally:
            with self.server.lock:
                self.server.open -= 1
                self.server.sockets.remove(self.request)


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    with EchoServer() as server:
        yield server


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[TCPProxy]:
    with TCPProxy(echo.port) as server:
        yield server


def connect(proxy: TCPProxy) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=5)


def recv_exactly(sock: socket.socket, size: int, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"closed after {len(data)} of {size} bytes"
        data += chunk
    return data


def silent_for(sock: socket.socket, seconds: float) -> bool:
    """True if nothing arrives and the connection stays open for ``seconds``."""
    sock.settimeout(seconds)
    try:
        sock.recv(1)
    except TimeoutError:
        return True
    return False


def holds(predicate: Callable[[], bool], seconds: float) -> bool:
    """True if ``predicate`` stays true for a whole observation window of ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not predicate():
            return False
        time.sleep(0.01)
    return True


def closed_by_peer(sock: socket.socket, timeout: float = 5.0) -> bool:
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


def round_trip(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)
    assert recv_exactly(sock, len(data)) == data


def test_pass_forwards_both_ways(proxy: TCPProxy, echo: EchoServer) -> None:
    with connect(proxy) as sock:
        round_trip(sock, b"PING\r\n")
        wait_until(lambda: proxy.connections() == 1, 10)
        payload = os.urandom(4 * 1024 * 1024)
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        assert recv_exactly(sock, len(payload), timeout=20) == payload
        sender.join()
    wait_until(lambda: proxy.connections() == 0, 10, "client close not propagated")
    wait_until(lambda: echo.open == 0, 10, "target side not closed")


def test_stall_holds_bytes_both_ways_until_pass(proxy: TCPProxy, echo: EchoServer) -> None:
    old = connect(proxy)
    round_trip(old, b"before")
    proxy.set_mode("stall")
    old.sendall(b"held")
    assert silent_for(old, 0.3)

    new = connect(proxy)
    new.sendall(b"waiting")
    assert silent_for(new, 0.3)
    wait_until(lambda: proxy.connections() == 2, 10)
    assert echo.accepted == 1  # the target is not even dialled during a stall

    proxy.set_mode("pass")
    assert recv_exactly(old, 4) == b"held"
    assert recv_exactly(new, 7) == b"waiting"
    round_trip(old, b"after")
    assert echo.accepted == 2
    old.close()
    new.close()
    wait_until(lambda: proxy.connections() == 0, 10)


def test_stall_holds_target_to_client_bytes(proxy: TCPProxy, echo: EchoServer) -> None:
    with connect(proxy) as sock:
        round_trip(sock, b"x")
        proxy.set_mode("stall")
        echo.push(b"news")
        assert silent_for(sock, 0.3)
        proxy.set_mode("pass")
        assert recv_exactly(sock, 4) == b"news"


def test_client_close_during_stall_reaches_the_target_after_pass(
    proxy: TCPProxy, echo: EchoServer
) -> None:
    sock = connect(proxy)
    round_trip(sock, b"x")
    proxy.set_mode("stall")
    sock.close()
    assert holds(lambda: echo.open == 1 and proxy.connections() == 1, 0.2)
    proxy.set_mode("pass")
    wait_until(lambda: echo.open == 0 and proxy.connections() == 0, 10)


def test_cut_closes_open_and_new_connections(proxy: TCPProxy, echo: EchoServer) -> None:
    first = connect(proxy)
    round_trip(first, b"x")
    proxy.set_mode("stall")
    stalled = connect(proxy)
    wait_until(lambda: proxy.connections() == 2, 10)

    proxy.set_mode("cut")
    assert closed_by_peer(first)
    assert closed_by_peer(stalled)
    wait_until(lambda: proxy.connections() == 0, 10)
    wait_until(lambda: echo.open == 0, 10, "target side not closed")

    with connect(proxy) as rejected:  # accepted, then closed at once
        assert closed_by_peer(rejected)
    assert echo.accepted == 1

    proxy.set_mode("pass")
    with connect(proxy) as sock:
        round_trip(sock, b"back")
    first.close()
    stalled.close()


def test_target_down_closes_the_client() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    with TCPProxy(dead_port) as proxy, connect(proxy) as sock:
        assert closed_by_peer(sock)
        wait_until(lambda: proxy.connections() == 0, 10)


def test_stop_closes_every_socket_and_leaves_no_thread(echo: EchoServer) -> None:
    before = set(threading.enumerate())
    proxy = TCPProxy(echo.port)
    proxy.start()
    sock = connect(proxy)
    round_trip(sock, b"x")
    proxy.set_mode("stall")
    stalled = connect(proxy)
    wait_until(lambda: proxy.connections() == 2, 10)
    proxy.stop()
    assert closed_by_peer(sock)
    assert closed_by_peer(stalled)
    sock.close()
    stalled.close()
    wait_until(lambda: echo.open == 0, 10)
    # The echo server's own handler threads may still be finishing; only ours must be gone.
    assert [t for t in set(threading.enumerate()) - before if t.name.startswith("TCPProxy")] == []
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=1).close()
    proxy.stop()  # idempotent


def test_restart_binds_the_same_port(echo: EchoServer) -> None:
    with TCPProxy(echo.port) as proxy:
        port = proxy.port
        proxy.stop()
        proxy.start()
        assert proxy.port == port
        with connect(proxy) as sock:
            round_trip(sock, b"again")


def test_many_connections_and_mode_switches_from_threads(proxy: TCPProxy) -> None:
    socks = [connect(proxy) for _ in range(50)]
    for sock in socks:
        round_trip(sock, b"hello")

    def switch() -> None:
        for _ in range(20):
            proxy.set_mode("stall")
            proxy.set_mode("pass")

    switchers = [threading.Thread(target=switch) for _ in range(2)]
    for thread in switchers:
        thread.start()
    for thread in switchers:
        thread.join()
    assert proxy.mode == "pass"
    for sock in socks:
        round_trip(sock, b"world")
        sock.close()
    wait_until(lambda: proxy.connections() == 0, 5)


def test_set_mode_rejects_unknown_modes(proxy: TCPProxy) -> None:
    with pytest.raises(ValueError):
        proxy.set_mode("drop")  # type: ignore[arg-type]
    assert proxy.mode == "pass"
