"""The supervisor→worker channel format (sans-IO).

Each handed-off connection is one message: a JSON header line, then `n` raw bytes the gate
had already read past the handshake. Control messages (`"t"` set) carry no fd. The connection's fd travels as SCM_RIGHTS on the same
send, and the worker pairs fds with headers in order. Worker→supervisor reports are plain
JSON lines.
"""

from __future__ import annotations

import orjson


def encode_handoff(conn_id: int, kind: str, peer: str, leftover: bytes,
                   device: str | None = None) -> bytes:
    """`device` names the device key that authenticated the connection, so the worker can
    close that device's connections when it is revoked."""
    header = {"id": conn_id, "kind": kind, "peer": peer, "n": len(leftover)}
    if device is not None:
        header["device"] = device
    return orjson.dumps(header, option=orjson.OPT_APPEND_NEWLINE) + leftover


class HandoffDecoder:
    def __init__(self):
        self._buf = bytearray()
        self._header: dict | None = None

    def feed(self, data: bytes) -> list[tuple[dict, bytes]]:
        self._buf += data
        out = []
        while True:
            if self._header is None:
                cut = self._buf.find(b"\n")
                if cut < 0:
                    return out
                self._header = orjson.loads(bytes(self._buf[:cut]))
                del self._buf[: cut + 1]
            n = self._header["n"]
            if len(self._buf) < n:
                return out
            out.append((self._header, bytes(self._buf[:n])))
            del self._buf[:n]
            self._header = None


def encode_control(kind: str, **fields) -> bytes:
    """A message with no connection: heartbeat pings and retire orders."""
    return orjson.dumps({"t": kind, "n": 0, **fields}, option=orjson.OPT_APPEND_NEWLINE)


def encode_report(**fields) -> bytes:
    return orjson.dumps(fields, option=orjson.OPT_APPEND_NEWLINE)
