"""Errors as JSON ``{"error": {"code", "message"}}`` with the right status, for every route."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from gateway.hub import REDIS_ERRORS, HubUnavailable
from listenerpool.errors import InvalidSessionId, InvalidUpstream


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def error_response(status: int, code: str, message: str, **headers: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers or None
    )


def install_error_handlers(app: FastAPI) -> None:
    async def api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return error_response(exc.status, exc.code, exc.message)

    async def invalid_sid(_: Request, exc: Exception) -> JSONResponse:
        return error_response(400, "invalid_session_id", str(exc))

    async def invalid_upstream(_: Request, exc: Exception) -> JSONResponse:
        return error_response(400, "invalid_upstream", str(exc))

    async def validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        first: dict[str, Any] = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error_response(400, "invalid_request", f"{where}: {first.get('msg', 'invalid')}")

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail))

    async def unavailable(request: Request, exc: Exception) -> JSONResponse:
        request.app.state.metrics.redis_error["api"].inc()
        return error_response(503, "redis_unavailable", f"Redis is unavailable: {exc}")

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(InvalidSessionId, invalid_sid)
    app.add_exception_handler(InvalidUpstream, invalid_upstream)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(HubUnavailable, unavailable)
    for error in REDIS_ERRORS:
        app.add_exception_handler(error, unavailable)
