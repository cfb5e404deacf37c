"""Errors as JSON ``{"error": {"code", "message"}}`` with the right status, for every route."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.routing import Match

from gateway.hub import HubUnavailable
from listenerpool.errors import (
    HeadersTooLarge,
    InvalidSessionId,
    InvalidUpstream,
    UpstreamNotAllowed,
)
from listenerpool.shardsub import REDIS_ERRORS


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    """Every error response: ``{"error": {"code", "message"}}``."""

    error: ErrorDetail


_DESCRIPTIONS = {
    400: "Invalid request (session id, URL, headers, body or parameters)",
    401: "Missing or wrong credentials",
    403: "Refused (upstream_not_allowed: the URL's host is outside LP_UPSTREAM_ALLOW; "
    "wrong_session: a subscribe token for another session)",
    404: "Unknown session or route",
    405: "Method not allowed",
    409: "Conflict (signing_disabled: no LP_SIGNING_KEY to sign subscribe tokens)",
    413: "Body or upstream headers too large",
    429: "Too many requests (rate_limited, with Retry-After) or clients (too_many_clients)",
    503: "Redis unavailable, or this gateway is full (gateway_full)",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries documenting the JSON error body for ``statuses``."""
    return {
        status: {"model": ErrorBody, "description": _DESCRIPTIONS[status]} for status in statuses
    }


class ApiError(Exception):
    def __init__(
        self, status: int, code: str, message: str, *, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def error_response(status: int, code: str, message: str, **headers: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers or None
    )


def allowed_methods(request: Request) -> str:
    """Every method the routes at this path take. Starlette's 405 names only those of the
    first route matching the path, though several routes share it (GET, PUT, DELETE)."""
    methods = []
    for method in ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT"):
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] is Match.FULL for route in request.app.router.routes):
            methods.append(method)
    return ", ".join(methods)


def install_error_handlers(app: FastAPI) -> None:
    async def api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return error_response(exc.status, exc.code, exc.message, **exc.headers)

    async def invalid_sid(_: Request, exc: Exception) -> JSONResponse:
        return error_response(400, "invalid_session_id", str(exc))

    async def invalid_upstream(_: Request, exc: Exception) -> JSONResponse:
        return error_response(400, "invalid_upstream", str(exc))

    async def not_allowed(_: Request, exc: Exception) -> JSONResponse:
        return error_response(403, "upstream_not_allowed", str(exc))

    async def headers_too_large(_: Request, exc: Exception) -> JSONResponse:
        return error_response(413, "headers_too_large", str(exc))

    async def validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        first: dict[str, Any] = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error_response(400, "invalid_request", f"{where}: {first.get('msg', 'invalid')}")

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = allowed_methods(request)
        return error_response(exc.status_code, code, str(exc.detail), **headers)

    async def unavailable(request: Request, exc: Exception) -> JSONResponse:
        request.app.state.metrics.redis_error["api"].inc()
        return error_response(503, "redis_unavailable", f"Redis is unavailable: {exc}")

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(InvalidSessionId, invalid_sid)
    app.add_exception_handler(InvalidUpstream, invalid_upstream)
    app.add_exception_handler(UpstreamNotAllowed, not_allowed)
    app.add_exception_handler(HeadersTooLarge, headers_too_large)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(HubUnavailable, unavailable)
    for error in REDIS_ERRORS:
        app.add_exception_handler(error, unavailable)
