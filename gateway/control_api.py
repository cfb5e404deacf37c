"""The control API: declare, cancel, inspect and list sessions. Routes only parse, validate and
call :class:`~listenerpool.control.SessionControl`."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BaseModel, Field
from starlette.responses import JSONResponse

from gateway.auth import require_api_token
from gateway.errors import ApiError, error_responses
from gateway.state import GatewayState
from listenerpool import keys
from listenerpool.auth import sign_subscribe_token
from listenerpool.control import ClaimOutcome, ClaimRequest
from listenerpool.index import list_recent
from listenerpool.replies import reply_text
from listenerpool.spec import MAX_HEADER_VALUE, MAX_HEADERS, MAX_HEADERS_BYTES, MAX_URL_LENGTH

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_token)])
MAX_OFFSET = 1_000_000_000  # Redis ranges take 64-bit indexes; nothing lists this many sessions


# The schema states the limits; the checks themselves stay in the core (listenerpool.spec,
# listenerpool.keys) so that violations get their own error codes (invalid_session_id,
# invalid_upstream, headers_too_large) rather than a generic validation error.
SessionId = Annotated[
    str,
    Path(
        description="Session id",
        json_schema_extra={"pattern": keys.SESSION_ID_PATTERN.pattern},
    ),
]


class SessionSpec(BaseModel):
    url: str = Field(
        description="The upstream SSE URL (http or https), checked against LP_UPSTREAM_ALLOW.",
        json_schema_extra={
            "pattern": "^[hH][tT][tT][pP][sS]?://[^/?#\\s]+",
            "maxLength": MAX_URL_LENGTH,
        },
    )
    headers: dict[str, str] = Field(
        default_factory=dict,
        description=(
            f"Request headers to send: at most {MAX_HEADERS}, values up to {MAX_HEADER_VALUE} "
            f"characters, {MAX_HEADERS_BYTES} bytes in all (413 beyond)."
        ),
    )


def state_of(request: Request) -> GatewayState:
    state: GatewayState = request.app.state.gateway
    return state


class PutResult(BaseModel):
    sid: str
    outcome: str = Field(description="created, claimed, unchanged, updated or pending")
    epoch: int


@router.put(
    "/sessions/{sid}",
    status_code=201,
    response_model=PutResult,
    responses={
        200: {"model": PutResult, "description": "Known session (outcome tells what changed)"},
        **error_responses(400, 401, 403, 413, 429, 503),
    },
)
async def put_session(sid: SessionId, spec: SessionSpec, request: Request) -> JSONResponse:
    """Listen to ``sid`` at ``url``. Idempotent: 201 when created, 200 otherwise."""
    result = await state_of(request).control.claim(sid, spec.url, spec.headers)
    status = 201 if result.outcome is ClaimOutcome.CREATED else 200
    body = {"sid": sid, "outcome": result.outcome.value, "epoch": result.epoch}
    return JSONResponse(body, status_code=status)


class BatchItem(SessionSpec):
    sid: str = Field(
        description="Session id", json_schema_extra={"pattern": keys.SESSION_ID_PATTERN.pattern}
    )


class BatchRequest(BaseModel):
    sessions: list[BatchItem] = Field(
        min_length=1,
        description="The sessions to listen to, each at most once; at most LP_MAX_BATCH, and "
        "the body within LP_MAX_BODY_BYTES.",
    )


class BatchResult(BaseModel):
    results: list[PutResult] = Field(description="One per session, in the request's order.")


@router.put(
    "/sessions",
    response_model=BatchResult,
    responses=error_responses(400, 401, 403, 413, 429, 503),
)
async def put_sessions(batch: BatchRequest, request: Request) -> dict[str, Any]:
    """Listen to many sessions in one request, as ``PUT /v1/sessions/{sid}`` does for one
    (idempotent; the outcomes tell what changed). Every session is checked first: one bad
    entry, or a session named twice, is a 4xx naming its position, and nothing is claimed."""
    state = state_of(request)
    limit = state.settings.max_batch
    if len(batch.sessions) > limit:
        raise ApiError(
            400,
            "too_many_sessions",
            f"at most {limit} sessions per request (LP_MAX_BATCH), not {len(batch.sessions)}",
        )
    results = await state.control.claim_many(
        [ClaimRequest(item.sid, item.url, item.headers) for item in batch.sessions]
    )
    return {
        "results": [
            {"sid": item.sid, "outcome": result.outcome.value, "epoch": result.epoch}
            for item, result in zip(batch.sessions, results, strict=True)
        ]
    }


@router.delete(
    "/sessions/{sid}", status_code=202, responses=error_responses(400, 401, 404, 429, 503)
)
async def delete_session(sid: SessionId, request: Request) -> JSONResponse:
    """Stop listening to ``sid`` fleet-wide."""
    if not await state_of(request).control.cancel(sid):
        raise ApiError(404, "unknown_session", f"session {sid!r} does not exist")
    return JSONResponse({"sid": sid, "cancelled": True}, status_code=202)


@router.get("/sessions/{sid}", responses=error_responses(400, 401, 404, 429, 503))
async def get_session(sid: SessionId, request: Request) -> dict[str, Any]:
    status = await state_of(request).control.status(sid)
    if status is None:
        raise ApiError(404, "unknown_session", f"session {sid!r} does not exist")
    return status.as_dict()


class SubscribeTokenRequest(BaseModel):
    ttl: float | None = Field(
        default=None, gt=0, le=86_400, description="Lifetime in seconds (LP_SUBSCRIBE_TOKEN_TTL)."
    )


@router.post(
    "/sessions/{sid}/subscribe-token",
    status_code=201,
    responses=error_responses(400, 401, 404, 409, 429, 503),
)
async def issue_subscribe_token(
    sid: SessionId, request: Request, body: SubscribeTokenRequest | None = None
) -> JSONResponse:
    """A short-lived token that lets a browser follow ``sid``'s events (``?token=``)."""
    state = state_of(request)
    keys_ = state.settings.signing_keys
    if not keys_:
        raise ApiError(409, "signing_disabled", "set LP_SIGNING_KEY to issue subscribe tokens")
    if await state.control.status(sid) is None:
        raise ApiError(404, "unknown_session", f"session {sid!r} does not exist")
    ttl = body.ttl if body is not None and body.ttl is not None else None
    expires_at = int(time.time() + (ttl or state.settings.subscribe_token_ttl))
    token = sign_subscribe_token(keys_, sid, expires_at)
    return JSONResponse({"sid": sid, "token": token, "expires_at": expires_at}, status_code=201)


