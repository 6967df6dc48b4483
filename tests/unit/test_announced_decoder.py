"""Lines followed by the raw bytes they announce (the handoff channel, the hub link), split
by the protocol's one frame decoder: any chunking gives the same messages."""

from __future__ import annotations

import orjson
import pytest

from cmuxd.handoff import HandoffDecoder, encode_control, encode_handoff
from cmuxd.protocol import OVERSIZED, AnnouncedDecoder


def announce(line: bytes):
    msg = orjson.loads(line)
    return msg, msg.get("n", 0)


STREAM = (b'{"n":4}\na\nb\n' + b'{"x":1}\n' + b'{"n":1}\n\n' + b'{"n":0}\n')
MESSAGES = [({"n": 4}, b"a\nb\n"), ({"x": 1}, b""), ({"n": 1}, b"\n"), ({"n": 0}, b"")]


@pytest.mark.parametrize("size", [1, 2, 3, 7, len(STREAM)])
def test_any_chunking_gives_the_same_messages(size):
    decoder = AnnouncedDecoder(announce)
    out = []
    for at in range(0, len(STREAM), size):
        out += decoder.feed(STREAM[at:at + size])
    assert out == MESSAGES


def test_a_line_over_the_limit_is_reported_once_and_the_stream_goes_on():
    decoder = AnnouncedDecoder(announce, max_frame=16)
    out = decoder.feed(b'{"pad":"' + b"x" * 40)
    out += decoder.feed(b'"}\n{"n":2}\nok')
    assert out == [OVERSIZED, ({"n": 2}, b"ok")]


def test_what_announce_raises_reaches_the_caller():
    decoder = AnnouncedDecoder(announce)
    with pytest.raises(orjson.JSONDecodeError):
        decoder.feed(b"not json\n")


def test_handoff_messages_and_their_leftover_bytes():
    data = (encode_handoff(1, "tcp", "1.2.3.4:5", b'{"id":1}\n', "laptop")
            + encode_control("ping", seq=3))
    decoder = HandoffDecoder()
    out = []
    for byte in range(len(data)):
        out += decoder.feed(data[byte:byte + 1])
    assert out == [({"id": 1, "kind": "tcp", "peer": "1.2.3.4:5", "n": 9, "device": "laptop"},
                    b'{"id":1}\n'),
                   ({"t": "ping", "n": 0, "seq": 3}, b"")]
