from __future__ import annotations

import json
import re

import pytest

from listenerpool.envelope import Envelope, envelope_parts
from listenerpool.errors import HeadersTooLarge, InvalidInput, InvalidSessionId, InvalidUpstream
from listenerpool.keys import SessionKeys, check_session_id, worker_key
from listenerpool.spec import (
    MAX_HEADER_VALUE,
    MAX_HEADERS,
    MAX_HEADERS_BYTES,
    UpstreamSpec,
)


# -- session ids and keys ----------------------------------------------------------------------
@pytest.mark.parametrize("sid", ["a", "s1", "A.b_c-9", "x" * 128, "...", "-"])
def test_valid_session_ids_pass_unchanged(sid: str) -> None:
    assert check_session_id(sid) == sid


@pytest.mark.parametrize(
    "sid",
    ["", "x" * 129, "a/b", "a:b", "a{b", "a}b", "a b", "é", "a\n", "\u0663", "*", None, 5],
)
def test_invalid_session_ids_are_refused(sid: object) -> None:
    with pytest.raises(InvalidSessionId, match="invalid session id"):
        check_session_id(sid)  # type: ignore[arg-type]


def test_invalid_session_id_is_an_invalid_input() -> None:
    with pytest.raises(InvalidInput):
        SessionKeys("a:b")


def test_session_keys_carry_the_sid_as_hash_tag() -> None:
    k = SessionKeys("s-1")
    names = {
        "spec": k.spec,
        "lease": k.lease,
        "cancel": k.cancel,
        "state": k.state,
        "events": k.events,
        "live": k.live,
    }
    for what, key in names.items():
        assert key == f"lp:{{s-1}}:{what}"
        # Redis Cluster hashes only the text between the first '{' and the next '}'.
        assert re.search(r"\{([^}]*)\}", key).group(1) == "s-1"  # type: ignore[union-attr]
    assert k.sid == "s-1"
    assert worker_key("w1") == "lp:worker:w1"


# -- upstream spec -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "url",
    [
        "http://runner:8080/events/s1",
        "https://example.com/x?y=1",
        "HTTP://example.com/",
        "http://[::1]:80/",
    ],
)
def test_http_and_https_urls_are_accepted(url: str) -> None:
    assert UpstreamSpec(url).url == url


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "required"),
        ("ftp://example.com/x", "http or https"),
        ("file:///etc/passwd", "http or https"),
        ("ws://example.com/", "http or https"),
        ("example.com/events", "http or https"),
        ("http:///events", "no host"),
        ("http://:8080/events", "no host"),
        ("http://exa mple.com/", "whitespace"),
        ("http://example.com/\r\nX-Evil: 1", "whitespace"),
        ("http://example.com/\x00", "control characters"),
        ("http://example.com:99999/", "malformed"),
        ("http://[::1/", "malformed"),
        ("http://example.com:0/", "port 0"),
        ("http://example.com/" + "a" * 9000, "longer than"),
    ],
)
def test_bad_urls_are_refused_with_a_clear_message(url: str, message: str) -> None:
    with pytest.raises(InvalidUpstream, match=re.escape(message)):
        UpstreamSpec(url)


@pytest.mark.parametrize(
    "name",
    ["Last-Event-ID", "last-event-id", "Host", "Content-Length", "Transfer-Encoding", "CONNECTION"],
)
def test_reserved_headers_are_refused(name: str) -> None:
    with pytest.raises(InvalidUpstream, match="set by the pool"):
        UpstreamSpec("http://u/", {name: "x"})


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({"X-A": "ok\r\nX-Evil: 1"}, "CR, LF or NUL"),
        ({"X-A": "ok\nX-Evil: 1"}, "CR, LF or NUL"),
        ({"X-A": "nul\x00"}, "CR, LF or NUL"),
        ({"X" * 257: "1"}, "invalid header name"),
        ({"X-A\r\nX-Evil": "1"}, "invalid header name"),
        ({"X A": "1"}, "invalid header name"),
        ({"": "1"}, "invalid header name"),
        ({"X-A": 1}, "string value"),
    ],
)
def test_bad_headers_are_refused(headers: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidUpstream, match=re.escape(message)):
        UpstreamSpec("http://u/", headers)  # type: ignore[arg-type]