class StreamTokenRequest(BaseModel):
    sessions: list[str] = Field(
        min_length=1,
        description="The sessions the token lets its bearer follow (at most "
        "LP_MAX_SESSIONS_PER_STREAM), over /v1/stream or each one's own events route.",
    )
    ttl: float | None = Field(
        default=None, gt=0, le=86_400, description="Lifetime in seconds (LP_SUBSCRIBE_TOKEN_TTL)."
    )


@router.post(
    "/subscribe-token",
    status_code=201,
    responses=error_responses(400, 401, 404, 409, 429, 503),
)
async def issue_stream_token(body: StreamTokenRequest, request: Request) -> JSONResponse:
    """A short-lived token that lets a browser follow several sessions (``?token=``), e.g. over
    one ``/v1/stream`` connection."""
    state = state_of(request)
    keys_ = state.settings.signing_keys
    if not keys_:
        raise ApiError(409, "signing_disabled", "set LP_SIGNING_KEY to issue subscribe tokens")
    limit = state.settings.max_sessions_per_stream
    if len(body.sessions) > limit:
        raise ApiError(
            400,
            "too_many_sessions",
            f"at most {limit} sessions per token (LP_MAX_SESSIONS_PER_STREAM), "
            f"not {len(body.sessions)}",
        )
    if len(set(body.sessions)) != len(body.sessions):
        raise ApiError(400, "invalid_sessions", "a session is named twice")
    specs = [keys.SessionKeys(sid).spec for sid in body.sessions]  # 400 on a bad id
    async with state.redis.pipeline(transaction=False) as pipe:
        for spec in specs:
            pipe.exists(spec)
        found = await pipe.execute()
    missing = [sid for sid, there in zip(body.sessions, found, strict=True) if not there]
    if missing:
        raise ApiError(404, "unknown_session", f"session {missing[0]!r} does not exist")
    ttl = body.ttl if body.ttl is not None else state.settings.subscribe_token_ttl
    expires_at = int(time.time() + ttl)
    token = sign_subscribe_token(keys_, body.sessions, expires_at)
    return JSONResponse(
        {"sessions": body.sessions, "token": token, "expires_at": expires_at}, status_code=201
    )


@router.get("/sessions", responses=error_responses(400, 401, 429, 503))
async def list_sessions(
    request: Request,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    """Sessions, most recently updated first, ``limit`` per page from ``offset``."""
    state = state_of(request)
    sids, total = await list_recent(state.redis, offset, limit)
    sessions = []
    for sid in sids:
        status = await state.control.status(sid)
        if status is not None:
            sessions.append(status.as_dict())
    following = offset + limit if offset + limit < total else None
    return {"sessions": sessions, "total": total, "next_offset": following}


@router.get("/workers", responses=error_responses(401, 429, 503))
async def list_workers(request: Request) -> dict[str, Any]:
    """Registered workers: capacity, load, host, pid and how long ago each last beat."""
    state = state_of(request)
    ids = await state.redis.zrange(keys.WORKERS, 0, -1)
    async with state.redis.pipeline(transaction=False) as pipe:
        for worker_id in ids:
            pipe.hgetall(keys.worker_key(reply_text(worker_id)))
        pipe.time()
        *hashes, (seconds, micros) = await pipe.execute()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    workers = []
    for worker_id, raw in zip(ids, hashes, strict=True):
        if not raw:
            continue  # its hash expired: the worker is gone
        info = {reply_text(k): reply_text(v) for k, v in raw.items()}
        workers.append(
            {
                "id": reply_text(worker_id),
                "capacity": int(info.get("capacity", 0)),
                "load": int(info.get("load", 0)),
                "host": info.get("host", ""),
                "pid": int(info.get("pid", 0)),
                "heartbeat_age_s": round((now_ms - int(info.get("heartbeat", now_ms))) / 1000, 1),
            }
        )
    return {"workers": workers}
