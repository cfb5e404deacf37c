"""The multiplexed stream's frames and SSE position ids (gateway.streamproto), as pure functions."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.streamproto import (
    MAX_SEQ,
    StreamError,
    Subscribe,
    Unsubscribe,
    decode_position_id,
    encode_position_id,
    error_frame,
    event_frame,
    list_tag,
    max_position_id_chars,
    parse_client_frame,
    parse_sessions,
    reset_frame,
    subscribed_frame,
    unsubscribed_frame,
)
from listenerpool.envelope import Envelope
from listenerpool.keys import SESSION_ID_PATTERN

sids = st.from_regex(SESSION_ID_PATTERN, fullmatch=True)
seqs = st.integers(min_value=0, max_value=MAX_SEQ)


def code_of(call: object, *args: object) -> str:
    with pytest.raises(StreamError) as info:
        call(*args)  # type: ignore[operator]
    return info.value.code


# -- position ids --------------------------------------------------------------------------------
@given(st.lists(sids, min_size=1, max_size=40, unique=True), st.data())
def test_a_position_id_round_trips_for_any_session_ids_and_seqs(
    names: list[str], data: st.DataObject
) -> None:
    positions = data.draw(st.lists(seqs, min_size=len(names), max_size=len(names)))
    tag = list_tag(names)
    text = encode_position_id(tag, positions)
    assert decode_position_id(text, tag, len(names)) == positions
    assert len(text) <= max_position_id_chars(len(names))
    # An SSE id: one line, no NUL; plain ASCII, so a header carries it unchanged.
    assert text.isascii() and not any(c in text for c in "\r\n\0 ,:")


@given(st.lists(sids, min_size=2, max_size=10, unique=True), st.data())
def test_a_position_id_is_refused_for_another_session_list(
    names: list[str], data: st.DataObject
) -> None:
    positions = data.draw(st.lists(seqs, min_size=len(names), max_size=len(names)))
    text = encode_position_id(list_tag(names), positions)
    others = [
        names[1:],  # a session fewer
        [*names, "x" if "x" not in names else "y"],  # one more
        list(reversed(names)),  # the same sessions in another order
    ]
    for other in others:
        assert code_of(decode_position_id, text, list_tag(other), len(other)) == (
            "invalid_last_event_id"
        )


@given(st.text(max_size=200))
def test_decoding_any_text_gives_positions_or_a_stream_error(text: str) -> None:
    tag = list_tag(["a", "b"])
    try:
        positions = decode_position_id(text, tag, 2)
    except StreamError as exc:
        assert exc.code == "invalid_last_event_id"
    else:
        assert len(positions) == 2 and all(0 <= p <= MAX_SEQ for p in positions)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "12",
        "{tag}",
        "{tag}.1",  # one position for two sessions
        "{tag}.1.2.3",
        "{tag}.1.",
        "{tag}.A.1",  # upper case is not base 36 here
        "{tag}.-1.1",
        "{tag}.1 .1",
        "{tag}.zzzzzzzzzzzzz.1",  # over the largest seq
        "00000000.1.1",
    ],
)
def test_malformed_position_ids_are_refused(text: str) -> None:
    tag = list_tag(["a", "b"])
    assert code_of(decode_position_id, text.format(tag=tag), tag, 2) == "invalid_last_event_id"


def test_a_position_id_is_short_and_bounded() -> None:
    tag = list_tag(["a", "b", "c"])
    assert encode_position_id(tag, [12, 0, 40]) == f"{tag}.c.0.14"
    # 256 sessions at the largest seq still fit well within a request header.
    assert len(encode_position_id(tag, [MAX_SEQ] * 256)) == max_position_id_chars(256) < 4096


# -- the session list ----------------------------------------------------------------------------
def test_sessions_are_listed_with_optional_positions() -> None:
    assert parse_sessions("a,b:12,c.d-e_f:0", 10) == [("a", 0), ("b", 12), ("c.d-e_f", 0)]


@pytest.mark.parametrize(
    ("value", "code"),
    [
        (None, "invalid_sessions"),
        ("", "invalid_sessions"),
        ("a,a", "invalid_sessions"),
        ("a,", "invalid_session_id"),
        ("a b", "invalid_session_id"),
        ("a:", "invalid_after"),
        ("a:-1", "invalid_after"),
        ("a:x", "invalid_after"),
        ("a:1234567890123456789", "invalid_after"),
        ("a,b,c,d", "too_many_sessions"),
    ],
)
def test_bad_session_lists_are_refused(value: str | None, code: str) -> None:
    assert code_of(parse_sessions, value, 3) == code


# -- client frames -------------------------------------------------------------------------------
def test_client_frames_parse() -> None:
    assert parse_client_frame('{"op": "subscribe", "sid": "a"}') == Subscribe("a", 0)
    assert parse_client_frame('{"op":"subscribe","sid":"a","after":12}') == Subscribe("a", 12)
    assert parse_client_frame('{"op": "unsubscribe", "sid": "a"}') == Unsubscribe("a")
    with_token = '{"op": "subscribe", "sid": "a", "after": 3, "token": "t.k"}'
    assert parse_client_frame(with_token) == Subscribe("a", 3, "t.k")


@pytest.mark.parametrize(
    ("text", "code", "sid"),
    [
        (None, "bad_frame", None),
        (b'{"op": "subscribe", "sid": "a"}', "bad_frame", None),
        ("not json", "bad_frame", None),
        ("[1, 2]", "bad_frame", None),
        ('{"sid": "a"}', "bad_frame", "a"),
        ('{"op": "publish", "sid": "a"}', "bad_frame", "a"),
        ('{"op": "subscribe"}', "bad_frame", None),
        ('{"op": "subscribe", "sid": 7}', "invalid_session_id", None),
        ('{"op": "subscribe", "sid": "a/b"}', "invalid_session_id", None),
        ('{"op": "subscribe", "sid": "a", "after": -1}', "invalid_after", "a"),
        ('{"op": "subscribe", "sid": "a", "after": "3"}', "invalid_after", "a"),
        ('{"op": "subscribe", "sid": "a", "after": true}', "invalid_after", "a"),
        ('{"op": "subscribe", "sid": "a", "after": 1.5}', "invalid_after", "a"),
        ('{"op": "subscribe", "sid": "a", "from": 1}', "bad_frame", "a"),
        ('{"op": "unsubscribe", "sid": "a", "after": 1}', "bad_frame", "a"),
        ('{"op": "subscribe", "sid": "a", "token": 5}', "bad_frame", "a"),
        ('{"op": "subscribe", "sid": "a", "token": ""}', "bad_frame", "a"),
        ('{"op": "unsubscribe", "sid": "a", "token": "t"}', "bad_frame", "a"),
        ('{"op": "subscribe", "sid": "a", "token": "' + "t" * 70_000 + '"}', "bad_frame", None),
    ],
)
def test_bad_client_frames_name_their_fault_and_session(
    text: str | bytes | None, code: str, sid: str | None
) -> None:
    with pytest.raises(StreamError) as info:
        parse_client_frame(text)
    assert (info.value.code, info.value.sid) == (code, sid)
    assert info.value.message


@given(st.text(max_size=100))
def test_any_text_is_a_frame_or_a_stream_error(text: str) -> None:
    try:
        frame = parse_client_frame(text)
    except StreamError:
        return
    assert isinstance(frame, Subscribe | Unsubscribe)


# -- gateway frames ------------------------------------------------------------------------------
@given(sids, st.integers(1, MAX_SEQ), st.text(), st.text(), st.text())
def test_an_event_frame_is_the_envelope_with_its_sid_first(
    sid: str, seq: int, event: str, data: str, upstream_id: str
) -> None:
    env = Envelope(seq, 3, event, data, upstream_id)
    text = event_frame(sid, env.to_json())
    obj = json.loads(text)
    assert list(obj) == ["sid", "seq", "epoch", "event", "data", "id"]
    assert obj == {"sid": sid, "seq": seq, "epoch": 3, "event": event, "data": data,
                   "id": upstream_id}  # fmt: skip
    assert "\n" not in text and "\r" not in text  # one SSE data: line


def test_control_frames() -> None:
    assert json.loads(subscribed_frame("a", 4)) == {"op": "subscribed", "sid": "a", "after": 4}
    assert json.loads(unsubscribed_frame("a")) == {"op": "unsubscribed", "sid": "a"}
    assert json.loads(reset_frame("a", 4, 9)) == {
        "op": "reset",
        "sid": "a",
        "after": 4,
        "first_seq": 9,
    }
    assert json.loads(error_frame(None, "bad_frame", "why")) == {
        "op": "error",
        "sid": None,
        "code": "bad_frame",
        "message": "why",
    }
