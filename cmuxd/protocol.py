"""The wire protocol as plain data: frames, envelopes, error codes, parameter rules.

Sans-IO on purpose: nothing here touches a socket, a loop or a process, so every rule of
the spec can be tested by feeding bytes in and reading bytes out.
"""

from __future__ import annotations

import binascii
import json
import math
import re
from dataclasses import dataclass
from typing import Any

import orjson

MAX_FRAME = 4 * 1024 * 1024
"""Largest request frame, counted with its LF (and CR)."""

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

# Error codes (§5).
INVALID_REQUEST = "invalid_request"
METHOD_NOT_FOUND = "method_not_found"
INVALID_PARAMS = "invalid_params"
NOT_FOUND = "not_found"
OPEN_FAILED = "open_failed"
STREAM_ERROR = "stream_error"
UNAVAILABLE = "unavailable"
PTY_SESSION_NOT_FOUND = "pty_session_not_found"
PTY_START_FAILED = "pty_start_failed"
PTY_INPUT_QUEUE_FULL = "pty_input_queue_full"
PTY_INPUT_SEQ_GAP = "pty_input_seq_gap"
REMOTE_PTY_TIMEOUT = "remote_pty_timeout"
REMOTE_CONNECTION_INACTIVE = "remote_connection_inactive"

MSG_OVERSIZED = "request frame exceeds maximum size"
MSG_INVALID_JSON = "invalid JSON request"
MSG_METHOD_REQUIRED = "method is required"
MSG_BAD_BASE64 = "data_base64 must be valid base64"


NO_RESPONSE = object()
"""Returned by a handler that must not answer (a notification that succeeded)."""


