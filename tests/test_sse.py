"""Tests of the sans-I/O event-stream parser against the WHATWG conformance table and more."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from listenerpool.errors import EventTooLarge
from listenerpool.sse import SSEEvent, SSEParser

CASES: list[dict[str, Any]] = json.loads(
    (Path(__file__).parent / "data" / "sse-cases.json").read_text(encoding="utf-8")
)["cases"]
CASE_IDS = [case["name"] for case in CASES]


def case_chunks(case: dict[str, Any]) -> list[bytes]:
    if "hex_chunks" in case:
        return [bytes.fromhex(chunk) for chunk in case["hex_chunks"]]
    return [chunk.encode("utf-8") for chunk in case["chunks"]]


def run(chunks: Iterable[bytes], **kwargs: Any) -> tuple[SSEParser, list[SSEEvent]]:
    parser = SSEParser(**kwargs)
    events: list[SSEEvent] = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    return parser, events


def check_against(case: dict[str, Any], parser: SSEParser, events: list[SSEEvent]) -> None:
    expect = case["expect"]
    assert [{"type": e.type, "data": e.data, "id": e.id} for e in events] == expect["events"]
    assert parser.last_event_id == expect["last_event_id"]
    assert parser.retry == expect["retry"]


def test_fixture_is_loaded() -> None:
    assert len(CASES) >= 30
    assert len(set(CASE_IDS)) == len(CASE_IDS)
    assert any("hex_chunks" in case for case in CASES)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_conformance(case: dict[str, Any]) -> None:
    parser, events = run(case_chunks(case))
    check_against(case, parser, events)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_conformance_one_byte_at_a_time(case: dict[str, Any]) -> None:
    stream = b"".join(case_chunks(case))
    parser, events = run(stream[i : i + 1] for i in range(len(stream)))
    check_against(case, parser, events)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_conformance_every_two_chunk_split(case: dict[str, Any]) -> None:
    stream = b"".join(case_chunks(case))
    for cut in range(len(stream) + 1):
        parser, events = run([stream[:cut], stream[cut:]])
        check_against(case, parser, events)


def test_events_are_returned_by_the_chunk_that_completes_them() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\n") == []
    assert parser.feed(b"\ndata: b\n") == [SSEEvent("message", "a", "")]
    assert parser.feed(b"\n") == [SSEEvent("message", "b", "")]


def test_cr_at_chunk_end_then_lf_is_one_line_ending() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    # Were the LF a second line ending, it would be a blank line dispatching "a" alone.
    assert parser.feed(b"\ndata: b\r") == []
    assert parser.feed(b"\n\r") == [SSEEvent("message", "a\nb", "")]
    assert parser.feed(b"\n") == []


def test_cr_pairing_survives_empty_chunks() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"") == []
    assert parser.feed(b"\n") == []
    assert parser.feed(b"data: b\n\n") == [SSEEvent("message", "a\nb", "")]


def test_cr_at_chunk_end_then_cr_is_two_line_endings() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\r") == [SSEEvent("message", "a", "")]


def test_lf_after_a_cr_mid_chunk_is_not_swallowed_later() -> None:
    # The CR is followed by other bytes, so the next chunk's LF ends a line of its own.
    parser = SSEParser()
    assert parser.feed(b"data: a\rdata: b") == []
    assert parser.feed(b"\n\n") == [SSEEvent("message", "a\nb", "")]


@pytest.mark.parametrize("char", ["é", "€", "😀"])
def test_multibyte_character_split_across_chunks(char: str) -> None:
    stream = f"event: {char}\ndata: x{char}y\n\n".encode()
    expected = [SSEEvent(char, f"x{char}y", "")]
    start = stream.index(char.encode())
    for cut in range(start, start + len(char.encode()) + 1):
        assert run([stream[:cut], stream[cut:]])[1] == expected
    data_start = stream.index(char.encode(), start + 1)
    pieces = [
        stream[: data_start + 1],
        stream[data_start + 1 : data_start + 2],
        stream[data_start + 2 :],
    ]
    assert run(pieces)[1] == expected


def test_truncated_utf8_before_line_end_is_replaced() -> None:
    _, events = run([b"data: a\xe2\x82", b"\ndata: b\n\n"])
    assert events == [SSEEvent("message", "a\ufffd\nb", "")]


def test_bom_split_across_chunks_is_skipped() -> None:
    _, events = run([b"\xef", b"\xbb", b"\xbfdata: a\n\n"])
    assert events == [SSEEvent("message", "a", "")]


def test_bom_after_the_first_line_is_not_skipped() -> None:
    _, events = run([b"\n\xef\xbb\xbfdata: a\n\n", b"data: b\n\n"])
    assert events == [SSEEvent("message", "b", "")]


def test_oversized_line_without_newline_raises() -> None:
    parser = SSEParser(max_event_bytes=16)
    assert parser.feed(b"x" * 16) == []
    with pytest.raises(EventTooLarge, match="max_event_bytes=16"):
        parser.feed(b"x")


def test_oversized_line_in_one_chunk_raises() -> None:
    with pytest.raises(EventTooLarge, match="max_event_bytes=16"):
        SSEParser(max_event_bytes=16).feed(b"x" * 1000)


def test_garbage_byte_at_a_time_is_bounded() -> None:
    parser = SSEParser(max_event_bytes=64)
    with pytest.raises(EventTooLarge):
        for _ in range(65):
            parser.feed(b"\x00")


def test_line_limit_counts_bytes_not_characters() -> None:
    line = "data: " + "€" * 4  # 6 + 12 = 18 bytes, 10 characters
    with pytest.raises(EventTooLarge):
        SSEParser(max_event_bytes=17).feed(line.encode() + b"\n\n")
    assert SSEParser(max_event_bytes=18).feed(line.encode() + b"\n\n") == [
        SSEEvent("message", "€" * 4, "")
    ]


def test_line_at_the_limit_is_accepted() -> None:
    line = b": " + b"c" * 14  # exactly 16 bytes, terminator excluded
    parser = SSEParser(max_event_bytes=16)
    assert parser.feed(line + b"\r\n") == []
    assert parser.feed(b"data: ok\n\n") == [SSEEvent("message", "ok", "")]


@pytest.mark.parametrize("one_byte_at_a_time", [False, True])
def test_leading_bom_counts_toward_the_first_line(one_byte_at_a_time: bool) -> None:
    # The limit must not depend on chunking: a buffered first line holds the BOM too.
    def chunks(stream: bytes) -> list[bytes]:
        return [stream[i : i + 1] for i in range(len(stream))] if one_byte_at_a_time else [stream]

    fits = b"\xef\xbb\xbfdata: x\n\n"  # 3 + 7 = 10 bytes before the first LF
    assert run(chunks(fits), max_event_bytes=10)[1] == [SSEEvent("message", "x", "")]
    with pytest.raises(EventTooLarge):
        run(chunks(fits), max_event_bytes=9)


def test_many_data_lines_exceeding_the_limit_raise() -> None:
    parser = SSEParser(max_event_bytes=64)
    with pytest.raises(EventTooLarge, match="max_event_bytes=64"):
        parser.feed(b"data: 0123456789\n" * 10)


def test_many_data_lines_across_chunks_exceeding_the_limit_raise() -> None:
    parser = SSEParser(max_event_bytes=64)
    with pytest.raises(EventTooLarge):
        for _ in range(10):
            assert parser.feed(b"data: 0123456789\n") == []


def test_data_exactly_at_the_limit_is_accepted() -> None:
    # Six 9-byte values joined by five LFs: 6 * 9 + 5 = 59 bytes of data.
    stream = b"data: 123456789\n" * 6 + b"\n"
    expected = [SSEEvent("message", "\n".join(["123456789"] * 6), "")]
    assert run([stream], max_event_bytes=59)[1] == expected
    with pytest.raises(EventTooLarge):
        run([stream], max_event_bytes=58)


def test_data_limit_resets_between_events() -> None:
    parser = SSEParser(max_event_bytes=20)
    for n in range(5):
        assert parser.feed(b"data: 0123456789\n\n") == [SSEEvent("message", "0123456789", "")], n


def test_too_large_leaves_last_event_id_at_the_last_returned_event() -> None:
    parser = SSEParser(max_event_bytes=32)
    assert parser.feed(b"id: 1\ndata: a\n\n") == [SSEEvent("message", "a", "1")]
    # Event 2 completes in the same chunk as the oversized one, so it is never returned and
    # must not be skipped by a reconnect.
    with pytest.raises(EventTooLarge):
        parser.feed(b"id: 2\ndata: b\n\nid: 3\ndata: " + b"z" * 40 + b"\n\n")
    assert parser.last_event_id == "1"


def test_seeded_last_event_id() -> None:
    parser = SSEParser(last_event_id="41")
    assert parser.last_event_id == "41"
    assert parser.feed(b"data: a\n\n") == [SSEEvent("message", "a", "41")]
    assert parser.last_event_id == "41"
    assert parser.feed(b"id: 42\ndata: b\n\n") == [SSEEvent("message", "b", "42")]
    assert parser.last_event_id == "42"


def test_seeded_last_event_id_can_be_cleared_by_the_server() -> None:
    parser = SSEParser(last_event_id="41")
    assert parser.feed(b"id:\ndata: a\n\n") == [SSEEvent("message", "a", "")]
    assert parser.last_event_id == ""


def test_id_of_an_unfinished_event_is_not_reported() -> None:
    # WHATWG: the last event ID string only takes the buffer's value when a blank line is
    # processed; resuming from an id whose event never arrived would skip that event.
    parser = SSEParser(last_event_id="1")
    assert parser.feed(b"id: 2\ndata: half") == []
    assert parser.last_event_id == "1"
    assert parser.feed(b"\n\n") == [SSEEvent("message", "half", "2")]
    assert parser.last_event_id == "2"


def test_empty_event_field_means_message() -> None:
    assert run([b"event:\ndata: a\n\n"])[1] == [SSEEvent("message", "a", "")]


def test_event_type_does_not_leak_into_the_next_event() -> None:
    _, events = run([b"event: a\ndata: 1\n\ndata: 2\n\n"])
    assert events == [SSEEvent("a", "1", ""), SSEEvent("message", "2", "")]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"0", 0),
        (b"007", 7),
        (b"", None),
        (b" 5", None),  # only one leading space is removed
        (b"\xd9\xa3", None),  # ARABIC-INDIC DIGIT THREE is not an ASCII digit
        (b"1e3", None),
        (b"0" * 5000 + b"5", 5),
        (b"9" * 5000, None),
    ],
)
def test_retry_values(value: bytes, expected: int | None) -> None:
    parser = SSEParser(max_event_bytes=1 << 16)
    parser.feed(b"retry: " + value + b"\n")
    assert parser.retry == expected


def test_retry_takes_effect_without_a_blank_line() -> None:
    parser = SSEParser()
    parser.feed(b"retry: 250\n")
    assert parser.retry == 250


def test_field_without_colon_has_empty_value() -> None:
    _, events = run([b"id: 5\ndata: a\n\nid\nevent\ndata\n\n"])
    assert events == [SSEEvent("message", "a", "5"), SSEEvent("message", "", "")]


def test_rejects_non_positive_limit() -> None:
    with pytest.raises(ValueError):
        SSEParser(max_event_bytes=0)


def test_large_stream_in_large_chunks() -> None:
    one = b'id: %d\nevent: tick\ndata: {"n": %d}\n\n'
    stream = b"".join(one % (n, n) for n in range(5000))
    chunks = [stream[i : i + 4096] for i in range(0, len(stream), 4096)]
    parser, events = run(chunks)
    assert len(events) == 5000
    assert events[1234] == SSEEvent("tick", '{"n": 1234}', "1234")
    assert parser.last_event_id == "4999"
