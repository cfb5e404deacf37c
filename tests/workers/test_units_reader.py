"""The reader's pure decisions: which upstream answers are permanent, retryable or accepted."""

from __future__ import annotations

import email.utils
import time

import httpx
import pytest

from listenerpool.errors import UpstreamError, UpstreamRejected
from workers.reader import check_response, parse_retry_after


def response(
    status: int, content_type: str = "text/event-stream", **headers: str
) -> httpx.Response:
    return httpx.Response(status, headers={"content-type": content_type, **headers})


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410, 204])
def test_permanent_statuses(status: int) -> None:
    with pytest.raises(UpstreamRejected, match=str(status)):
        check_response(response(status))


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503])
def test_retryable_statuses(status: int) -> None:
    with pytest.raises(UpstreamError) as info:
        check_response(response(status))
    assert not isinstance(info.value, UpstreamRejected)
    assert info.value.permanent is False


def test_retry_after_seconds_is_carried() -> None:
    with pytest.raises(UpstreamError) as info:
        check_response(response(429, **{"retry-after": "7"}))
    assert info.value.retry_after == 7.0


def test_retry_after_http_date() -> None:
    later = email.utils.formatdate(time.time() + 120, usegmt=True)
    delay = parse_retry_after(later)
    assert delay is not None and 100 < delay <= 120
    assert parse_retry_after("next tuesday") is None
    assert parse_retry_after(None) is None


def test_content_type_must_be_event_stream() -> None:
    check_response(response(200, "text/event-stream; charset=utf-8"))
    with pytest.raises(UpstreamError, match="text/html"):
        check_response(response(200, "text/html"))
