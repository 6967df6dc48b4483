"""What the hub and a lease holder both send for an attachment (cmuxd.pty_rules)."""

from __future__ import annotations

import base64

import pytest

from cmuxd import pty_rules
from cmuxd.protocol import encode



class _Att(pty_rules.AttachmentEvents):
    __slots__ = ("key", "ext", "frame_head")

    def __init__(self, sid, aid, token, ext):
        self.key, self.ext = (sid, aid, token), ext
        self.frame_head = pty_rules.data_frame_head(sid, aid, token)


@pytest.mark.parametrize("sid, aid, token", [
    ("s", "a", "t"), ("sëssion \"quoted\" \\ \u2028", "a\tb", "x" * 64), ("\U0001f600", "1", "2"),
])
@pytest.mark.parametrize("ext", [False, True])
@pytest.mark.parametrize("offset", [0, 1, 1 << 40])
def test_a_data_frame_is_the_encoded_data_event(sid, aid, token, ext, offset):
    att = _Att(sid, aid, token, ext)
    for payload in (b"", b"a", bytes(range(256))):
        encoded = base64.b64encode(payload)
        assert att.data_frame(encoded, offset) == encode(att.data_event(encoded.decode(), offset))
