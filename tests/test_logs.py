"""Log output: JSON lines with context fields, one line per state change, no secrets."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import signal
from collections.abc import Iterator

import httpx
import pytest

from listenerpool.logs import (
    ConsoleFormatter,
    ContextFilter,
    JsonFormatter,
    log_context,
    redact_url,
)
from listenerpool.testing.loopthread import wait_until
from listenerpool.testing.upstream import SSEUpstream
from tests.conftest import GatewayProcesses, Pool, WorkerProcesses, eventually
from tests.workers.test_failover import wait_listening, wait_min_events

pytestmark = pytest.mark.timeout(60)

SECRET_HEADER = "Bearer hdr-s3cr3t-7f1c"
SECRET_QUERY = "qry-s3cr3t-93ab"


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO, logging.StreamHandler[io.StringIO]]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(ContextFilter())
    logger = logging.getLogger("lp-test-logs")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, stream, handler
    logger.removeHandler(handler)


def test_json_lines_carry_the_bound_context_and_extra_fields(
    captured: tuple[logging.Logger, io.StringIO, logging.StreamHandler[io.StringIO]],
) -> None:
    logger, stream, handler = captured
    handler.setFormatter(JsonFormatter())
    with log_context(worker="w1"):
        with log_context(session="s1", epoch=3):
            logger.info("reader %s", "up", extra={"state": "listening"})
        logger.warning("no session here")
    logger.info("outside", extra={"session": "s2"})
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("crashed")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["msg"] for line in lines] == ["reader up", "no session here", "outside", "crashed"]
    assert lines[0]["level"] == "INFO" and lines[0]["logger"] == "lp-test-logs"
    assert lines[0]["ts"].endswith("+00:00")
    assert {k: lines[0][k] for k in ("worker", "session", "epoch", "state")} == {
        "worker": "w1", "session": "s1", "epoch": 3, "state": "listening",
    }  # fmt: skip
    assert lines[1]["worker"] == "w1" and "session" not in lines[1]
    assert lines[2]["session"] == "s2" and "worker" not in lines[2]
    assert "ValueError: boom" in lines[3]["exc"]


def test_console_lines_append_the_context(
    captured: tuple[logging.Logger, io.StringIO, logging.StreamHandler[io.StringIO]],
) -> None:
    logger, stream, handler = captured
    handler.setFormatter(ConsoleFormatter())
    with log_context(worker="w1", session="s1"):
        logger.info("listening")
    assert stream.getvalue().rstrip().endswith("lp-test-logs: listening [worker=w1 session=s1]")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://runner:8000/events/a", "http://runner:8000/events/a"),
        ("https://u:pw@runner/e?token=abc&x=1", "https://***@runner/e?token=***&x=***"),
        ("http://[::1]:9/e?k", "http://[::1]:9/e?k=***"),
    ],
)
def test_redact_url_hides_credentials_and_query_values(url: str, shown: str) -> None:
    assert redact_url(url) == shown


async def test_a_worker_logs_json_state_changes_with_context_and_no_secrets(
    redis_url: str, upstream: SSEUpstream, worker_processes: WorkerProcesses
) -> None:
    worker = worker_processes.start(redis_url, "logw", log_format="json", log_level="DEBUG")
    pool = Pool(redis_url)
    sid = "logged"
    try:
        url = f"{upstream.url(sid)}?token={SECRET_QUERY}"
        await pool.control.claim(sid, url, {"Authorization": SECRET_HEADER})
        await wait_listening(pool, [sid], owner="logw")
        await wait_min_events(pool, [sid], 40)
        assert upstream.stats(sid).request_headers[-1]["authorization"] == SECRET_HEADER
        upstream.configure(sid, mode="status:503")  # closes the stream: backoff, retries
        await eventually(lambda: "backoff" in worker_processes.log("logw"), 10, "no backoff logged")
        upstream.reset(sid)
        await eventually(
            lambda: worker_processes.log("logw").count('"state": "listening"') >= 2,
            10,
            "no second listening line",
        )
        await pool.control.cancel(sid)
        await eventually(lambda: '"state": "stopped"' in worker_processes.log("logw"), 10)
        worker.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(worker.wait, 15) == 0
    finally:
        await pool.aclose()

    text = worker_processes.log("logw")
    assert SECRET_HEADER not in text and "hdr-s3cr3t" not in text
    assert SECRET_QUERY not in text
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    for line in lines:
        assert {"ts", "level", "logger", "msg"} <= line.keys(), line
    about_session = [line for line in lines if line.get("session") == sid]
    for line in about_session:
        assert line["worker"] == "logw", line
        assert isinstance(line["epoch"], int), line
    states = [line["state"] for line in about_session if "state" in line]
    assert states[0] == "connecting"
    for expected in ("listening", "backoff", "stopped"):
        assert expected in states, states
    # One line per state change, not per event: 40+ events, a handful of listening lines.
    assert states.count("listening") <= 3, states


def test_a_gateway_logs_json_lines_and_hides_query_values(
    redis_url: str, gateway_processes: GatewayProcesses
) -> None:
    proc, base = gateway_processes.start(redis_url, "loggw", log_format="json", log_level="INFO")
    response = httpx.get(f"{base}/v1/sessions/nobody/events?token={SECRET_QUERY}", timeout=5)
    assert response.status_code == 404
    wait_until(
        lambda: "/v1/sessions/nobody/events" in gateway_processes.log("loggw"),
        10,
        "no access line logged",
    )
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    text = gateway_processes.log("loggw")
    assert SECRET_QUERY not in text
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert {line["logger"] for line in lines} >= {"uvicorn.error", "uvicorn.access"}
    for line in lines:
        assert {"ts", "level", "logger", "msg"} <= line.keys(), line
    [access] = [line for line in lines if "nobody" in line["msg"]]
    assert access["logger"] == "uvicorn.access"
    assert "/v1/sessions/nobody/events?token=***" in access["msg"]