class RPCError(Exception):
    """A request failed with one of the spec's error codes; the message is shown to people."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class Oversized:
    """Marker the decoder yields in place of a frame that exceeded MAX_FRAME."""

    __slots__ = ()


OVERSIZED = Oversized()


class FrameDecoder:
    """Splits a byte stream into LF-terminated frames, enforcing the size limit.

    A frame longer than the limit is reported once as OVERSIZED and the rest of its line is
    discarded, so one bad line never desynchronises the stream. A partial line grows in one
    bytearray, which is then the frame itself: a large frame arriving in many reads is never
    held twice (its reads and their join), nor copied once per read.
    """

    __slots__ = ("_buf", "_discarding", "max_frame")

    def __init__(self, max_frame: int = MAX_FRAME):
        self.max_frame = max_frame
        self._buf: bytearray | None = None
        self._discarding = False

    def feed(self, data: bytes) -> list[bytes | bytearray | Oversized]:
        """Return every frame completed by `data` (without its LF), in order."""
        out: list[bytes | bytearray | Oversized] = []
        limit = self.max_frame
        cut = data.find(b"\n")
        if cut < 0:
            self._hold(data, out)
            return out
        buf = self._buf
        if self._discarding:
            self._discarding = False
        elif buf is not None:
            if len(buf) + cut >= limit:
                out.append(OVERSIZED)
            else:
                buf += memoryview(data)[:cut]
                out.append(buf)
        else:
            out.append(OVERSIZED if cut >= limit else data[:cut])
        self._buf = None
        if cut == len(data) - 1:  # a read of one frame (a keystroke) or of the end of one
            return out
        lines = data[cut + 1 :].split(b"\n")
        tail = lines.pop()
        if len(data) <= limit:  # no line of it can be oversized: skip the check per line
            out += lines
        else:
            for line in lines:
                # len(line) excludes the LF that the limit counts.
                out.append(OVERSIZED if len(line) >= limit else line)
        self._hold(tail, out)
        return out

    def _hold(self, data: bytes, out: list) -> None:
        if self._discarding or not data:
            return
        buf = self._buf
        # Held bytes have no LF yet: at exactly the limit they can still end the stream as a
        # final frame; one more byte (an LF included) makes the frame oversized.
        if (len(buf) if buf is not None else 0) + len(data) > self.max_frame:
            out.append(OVERSIZED)
            self._discarding = True
            self._buf = None
        elif buf is None:
            self._buf = bytearray(data)
        else:
            buf += data

    def eof(self) -> list[bytes | bytearray | Oversized]:
        """The bytes left after the last LF form one final frame."""
        buf = self._buf
        self._buf, self._discarding = None, False
        return [buf] if buf else []

    @property
    def buffered(self) -> int:
        return len(self._buf) if self._buf is not None else 0

    def held(self) -> bytes:
        """The bytes of the line not finished yet (to hand to another decoder)."""
        return bytes(self._buf) if self._buf is not None else b""


class AnnouncedDecoder:
    """FrameDecoder's lines, each possibly followed by raw bytes whose count the line
    announces (the handoff channel, the hub link): `announce(line)` reads a line and returns
    (what to deliver, how many raw bytes follow). `feed()` returns (delivered, raw bytes)
    pairs, or OVERSIZED for a line over the limit. The lines go through one FrameDecoder at a
    time, cut here only at an LF the raw bytes cannot contain."""

    __slots__ = ("_lines", "_announce", "_held", "_need", "_raw")

    def __init__(self, announce, max_frame: int = MAX_FRAME):
        self._lines = FrameDecoder(max_frame)
        self._announce = announce
        self._held = None
        self._need = 0
        self._raw: list[bytes] = []

    def feed(self, data: bytes) -> list:
        out: list = []
        at, end = 0, len(data)
        while at < end:
            if self._need:
                take = min(self._need, end - at)
                self._raw.append(data[at:at + take])
                self._need -= take
                at += take
                if not self._need:
                    out.append((self._held, b"".join(self._raw)))
                    self._held, self._raw = None, []
                continue
            cut = data.find(b"\n", at)
            if cut < 0:
                out += self._lines.feed(data[at:])
                return out
            for line in self._lines.feed(data[at:cut + 1]):
                if line is OVERSIZED:
                    out.append(OVERSIZED)
                    continue
                held, need = self._announce(line)
                if need:
                    self._held, self._need = held, need
                else:
                    out.append((held, b""))
            at = cut + 1
        return out

    def held(self):
        """What announce() returned for a line whose raw bytes have not all come yet."""
        return self._held


@dataclass(slots=True)
class Request:
    method: str
    params: dict
    id: Any = None
    has_id: bool = False
    """True when the `id` key was present at all (even as null): such a request is never a
    notification."""
    payload: bytes | None = None
    """The decoded `params.data_base64` of a large frame, taken out before the parse (whose
    `params` then hold it as an empty string); see `parse_large_request`."""


def _loads(frame: bytes) -> Any:
    try:
        return orjson.loads(frame)
    except orjson.JSONDecodeError:
        # Invalid UTF-8 inside strings is replaced by U+FFFD rather than rejected.
        text = frame.decode("utf-8", "replace")
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            if "\\u" not in text:
                raise
            return _loads_lone_surrogates(text)


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _reject_constant(name: str):
    raise ValueError(name)


def _parse_int(digits: str) -> int | float:
    value = int(digits)
    # The same rule orjson applies: integers beyond 64 bits become floats.
    return value if -(2**63) <= value < 2**64 else float(value)


def _parse_float(digits: str) -> float:
    value = float(digits)
    if value in (math.inf, -math.inf):
        raise ValueError(digits)
    return value


def _loads_lone_surrogates(text: str) -> Any:
    """Parse JSON whose strings hold lone UTF-16 surrogate escapes such as "\\ud800".

    They are valid JSON, which orjson rejects; like invalid UTF-8 they become U+FFFD.
    """
    def clean(value):
        kind = type(value)
        if kind is str:
            return _LONE_SURROGATE.sub("\ufffd", value)
        if kind is list:
            return [clean(v) for v in value]
        if kind is dict:
            return {clean(k): clean(v) for k, v in value.items()}
        return value

    try:
        value = json.loads(
            text, parse_constant=_reject_constant, parse_int=_parse_int, parse_float=_parse_float
        )
        return clean(value)
    except (ValueError, RecursionError):
        raise orjson.JSONDecodeError("invalid JSON", text, 0) from None


def drop_empty_frames(data: bytes) -> bytes:
    """`data` with each run of empty lines (LF or CRLF) made one LF: every frame that is not
    empty is kept as it is, and empty ones, skipped anyway (§2.1), no longer cost a list item
    and a pass of the connection loop each, which made a client streaming LFs cost a second
    per megabyte."""
    while b"\n\n" in data:
        data = data.replace(b"\n\n", b"\n")
    if b"\n\r\n" in data:
        while b"\n\r\n" in data:
            data = data.replace(b"\n\r\n", b"\n")
        while b"\n\n" in data:
            data = data.replace(b"\n\n", b"\n")
    return data


_OBJECT_START = re.compile(rb'[ \t\r\n]*\{[ \t\r\n]*["}]')
"""How every JSON object starts: a brace, then a key or the closing brace."""


def _ends_object(frame: bytes) -> bool:
    if frame[-1:] == b"}":
        return True
    # Copies the frame only when it ends in whitespace other than a CRLF's CR.
    return frame[-2:] == b"}\r" or frame.rstrip(b" \t\r\n")[-1:] == b"}"


def parse_request(frame: bytes) -> Request | bytes | None:
    """Turn one frame into a Request, an encoded error response, or None (empty frame)."""
    if not frame:
        return None
    if frame[:2] != b'{"' and (frame.lstrip(b" \t\r\n")[:1] != b"{"
                               or not _OBJECT_START.match(frame)) or not _ends_object(frame):
        # Empty after its CR, blank, garbage or not an object: answered without a parse (a
        # failed parse raises, which costs microseconds), so a client streaming junk costs
        # little.
        return None if frame == b"\r" else INVALID_JSON_RESPONSE
    try:
        obj = orjson.loads(frame)  # the hot path: most frames parse as they are
    except orjson.JSONDecodeError:
        # Parse again only what can parse better with invalid UTF-8 replaced or lone
        # surrogate escapes allowed.
        if frame.isascii() and b"\\u" not in frame:
            return INVALID_JSON_RESPONSE
        try:
            obj = _loads(frame)
        except orjson.JSONDecodeError:
            return INVALID_JSON_RESPONSE
    if type(obj) is not dict:
        return INVALID_JSON_RESPONSE
    method = obj.get("method")
    params = obj.get("params")
    if (method is not None and type(method) is not str) or (
        params is not None and type(params) is not dict
    ):
        return INVALID_JSON_RESPONSE
    has_id = "id" in obj
    return Request(method or "", params or {}, obj.get("id"), has_id)


REPEAT_FRAME_MAX = 4096
"""Longest frame whose shape a connection keeps for its repeats (see `repeat_shape`)."""

_TEXT = rb"(?P<text>[A-Za-z0-9+/=]*)"
_COUNT = rb"(?P<count>0|[1-9][0-9]{0,14})"


def repeat_shape(frame: bytes, req: Request, text_key: str,
                 count_key: str | None = None) -> re.Pattern | None:
    """A pattern of `frame` (the frame of `req`, without its LF) that every frame matches
    which is `req` with other base64 text as `params[text_key]` (group `text`) and, with
    `count_key`, another non-negative integer as `params[count_key]` (group `count`): a
    keystroke's pty.write is then known from its bytes, with no parse. None if the frame is
    too long or a value is not found written plainly where it counts.

    Base64 text holds no quote, backslash or control character, and a short decimal integer
    nothing that could end its token, so whatever they are, the JSON around them reads the
    same; one parse with other values in their places shows that the places are the values'
    and hold all of them."""
    params = req.params
    text = params.get(text_key)
    if (len(frame) > REPEAT_FRAME_MAX or req.has_id or req.payload is not None
            or type(text) is not str or not text):
        return None
    other = {text_key: "QUJD" if text != "QUJD" else "REVG"}
    slots = [(frame.rfind(b'"%s"' % text.encode()) + 1, len(text), _TEXT, other[text_key])]
    if slots[0][0] == 0:
        return None
    if count_key is not None:
        count = params.get(count_key)
        if type(count) is not int or not 0 <= count < 10**15:
            return None
        written = b'"%s":%d' % (count_key.encode(), count)
        at = frame.rfind(written)
        if at < 0:
            return None
        other[count_key] = 7 if count != 7 else 8
        digits = len(written) - len(count_key) - 3
        slots.append((at + len(written) - digits, digits, _COUNT, str(other[count_key])))
    slots.sort()
    pattern, probe, last = [], [], 0
    for at, size, group, stand_in in slots:
        if at < last:
            return None
        pattern += [re.escape(frame[last:at]), group]
        probe += [frame[last:at], stand_in.encode()]
        last = at + size
    pattern.append(re.escape(frame[last:]))
    probe.append(frame[last:])
    got = parse_request(b"".join(probe))
    if (type(got) is not Request or got.method != req.method or got.has_id
            or got.params != {**params, **other}):
        return None
    return re.compile(b"".join(pattern))


LARGE_FRAME = 64 * 1024
"""Frames above this size have their `data_base64` decoded straight from the frame."""

_BASE64_KEY = b'"data_base64":"'


def parse_large_request(frame: bytes | bytearray) -> Request | bytes | None:
    """parse_request for a large frame, holding less at once: when `params.data_base64` is
    written plainly (no escapes, the key spelled once), it is decoded from the frame's own
    bytes and the rest parsed without it, so the frame, its text and its decoded bytes are
    never alive together (4 + 4 + 3 MiB for a 3 MB pty.write). Anything else parses as
    usual."""
    at = frame.find(_BASE64_KEY)
    start = at + len(_BASE64_KEY)
    end = frame.find(b'"', start) if at >= 0 else -1
    if end < 0:
        return parse_request(frame)
    try:
        with memoryview(frame) as view:
            payload = binascii.a2b_base64(view[start:end], strict_mode=True)
    except binascii.Error:
        return parse_request(frame)
    rest = frame[:start] + frame[end:]
    req = parse_request(rest)
    if (type(req) is Request and req.params.get("data_base64") == "" and b"\\u" not in rest
            and rest.count(b'"data_base64"') == 1):
        req.payload = payload
        return req
    return parse_request(frame)


def encode(message: dict) -> bytes:
    """One frame: compact JSON and a single LF."""
    return orjson.dumps(message, option=orjson.OPT_APPEND_NEWLINE)


def ok_response(req_id: Any, result: dict) -> bytes:
    # encode() inlined: this runs once per request.
    if req_id is None:
        return orjson.dumps({"ok": True, "result": result}, option=orjson.OPT_APPEND_NEWLINE)
    return orjson.dumps(
        {"id": req_id, "ok": True, "result": result}, option=orjson.OPT_APPEND_NEWLINE
    )


def error_response(req_id: Any, code: str, message: str) -> bytes:
    err = {"code": code, "message": message}
    if req_id is None:
        return encode({"ok": False, "error": err})
    return encode({"id": req_id, "ok": False, "error": err})


def event(name: str, **fields: Any) -> dict:
    """An event object; empty strings and zeros are omitted as the spec asks."""
    msg = {"event": name}
    for key, value in fields.items():
        if value == "" or (value == 0 and type(value) is int) or value is None:
            continue
        msg[key] = value
    return msg


INVALID_JSON_RESPONSE = error_response(None, INVALID_REQUEST, MSG_INVALID_JSON)
OVERSIZED_RESPONSE = error_response(None, INVALID_REQUEST, MSG_OVERSIZED)


def unknown_method_message(method: str) -> str:
    # JSON string syntax escapes `"`, `\` and control characters, as the spec requires.
    return "unknown method " + orjson.dumps(method).decode()


# Parameter typing (§4). Each returns None for "absent".


def param_str(params: dict, key: str, *, trim: bool = False) -> str | None:
    value = params.get(key)
    if type(value) is not str:
        return None
    if trim:
        value = value.strip()
    return value or None


def param_int(params: dict, key: str) -> int | None:
    value = params.get(key)
    kind = type(value)
    if kind is int:
        pass
    elif kind is float and value.is_integer():
        # -2**63 is in range, but as a float it may be a rounded integer below the range.
        if not -(2**63) < value < 2**63:
            return None
        value = int(value)
    else:
        return None
    if INT64_MIN <= value <= INT64_MAX:
        return value
    return None


def require_size(method: str, params: dict) -> tuple[int, int]:
    """`cols` and `rows`, both required and > 0, checked in that order (§6.5.1, §6.6)."""
    cols = param_int(params, "cols")
    if cols is None or cols <= 0:
        raise RPCError(INVALID_PARAMS, f"{method} requires cols > 0")
    rows = param_int(params, "rows")
    if rows is None or rows <= 0:
        raise RPCError(INVALID_PARAMS, f"{method} requires rows > 0")
    return cols, rows


def param_bool(params: dict, key: str) -> bool:
    return params.get(key) is True


def param_base64(params: dict, key: str, missing_message: str) -> bytes:
    """Decode a required base64 parameter, raising the spec's errors."""
    value = params.get(key)
    if type(value) is not str:
        raise RPCError(INVALID_PARAMS, missing_message)
    if "\r" in value or "\n" in value:
        value = value.replace("\r", "").replace("\n", "")
    try:
        # Decoded from the str itself (ValueError unless it is ASCII): a copy of it as bytes
        # would be one more megabyte per megabyte written, alive with the rest.
        return binascii.a2b_base64(value, strict_mode=True)
    except ValueError:
        raise RPCError(INVALID_PARAMS, MSG_BAD_BASE64) from None


def request_base64(req: Request, missing_message: str) -> bytes:
    """A request's `params.data_base64`, decoded: taken from the frame already when it was a
    large one (parse_large_request), else decoded here with the spec's errors."""
    if req.payload is not None:
        return req.payload
    return param_base64(req.params, "data_base64", missing_message)


def b64(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")
