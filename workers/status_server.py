"""A worker's own HTTP port (``LP_METRICS_PORT``): ``/metrics``, ``/healthz`` and ``/readyz``.

It runs in a thread of its own, beside the worker's event loop, so a scrape never waits for the
loop and a loop busy with thousands of readers never delays a scrape. What it reads from the
worker (reader states, the time of the last confirmed renewal) is safe to read from a thread.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any, Final
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry

from listenerpool.metrics import CONTENT_TYPE, exposition
from listenerpool.service import Service

#: The routes this server answers; anything else is 404.
ROUTES: Final = ("/metrics", "/healthz", "/readyz")

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes and probes every few seconds are not worth a log line each."""


class StatusServer(Service):
    """Serves ``registry`` and the worker's health on ``host:port`` until :meth:`stop`.

    ``healthy()`` decides ``/readyz`` (200 or 503); ``/healthz`` answers 200 while the process
    serves at all. Port 0 binds a free port; :attr:`port` tells which.
    """

    def __init__(
        self, registry: CollectorRegistry, healthy: Callable[[], bool], host: str, port: int
    ) -> None:
        self._registry = registry
        self._healthy = healthy
        self._server = make_server(
            host, port, self._app, server_class=_Server, handler_class=_QuietHandler
        )
        self.port: int = self._server.server_port
        self._thread = threading.Thread(
            target=self._server.serve_forever, name=f"status:{self.port}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket. Idempotent."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(5)
        self._server.server_close()

    def _app(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return _reply(start_response, "200 OK", exposition(self._registry), CONTENT_TYPE)
        if path == "/healthz":
            return _json(start_response, "200 OK", {"status": "ok"})
        if path == "/readyz":
            if self._healthy():
                return _json(start_response, "200 OK", {"status": "ready"})
            error = {"code": "not_ready", "message": "starting, draining or cut off from Redis"}
            return _json(start_response, "503 Service Unavailable", {"error": error})
        error = {"code": "not_found", "message": f"no route {path}"}
        return _json(start_response, "404 Not Found", {"error": error})


def _json(start_response: StartResponse, status: str, body: object) -> Iterable[bytes]:
    return _reply(start_response, status, json.dumps(body).encode(), "application/json")


def _reply(
    start_response: StartResponse, status: str, body: bytes, content_type: str
) -> Iterable[bytes]:
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body)))])
    return [body]
