"""Keystrokes as a client types them: one id-less pty.write per read, the same frame but for
its data. Such a frame is known from its bytes, unparsed (connection.py's express path), and
its echo is written without an event object (PtyConnection.send_now): both over TCP, where a
worker holds the session's lease, and over stdio, where the hub is in the process. Whatever
comes framed otherwise, or does not decode, must be answered exactly as before."""

from __future__ import annotations

import base64
import time

import orjson
import pytest

from helpers import match

ECHO = "stty raw -echo && printf READY && exec cat"
IDENT = {"session_id": "keys", "attachment_id": "a1", "client_attachment_token": "tok-1"}


def keystroke(data: bytes | str, **changes) -> bytes:
    text = data if isinstance(data, str) else base64.b64encode(data).decode()
    params = {**IDENT, "data_base64": text, **changes}
    return orjson.dumps({"method": "pty.write", "params": params}) + b"\n"


def output(stream, want: bytes, timeout: float = 10) -> bytes:
    """This attachment's output until it has `want` in full."""
    got = b""
    deadline = time.monotonic() + timeout
    while len(got) < len(want):
        ev = stream.next_event("pty.data", timeout=max(0.1, deadline - time.monotonic()))
        got += base64.b64decode(ev["data_base64"])
    assert got == want
    return got


@pytest.fixture(params=["tcp", "stdio"])
def stream(request, spawn_listening, spawn_daemon):
    s = spawn_listening(workers=1).authed() if request.param == "tcp" else spawn_daemon()
    r = s.call("pty.attach", dict(IDENT, cols=80, rows=24, command=ECHO))
    assert r["ok"], r
    got = b""
    while b"READY" not in got:
        got += base64.b64decode(s.next_event("pty.data")["data_base64"])
    yield s
    s.close()


def test_keystrokes_in_every_framing_come_back_whole_and_in_order(stream):
    for key in b"the quick brown fox":  # one frame per read: the express path
        stream.send_raw(keystroke(bytes([key])))
        output(stream, bytes([key]))
    # Two frames in one read, a frame split over two reads, and a frame and a half.
    stream.send_raw(keystroke(b"1") + keystroke(b"2"))
    output(stream, b"12")
    frame = keystroke(b"3")
    stream.send_raw(frame[:20])
    time.sleep(0.05)
    stream.send_raw(frame[20:])
    output(stream, b"3")
    frame = keystroke(b"5")
    stream.send_raw(keystroke(b"4") + frame[:30])
    output(stream, b"4")
    stream.send_raw(frame[30:])
    output(stream, b"5")
    # A longer paste in the same shape, an empty write, and the request form.
    stream.send_raw(keystroke(b"pasted text " * 40))
    output(stream, b"pasted text " * 40)
    stream.send_raw(keystroke(b""))
    assert stream.call("pty.write", dict(IDENT, data_base64="Ng=="))["result"] == {"written": 1}
    output(stream, b"6")
    stream.send_raw(keystroke(b"7"))
    output(stream, b"7")


@pytest.mark.parametrize("text, message", [
    ("YQ=", "data_base64 must be valid base64"),
    ("YQ==YQ==", "data_base64 must be valid base64"),
    ("!!!!", "data_base64 must be valid base64"),
])
def test_a_keystroke_that_does_not_decode_gets_the_specs_error_and_typing_goes_on(
        stream, text, message):
    stream.send_raw(keystroke(b"a"))
    output(stream, b"a")
    stream.send_raw(keystroke(text))  # the same bytes around the data: the shape is known
    match(stream.next_event("pty.error"), {
        "event": "pty.error", "session_id": "keys", "attachment_id": "a1",
        "attachment_token": "tok-1", "code": "invalid_params", "error": message,
        "message": message})
    stream.send_raw(keystroke(b"b"))
    output(stream, b"b")


def test_a_known_shape_never_stands_in_for_another_token_or_attachment(stream):
    stream.send_raw(keystroke(b"a"))
    output(stream, b"a")
    for changes in ({"client_attachment_token": "tok-2"}, {"client_attachment_token": "tok-X"},
                    {"attachment_id": "a2"}, {"session_id": "other"}):
        stream.send_raw(keystroke(b"z", **changes))
        err = stream.next_event("pty.error")
        assert err["code"] == "not_found", err
    # A frame that merely starts like a keystroke (a quote inside the data's place) is a
    # request of its own, parsed in full.
    stream.send_raw(keystroke(b"a")[:-4] + b'","session_id":"other"}}\n')
    assert stream.next_event("pty.error")["code"] == "not_found"
    stream.send_raw(keystroke(b"b"))
    output(stream, b"b")
    # Nothing of the refused writes reached the terminal.
    assert stream.call("ping")["result"] == {"pong": True}
    assert not [e for e in stream.events if e["event"] == "pty.data"]


SEQ_IDENT = {"session_id": "seqd", "attachment_id": "b1", "client_attachment_token": "tok-b"}


def sequenced(data: bytes, seq) -> bytes:
    """A keystroke as `cmuxd-remote attach` sends it: a notification with a seq."""
    return orjson.dumps({"method": "pty.write", "params": dict(
        SEQ_IDENT, data_base64=base64.b64encode(data).decode(), seq=seq)}) + b"\n"


def seq_output(stream, want: bytes) -> None:
    got = b""
    while len(got) < len(want):
        ev = stream.next_event("pty.data", where=lambda m: m["session_id"] == "seqd")
        got += base64.b64decode(ev["data_base64"])
    assert got == want


def test_sequenced_keystrokes_are_acked_and_a_gap_detaches_as_the_spec_says(stream):
    r = stream.call("pty.attach", dict(SEQ_IDENT, cols=80, rows=24, command=ECHO,
                                       input_seq_ack=True))
    assert r["ok"], r
    seq_output(stream, b"READY")
    for seq, key in enumerate(b"typing", start=1):
        stream.send_raw(sequenced(bytes([key]), seq))
        seq_output(stream, bytes([key]))
        ack = stream.next_event("pty.input_ack", where=lambda m: m["session_id"] == "seqd")
        assert ack["seq"] <= seq
        while ack["seq"] < seq:  # acks may be coalesced, never skipped past
            ack = stream.next_event("pty.input_ack", where=lambda m: m["session_id"] == "seqd")
    # In the known shape, but not a number a parser takes as it is: answered as before.
    stream.send_raw(sequenced(b"x", 7).replace(b'"seq":7', b'"seq":07'))
    assert stream.next_response()["error"]["code"] == "invalid_request"
    stream.send_raw(sequenced(b"x", 7).replace(b'"seq":7', b'"seq":123456789012345678901'))
    err = stream.next_event("pty.error", where=lambda m: m["session_id"] == "seqd")
    assert (err["code"], err["message"]) == ("invalid_params", "seq must be a non-negative integer")
    # A gap in the known shape: the spec's error, then the attachment is detached.
    stream.send_raw(sequenced(b"x", 9))
    err = stream.next_event("pty.error", where=lambda m: m["session_id"] == "seqd")
    assert (err["code"], err["message"]) == ("pty_input_seq_gap",
                                             "PTY input sequence gap: got 9, want 7")
    stream.next_event("pty.exit", where=lambda m: m["session_id"] == "seqd")
    stream.send_raw(sequenced(b"x", 7))
    assert stream.next_event("pty.error", where=lambda m: m["session_id"] == "seqd")["code"] \
        == "not_found"
    # The other session's keystrokes are untouched by all this.
    stream.send_raw(keystroke(b"k"))
    output(stream, b"k")
