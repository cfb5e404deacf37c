"""The control API: declare, cancel, inspect and list sessions. Routes only parse, validate and
call :class:`~listenerpool.control.SessionControl`."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field
from starlette.responses import JSONResponse

from gateway.errors import ApiError
from gateway.state import GatewayState
from listenerpool import keys
from listenerpool.control import ClaimOutcome

router = APIRouter(prefix="/v1")


class SessionSpec(BaseModel):
    url: str = Field(description="The upstream SSE URL (http or https).")
    headers: dict[str, str] = Field(default_factory=dict, description="Request headers to send.")


def state_of(request: Request) -> GatewayState:
    state: GatewayState = request.app.state.gateway
    return state


@router.put("/sessions/{sid}", status_code=201)
async def put_session(sid: str, spec: SessionSpec, request: Request) -> JSONResponse:
    """Listen to ``sid`` at ``url``. Idempotent: 201 when created, 200 otherwise."""
    result = await state_of(request).control.claim(sid, spec.url, spec.headers)
    status = 201 if result.outcome is ClaimOutcome.CREATED else 200
    body = {"sid": sid, "outcome": result.outcome.value, "epoch": result.epoch}
    return JSONResponse(body, status_code=status)


@router.delete("/sessions/{sid}", status_code=202)
async def delete_session(sid: str, request: Request) -> JSONResponse:
    """Stop listening to ``sid`` fleet-wide."""
    if not await state_of(request).control.cancel(sid):
        raise ApiError(404, "unknown_session", f"session {sid!r} does not exist")
    return JSONResponse({"sid": sid, "cancelled": True}, status_code=202)


@router.get("/sessions/{sid}")
async def get_session(sid: str, request: Request) -> dict[str, Any]:
    status = await state_of(request).control.status(sid)
    if status is None:
        raise ApiError(404, "unknown_session", f"session {sid!r} does not exist")
    return status.as_dict()


@router.get("/sessions")
async def list_sessions(
    request: Request,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    """Sessions, most recently updated first, ``limit`` per page from ``offset``."""
    state = state_of(request)
    raw = await state.redis.zrevrange(keys.SESSIONS, offset, offset + limit - 1)
    sessions = []
    for item in raw:
        status = await state.control.status(item.decode() if isinstance(item, bytes) else item)
        if status is not None:
            sessions.append(status.as_dict())
    total = await state.redis.zcard(keys.SESSIONS)
    following = offset + limit if offset + limit < total else None
    return {"sessions": sessions, "total": total, "next_offset": following}
