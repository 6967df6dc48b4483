"""What the PTY hub and the workers both need to know about PTY sessions: the spec's limits,
the error texts and the event shapes. Both sides import this module and neither imports the
other's internals, so the rules cannot drift apart."""

from __future__ import annotations

import hmac

from .protocol import encode, event

READ_MAX = 32768
"""Largest PTY read, hence largest live pty.data payload."""
BULK_READ = 1024
"""A PTY read at least this large is followed by another, to gather bulk output."""
REPLAY_CHUNK = 49152
INPUT_CHUNK = 16384
INPUT_QUEUE_CHUNKS = 256
DIMENSION_MAX = 65535

OUTBOUND_FRAMES = 256
"""Events one attachment may have waiting for the client before it is dropped."""
BEHIND_FRAMES = 128
"""Undrained frames at which an attachment holds the PTY's reading back. Half the outbound
queue, so the events a single step can add (acks, replay, one read per attachment) always
fit below the overflow mark."""
STALL_TIMEOUT = 2.0

MSG_ATTACHMENT_NOT_FOUND = "PTY attachment not found"
MSG_SESSION_NOT_FOUND = "PTY session not found"
MSG_NO_HUB = "PTY hub is not available"
MSG_QUEUE_FULL = "PTY input queue is full"
MSG_INACTIVE = "RPC connection closed before PTY attachment completed"


def pty_error_event(sid: str, aid: str, token: str, code: str, message: str) -> dict:
    return event("pty.error", session_id=sid, attachment_id=aid, attachment_token=token,
                 error=message, message=message, code=code)


def attachment_event(sid: str, aid: str, token: str, name: str, **extra) -> dict:
    return event(name, session_id=sid, attachment_id=aid, attachment_token=token, **extra)


def data_event(sid: str, aid: str, token: str, encoded: str, offset: int, ext: bool) -> dict:
    """pty.data; with the absolute offset of its first byte for a client that asked (§6.8),
    omitted at offset 0 as every zero in an event is (§3.4)."""
    msg = {"event": "pty.data", "session_id": sid, "attachment_id": aid,
           "attachment_token": token, "data_base64": encoded}
    if ext and offset:
        msg["ext_offset"] = offset
    return msg


class AttachmentEvents:
    """The events of one attachment, the same whether the hub or a worker holding its
    session's lease sends them. pty.data, the event of every keystroke's echo, is also made
    as bytes without a dict: everything up to its payload (`frame_head`) is encoded once."""

    __slots__ = ()
    key: tuple[str, str, str]
    """(session_id, attachment_id, token): what its events name, and its queue's key."""
    ext: bool
    frame_head: bytes

    def event(self, name: str, **extra) -> dict:
        return attachment_event(*self.key, name, **extra)

    def data_event(self, encoded: str, offset: int) -> dict:
        return data_event(*self.key, encoded, offset, self.ext)

    def data_frame(self, encoded: bytes, offset: int) -> bytes:
        """`encode(self.data_event(encoded, offset))`, made from the head."""
        if self.ext and offset:
            return b"".join((self.frame_head, encoded, b'","ext_offset":%d}\n' % offset))
        return b"".join((self.frame_head, encoded, b'"}\n'))


def data_frame_head(sid: str, aid: str, token: str) -> bytes:
    """A pty.data frame up to its payload: it ends with the `"` that opens data_base64."""
    return encode(data_event(sid, aid, token, "", 0, False))[:-3]


def tokens_equal(a: str, b: str) -> bool:
    """Attachment tokens are capabilities: compared in constant time."""
    return hmac.compare_digest(token_bytes(a), token_bytes(b))


def token_bytes(token: str) -> bytes:
    """What tokens_equal compares: the holder of a token can keep it, made once."""
    return token.encode("utf-8", "surrogatepass")
