"""Property tests of the SSE parser: chunking never matters, arbitrary bytes never crash it,
and what it buffers stays within its limit."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from listenerpool.errors import EventTooLarge
from listenerpool.sse import SSEEvent, SSEParser

LIMIT = 64
PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

FIELDS = st.sampled_from(
    [b"data: x", b"data:", b"data:  two", b"id: 7", b"id", b"id: a\x00b", b"event: e",
     b"event:", b"retry: 10", b"retry: x", b": comment", b"", b"\xef\xbb\xbfdata: bom",
     b"data: \xff\xfe", b"data: \xe2\x82", b"unknown: field"]
)  # fmt: skip
LINES = st.lists(
    st.tuples(st.one_of(FIELDS, st.binary(max_size=80)), st.sampled_from([b"\n", b"\r", b"\r\n"])),
    max_size=40,
)


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    prefix = draw(st.sampled_from([b"", b"\xef\xbb\xbf"]))
    return prefix + b"".join(line + end for line, end in draw(LINES))


@st.composite
def chunkings(draw: st.DrawFn, data: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def parse(chunks: list[bytes]) -> tuple[list[SSEEvent], str, int | None, bool]:
    """Events, last event id and retry, and whether the limit was hit; checks the buffers
    after every chunk."""
    parser = SSEParser(max_event_bytes=LIMIT)
    events: list[SSEEvent] = []
    for chunk in chunks:
        try:
            events += parser.feed(chunk)
        except EventTooLarge:
            return events, parser.last_event_id, parser.retry, True
        assert parser.pending_line_bytes <= LIMIT
        assert parser.pending_data_bytes <= LIMIT
    return events, parser.last_event_id, parser.retry, False


@PROPERTY
@given(st.data())
def test_any_chunking_parses_to_the_same_events(data: st.DataObject) -> None:
    stream = data.draw(streams())
    whole = parse([stream])
    chunked = parse(data.draw(chunkings(stream)))
    assert chunked[3] == whole[3]  # the limit is hit however the bytes are split
    if not whole[3]:
        assert chunked == whole
    else:
        # Events completed in earlier chunks were returned before the error: they are those
        # a byte-at-a-time reader saw first.
        bytewise = parse([stream[i : i + 1] for i in range(len(stream))])
        assert bytewise[3]
        assert chunked[0] == bytewise[0][: len(chunked[0])]


@PROPERTY
@given(st.binary(max_size=2000), st.data())
def test_arbitrary_bytes_never_raise_anything_but_event_too_large(
    raw: bytes, data: st.DataObject
) -> None:
    events, _, _, _ = parse(data.draw(chunkings(raw)))
    for event in events:
        assert isinstance(event.data, str) and isinstance(event.type, str)
        assert len(event.data.encode()) <= LIMIT * 3  # U+FFFD may triple a byte


@PROPERTY
@given(st.integers(1, 200), st.integers(1, 5000), st.sampled_from([b"x", b"data: y"]))
def test_an_endless_line_is_refused_once_it_exceeds_the_limit(
    limit: int, chunk_size: int, unit: bytes
) -> None:
    parser = SSEParser(max_event_bytes=limit)
    fed = 0
    with pytest.raises(EventTooLarge):
        while fed <= limit + chunk_size:
            parser.feed(unit * chunk_size)
            fed += len(unit) * chunk_size
            assert parser.pending_line_bytes <= limit
