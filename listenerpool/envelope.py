"""The event envelope: what the pool publishes live and keeps in a session's history stream.

A live message is the JSON object ``{"seq", "epoch", "event", "data", "id"}``: ``seq`` numbers the
session's events from 1 without gaps, ``epoch`` is the fencing epoch of the reader that published
it, ``event`` and ``data`` are the upstream's event type and payload verbatim, ``id`` the upstream's
event id. The stream entry id is ``<seq>-0`` with the same fields.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Envelope:
    seq: int
    epoch: int
    event: str
    data: str
    id: str = ""

    def to_json(self) -> str:
        head, tail = envelope_parts(self.epoch, self.event, self.data, self.id)
        return f"{head}{self.seq}{tail}"

    @classmethod
    def from_json(cls, raw: str | bytes) -> Envelope:
        obj = json.loads(raw)
        return cls(
            seq=int(obj["seq"]),
            epoch=int(obj["epoch"]),
            event=str(obj["event"]),
            data=str(obj["data"]),
            id=str(obj.get("id", "")),
        )

    @classmethod
    def from_stream_entry(cls, fields: Mapping[bytes | str, bytes | str]) -> Envelope:
        """Build from the fields of an ``XRANGE`` entry of a session's history stream."""

        def get(name: str) -> str:
            value = fields.get(name, fields.get(name.encode()))
            if value is None:
                return ""
            return value.decode() if isinstance(value, bytes) else value

        return cls(
            seq=int(get("seq")),
            epoch=int(get("epoch")),
            event=get("event"),
            data=get("data"),
            id=get("uid"),
        )


def envelope_parts(epoch: int, event: str, data: str, upstream_id: str) -> tuple[str, str]:
    """The JSON text of an envelope before and after its seq.

    The publish script knows the seq only once it has incremented it, so it concatenates
    ``head + seq + tail``; building both halves here keeps the format in one place.
    """
    tail = (
        f',"epoch":{epoch},"event":{json.dumps(event)},'
        f'"data":{json.dumps(data)},"id":{json.dumps(upstream_id)}}}'
    )
    return '{"seq":', tail


def seq_of(raw: str) -> int:
    """The seq of a live envelope without parsing the whole JSON (it is always first)."""
    if not raw.startswith('{"seq":'):
        raise ValueError(f"not an envelope: {raw[:40]!r}")
    return int(raw[7 : raw.index(",", 7)])