def test_header_count_is_limited() -> None:
    allowed = {f"X-H{i}": "v" for i in range(MAX_HEADERS)}
    assert len(UpstreamSpec("http://u/", allowed).headers) == MAX_HEADERS
    with pytest.raises(HeadersTooLarge, match=f"at most {MAX_HEADERS} are allowed"):
        UpstreamSpec("http://u/", {**allowed, "X-One-Too-Many": "v"})


def test_header_value_size_is_limited() -> None:
    assert UpstreamSpec("http://u/", {"X-A": "v" * MAX_HEADER_VALUE}).headers
    with pytest.raises(HeadersTooLarge, match=f"over {MAX_HEADER_VALUE} characters"):
        UpstreamSpec("http://u/", {"X-A": "v" * (MAX_HEADER_VALUE + 1)})


def test_total_header_size_is_limited() -> None:
    # Each header is within its own limits; together they are not.
    per = MAX_HEADER_VALUE - 100
    fits = {"X-A": "v" * per}
    assert UpstreamSpec("http://u/", fits).headers
    with pytest.raises(HeadersTooLarge, match=f"at most {MAX_HEADERS_BYTES}"):
        UpstreamSpec("http://u/", {"X-A": "v" * per, "X-B": "v" * per, "X-C": "v" * per})


def test_headers_must_be_a_mapping() -> None:
    with pytest.raises(InvalidUpstream, match="object"):
        UpstreamSpec("http://u/", [("X-A", "1")])  # type: ignore[arg-type]


def test_headers_json_is_canonical_and_round_trips() -> None:
    a = UpstreamSpec("http://u/", {"X-B": "2", "Authorization": "Bearer é"})
    b = UpstreamSpec("http://u/", {"Authorization": "Bearer é", "X-B": "2"})
    assert a.headers_json() == b.headers_json()
    assert a.headers_json().index("Authorization") < a.headers_json().index("X-B")
    back = UpstreamSpec.from_redis(a.url, a.headers_json())
    assert back == UpstreamSpec("http://u/", {"Authorization": "Bearer é", "X-B": "2"})
    assert UpstreamSpec.from_redis("http://u/", "").headers == {}


# -- envelope ----------------------------------------------------------------------------------
ENVELOPES = [
    Envelope(seq=1, epoch=1, event="message", data="plain"),
    Envelope(
        seq=42, epoch=7, event="TEXT_MESSAGE_CONTENT", data='{"delta":"héllo ✓ 😀"}', id="e-42"
    ),
    Envelope(seq=3, epoch=2, event="", data='quote " backslash \\ newline\nline2\ttab', id='"x"'),
    Envelope(seq=10**12, epoch=10**6, event="ünïcode", data="", id="ид"),
]


@pytest.mark.parametrize("env", ENVELOPES)
def test_envelope_json_round_trips(env: Envelope) -> None:
    raw = env.to_json()
    assert json.loads(raw) == {
        "seq": env.seq,
        "epoch": env.epoch,
        "event": env.event,
        "data": env.data,
        "id": env.id,
    }
    assert Envelope.from_json(raw) == env
    assert Envelope.from_json(raw.encode()) == env


@pytest.mark.parametrize("env", ENVELOPES)
def test_envelope_parts_around_seq_equal_to_json(env: Envelope) -> None:
    head, tail = envelope_parts(env.epoch, env.event, env.data, env.id)
    assert head + str(env.seq) + tail == env.to_json()


def test_envelope_from_json_defaults_missing_id() -> None:
    assert Envelope.from_json('{"seq":1,"epoch":2,"event":"e","data":"d"}').id == ""


def test_envelope_from_stream_entry_with_bytes_fields() -> None:
    fields = {
        b"seq": b"5",
        b"epoch": b"2",
        b"event": b"RUN_STARTED",
        b"data": '{"t":"é"}'.encode(),
        b"uid": b"u-5",
    }
    assert Envelope.from_stream_entry(fields) == Envelope(5, 2, "RUN_STARTED", '{"t":"é"}', "u-5")


def test_envelope_from_stream_entry_with_str_fields_and_no_uid() -> None:
    fields = {"seq": "1", "epoch": "1", "event": "m", "data": "x"}
    assert Envelope.from_stream_entry(fields) == Envelope(1, 1, "m", "x", "")
