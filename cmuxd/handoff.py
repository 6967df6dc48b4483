"""The supervisor→worker channel format (sans-IO).

Each handed-off connection is one message: a JSON header line, then `n` raw bytes the gate
had already read past the handshake. Control messages (`"t"` set) carry no fd. The connection's fd travels as SCM_RIGHTS on the same
send, and the worker pairs fds with headers in order. Worker→supervisor reports are plain
JSON lines.
"""

from __future__ import annotations

import orjson

from .protocol import AnnouncedDecoder


def encode_handoff(conn_id: int, kind: str, peer: str, leftover: bytes,
                   device: str | None = None) -> bytes:
    """`device` names the device key that authenticated the connection, so the worker can
    close that device's connections when it is revoked."""
    header = {"id": conn_id, "kind": kind, "peer": peer, "n": len(leftover)}
    if device is not None:
        header["device"] = device
    return orjson.dumps(header, option=orjson.OPT_APPEND_NEWLINE) + leftover


class HandoffDecoder(AnnouncedDecoder):
    """Messages as (header, leftover bytes) pairs; the supervisor is trusted, so no line of
    its is too long to read."""

    __slots__ = ()

    def __init__(self):
        super().__init__(_header, max_frame=1 << 30)


def _header(line: bytes) -> tuple[dict, int]:
    header = orjson.loads(line)
    return header, header["n"]


def encode_control(kind: str, **fields) -> bytes:
    """A message with no connection: heartbeat pings and retire orders."""
    return orjson.dumps({"t": kind, "n": 0, **fields}, option=orjson.OPT_APPEND_NEWLINE)


def encode_report(**fields) -> bytes:
    return orjson.dumps(fields, option=orjson.OPT_APPEND_NEWLINE)
