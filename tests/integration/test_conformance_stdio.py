"""Conformance scenarios 1-22 of the protocol spec (§9), and the stdio transport's behaviour
under garbage, EOF, back-pressure and pipelining, against `cmuxd-remote serve --stdio` run as a
real child process.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import socket
import struct
import subprocess
import threading
import time

import psutil
import pytest

from helpers import (
    ANY_STR,
    DEFAULT_TIMEOUT,
    INVALID_JSON,
    MAX_FRAME,
    NONEMPTY_STR,
    OVERSIZED,
    RFC3339,
    STR_LIST,
    TcpServer,
    closed_port,
    daemon_command,
    dumps,
    error,
    match,
    ok,
    recv_exactly,
    wait_for,
)

PONG = {"pong": True}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def padded_ping(total: int, id_: int, crlf: bool = False) -> bytes:
    """A ping padded through params.pad to exactly `total` bytes including its line end."""
    head = b'{"id":%d,"method":"ping","params":{"pad":"' % id_
    tail = b'"}}\r\n' if crlf else b'"}}\n'
    frame = head + b"x" * (total - len(head) - len(tail)) + tail
    assert len(frame) == total
    return frame


# ---------------------------------------------------------------------------------------------
# Servers behind proxy streams


def echo_then_tail(n: int):
    """Echo the first `n` bytes received, then send `tail` and close."""
    def handler(conn: socket.socket) -> None:
        conn.sendall(recv_exactly(conn, n))
        conn.sendall(b"tail")
    return handler


def send_and_close(data: bytes):
    def handler(conn: socket.socket) -> None:
        conn.sendall(data)
    return handler


class EofWatcher:
    """Holds each connection open until the peer closes it; counts those that did."""

    def __init__(self):
        self.eofs = 0
        self.received = bytearray()
        self.lock = threading.Lock()

    def __call__(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                break
            self.received += chunk
        with self.lock:
            self.eofs += 1


class BulkSender:
    """Sends `payload` as fast as the peer takes it, recording progress."""

    def __init__(self, payload: bytes):
        self.payload = payload
        self.sent = 0
        self.done = threading.Event()

    def __call__(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        conn.settimeout(60)
        view = memoryview(self.payload)
        while view:
            n = conn.send(view[:65536])
            self.sent += n
            view = view[n:]
        self.done.set()


# ---------------------------------------------------------------------------------------------
# §9 scenarios 1-12: envelopes and framing


def test_01_ping(daemon):
    daemon.expect({"id": 1, "method": "ping"}, ok(PONG, id=1))


UPSTREAM_CAPABILITIES = {
    "session.basic", "session.resize.min", "proxy.http_connect", "proxy.socks5", "proxy.stream",
    "proxy.stream.push", "pty.session", "pty.session.token", "pty.session.persistent_daemon",
    "pty.write.notification", "pty.resize.notification", "pty.attach.cancel",
    "pty.input.seq_ack", "cli.bridge",
}
PTY_CAPABILITIES = {
    "pty.session.token", "pty.write.notification", "pty.resize.notification",
    "pty.attach.cancel", "pty.input.seq_ack",
}


def test_02_hello(daemon):
    resp = daemon.expect(
        {"id": 2, "method": "hello", "params": {"x": 1}},
        ok({"name": "cmuxd-remote", "version": NONEMPTY_STR, "capabilities": STR_LIST}, id=2),
    )
    caps = resp["result"]["capabilities"]
    assert len(caps) == len(set(caps)), caps
    assert {"session.basic", "session.resize.min", "proxy.http_connect", "proxy.socks5",
            "proxy.stream", "proxy.stream.push"} <= set(caps)
    # The CLI bridge is on by default and lives in PTY sessions (§6.7).
    assert ("cli.bridge" in caps) == ("pty.session" in caps)
    assert "pty.session.persistent_daemon" not in caps
    for cap in caps:
        assert cap in UPSTREAM_CAPABILITIES or cap.startswith("ext."), cap
    if "pty.session" in caps:
        assert PTY_CAPABILITIES <= set(caps)
    else:
        assert not PTY_CAPABILITIES & set(caps)
    # hello ignores params of any shape, including none.
    again = daemon.call("hello")
    match(again["result"], resp["result"])


def test_02_hello_version_is_the_version_command_output(daemon):
    version = daemon.call("hello")["result"]["version"]
    out = subprocess.run(daemon_command("version"), capture_output=True, timeout=30, check=True)
    assert out.stdout == version.encode() + b"\n"


def test_03_unknown_method_and_case_sensitivity(daemon):
    daemon.expect({"id": 3, "method": "nope"},
                  error("method_not_found", 'unknown method "nope"', id=3))
    daemon.expect({"id": 4, "method": "PING"},
                  error("method_not_found", 'unknown method "PING"', id=4))
    daemon.expect({"id": 4.5, "method": "Hello"},
                  error("method_not_found", 'unknown method "Hello"', id=4.5))


def test_03_unknown_method_name_is_quoted_and_escaped(daemon):
    for name in ['a"b', "a\\b", "line\nbreak", "tab\there", "\x01ctl", "ünï"]:
        resp = daemon.call(name)
        match(resp, error("method_not_found", ANY_STR, id=resp["id"]))
        message = resp["error"]["message"]
        assert message.startswith('unknown method "') and message.endswith('"'), message
        quoted = message[len("unknown method "):]
        assert not any(ord(c) < 0x20 for c in quoted), message
        assert json.loads(quoted) == name


@pytest.mark.parametrize("method", [
    "daemon.shutdown", "daemon.auth", "cli.bridge", "system.ping",
])
def test_04_out_of_scope_methods_are_unknown(daemon, method):
    daemon.expect({"id": 5, "method": method},
                  error("method_not_found", f'unknown method "{method}"', id=5))


def test_05_missing_or_empty_method(daemon):
    daemon.expect({"id": 6}, error("invalid_request", "method is required", id=6))
    daemon.expect({"id": "7", "method": ""}, error("invalid_request", "method is required", id="7"))
    daemon.expect({"id": 7.5, "method": None}, error("invalid_request", "method is required", id=7.5))
    daemon.expect({"method": None}, error("invalid_request", "method is required"))
    daemon.expect({"id": 8, "Method": "ping"}, error("invalid_request", "method is required", id=8))


SCENARIO_6_FRAMES = [
    b'{"id":8,"method":',
    b"[1,2]",
    b"   ",
    b'{"id":8,"method":"ping","params":[1]}',
    b'{"id":8,"method":7}',
]

MORE_INVALID_FRAMES = [
    b'"ping"', b"8", b"true", b"null",
    b'{"id":8,"method":"ping"} x',
    b'{"id":8,"method":"ping"}{"id":9,"method":"ping"}',
    b'{"id":8,"method":"ping","params":"x"}',
    b'{"id":NaN,"method":"ping"}',
    b'{"id":Infinity,"method":"ping"}',
    b'{"id":8,"method":["ping"]}',
    b"\xff\xfe\xfd",
]


@pytest.mark.parametrize("frame", SCENARIO_6_FRAMES + MORE_INVALID_FRAMES, ids=repr)
def test_06_invalid_json(daemon, frame):
    daemon.send_raw(frame + b"\n")
    match(daemon.next_response(), INVALID_JSON)
    # The daemon keeps serving.
    daemon.expect({"id": 99, "method": "ping"}, ok(PONG, id=99))


def test_06_invalid_json_frames_in_one_write(daemon):
    daemon.send_raw(b"\n".join(SCENARIO_6_FRAMES) + b'\n{"id":99,"method":"ping"}\n')
    for _ in SCENARIO_6_FRAMES:
        match(daemon.next_response(), INVALID_JSON)
    match(daemon.next_response(), ok(PONG, id=99))


def test_07_null_params_and_unknown_top_level_keys(daemon):
    daemon.expect({"jsonrpc": "2.0", "id": 9, "method": "ping", "params": None}, ok(PONG, id=9))
    daemon.expect({"id": 10, "method": "ping", "params": {"unknown": [1, {}]}, "extra": True},
                  ok(PONG, id=10))


def test_08_empty_lines_are_skipped_and_crlf_works(daemon):
    daemon.send_raw(b'\n\r\n\n{"id":10,"method":"ping"}\r\n')
    daemon.close_stdin()
    frames = daemon.read_until_eof()
    assert len(frames) == 1, frames
    match(frames[0], ok(PONG, id=10))
    assert daemon.wait() == 0


def test_09_oversized_frame_then_recovery(daemon):
    writer = daemon.send_in_background(padded_ping(MAX_FRAME + 1, 11) + b'{"id":11,"method":"ping"}\n')
    match(daemon.next_response(), OVERSIZED)
    match(daemon.next_response(), ok(PONG, id=11))
    writer.join()
    assert not writer.errors


def test_09_oversized_frame_in_small_writes_is_reported_once(daemon):
    # One line, well past the limit, arriving in 4 KiB writes.
    data = padded_ping(MAX_FRAME + 1, 11)[:-1] + b"x" * 100_000 + b'\n{"id":12,"method":"ping"}\n'

    def trickle():
        for i in range(0, len(data), 4096):
            daemon.send_raw(data[i : i + 4096])

    writer = threading.Thread(target=trickle, daemon=True)
    writer.start()
    match(daemon.next_response(), OVERSIZED)
    match(daemon.next_response(), ok(PONG, id=12))
    writer.join(30)


def test_09_several_oversized_frames_each_get_one_error(daemon):
    big = b"y" * (MAX_FRAME + 10) + b"\n"
    data = big + big + b"\n" + big + b'{"id":13,"method":"ping"}\n'
    writer = daemon.send_in_background(data)
    for _ in range(3):
        match(daemon.next_response(), OVERSIZED)
    match(daemon.next_response(), ok(PONG, id=13))
    writer.join()


def test_09_oversized_final_frame_at_eof(daemon):
    writer = daemon.send_in_background(b'{"id":1,"method":"ping"}\n' + b"z" * (MAX_FRAME + 1))
    writer.join()
    daemon.close_stdin()
    frames = daemon.read_until_eof()
    assert len(frames) == 2, frames
    match(frames[0], ok(PONG, id=1))
    match(frames[1], OVERSIZED)
    assert daemon.wait() == 0


def test_10_frame_exactly_at_the_limit(daemon):
    writer = daemon.send_in_background(padded_ping(MAX_FRAME, 12))
    match(daemon.next_response(), ok(PONG, id=12))
    writer.join()
    # The CR counts too: CRLF at exactly the limit is accepted, one byte more is not.
    writer = daemon.send_in_background(
        padded_ping(MAX_FRAME, 13, crlf=True) + padded_ping(MAX_FRAME + 1, 14, crlf=True)
    )
    match(daemon.next_response(), ok(PONG, id=13))
    match(daemon.next_response(), OVERSIZED)
    writer.join()


@pytest.mark.parametrize("value", [0, False, "", {"k": [1]}, [], {}, True, -1, 2.5, "x y", [None]],
                         ids=repr)
def test_11_id_echo(daemon, value):
    daemon.expect({"id": value, "method": "ping"}, ok(PONG, id=value))
    # Errors echo the id the same way.
    daemon.expect({"id": value, "method": "nope"},
                  error("method_not_found", 'unknown method "nope"', id=value))


def test_11_absent_or_null_id_gets_no_id(daemon):
    daemon.expect({"method": "ping"}, ok(PONG))
    daemon.expect({"id": None, "method": "ping"}, ok(PONG))
    daemon.expect({"id": None, "method": "nope"}, error("method_not_found", 'unknown method "nope"'))


def test_11_numeric_id_spelling(daemon):
    daemon.send_raw(b'{"id":1e3,"method":"ping"}\n{"id":-0.5E1,"method":"ping"}\n')
    match(daemon.next_response(), ok(PONG, id=1000))
    match(daemon.next_response(), ok(PONG, id=-5))


def test_12_last_line_without_lf_then_eof(daemon):
    daemon.send_raw(b'{"id":13,"method":"ping"}')
    daemon.close_stdin()
    frames = daemon.read_until_eof()
    assert len(frames) == 1, frames
    match(frames[0], ok(PONG, id=13))
    assert daemon.wait() == 0


# ---------------------------------------------------------------------------------------------
# §9 scenarios 13-18: proxy streams


PORT_ERROR = "proxy.open requires port in range 1-65535"


def test_13_proxy_open_validation_and_integer_rules(daemon):
    daemon.expect({"id": 20, "method": "proxy.open", "params": {"port": 80}},
                  error("invalid_params", "proxy.open requires host", id=20))
    daemon.expect({"id": 21, "method": "proxy.open", "params": {"host": "127.0.0.1", "port": "80"}},
                  error("invalid_params", PORT_ERROR, id=21))
    for port in [0, 65536, 80.5, -1, None, True, [80]]:
        daemon.expect({"id": 22, "method": "proxy.open", "params": {"host": "127.0.0.1", "port": port}},
                      error("invalid_params", PORT_ERROR, id=22))
    daemon.expect({"id": 23, "method": "proxy.open", "params": {"host": "127.0.0.1"}},
                  error("invalid_params", PORT_ERROR, id=23))
    for host in ["", None, 1]:
        daemon.expect({"id": 24, "method": "proxy.open", "params": {"host": host, "port": 0}},
                      error("invalid_params", "proxy.open requires host", id=24))
    daemon.expect({"id": 25, "method": "proxy.open"},
                  error("invalid_params", "proxy.open requires host", id=25))


def test_13_port_with_zero_fraction_is_accepted(daemon):
    watcher = EofWatcher()
    with TcpServer(watcher) as server:
        daemon.send_raw(b'{"id":26,"method":"proxy.open","params":{"host":"127.0.0.1","port":%d.0}}\n'
                        % server.port)
        match(daemon.next_response(), ok({"stream_id": "s-1"}, id=26))
        daemon.send_raw(b'{"id":27,"method":"proxy.open","params":{"host":"127.0.0.1","port":%de0}}\n'
                        % server.port)
        match(daemon.next_response(), ok({"stream_id": "s-2"}, id=27))
        wait_for(lambda: server.accepted == 2, message="two accepted connections")
        daemon.close_stdin()
        assert daemon.wait() == 0
        wait_for(lambda: watcher.eofs == 2, message="both streams closed")


def test_14_proxy_open_dial_failure(daemon):
    port = closed_port()
    resp = daemon.expect(
        {"id": 22, "method": "proxy.open",
         "params": {"host": "127.0.0.1", "port": port, "timeout_ms": 2000}},
        error("open_failed", NONEMPTY_STR, id=22),
    )
    assert "refused" in resp["error"]["message"].lower(), resp
    # A failed open allocates no stream id.
    with TcpServer(EofWatcher()) as server:
        daemon.expect({"id": 23, "method": "proxy.open", "params": {"host": "127.0.0.1", "port": server.port}},
                      ok({"stream_id": "s-1"}, id=23))


def test_14_proxy_open_unresolvable_host(daemon):
    daemon.expect(
        {"id": 22, "method": "proxy.open",
         "params": {"host": "no-such-host.invalid", "port": 80, "timeout_ms": 5000}},
        error("open_failed", NONEMPTY_STR, id=22),
        timeout=15,
    )


def test_15_proxy_write_validation_order(daemon):
    daemon.expect({"id": 23, "method": "proxy.write", "params": {"data_base64": "aGk="}},
                  error("invalid_params", "proxy.write requires stream_id", id=23))
    daemon.expect({"id": 24, "method": "proxy.write", "params": {"stream_id": "s-404"}},
                  error("invalid_params", "proxy.write requires data_base64", id=24))
    daemon.expect({"id": 25, "method": "proxy.write", "params": {"stream_id": "s-404", "data_base64": "%%%"}},
                  error("invalid_params", "data_base64 must be valid base64", id=25))
    daemon.expect({"id": 26, "method": "proxy.write", "params": {"stream_id": "s-404", "data_base64": "aGk="}},
                  error("not_found", "stream not found", id=26))
    # More shapes of the same rules.
    daemon.expect({"id": 27, "method": "proxy.write", "params": {"stream_id": "", "data_base64": "%"}},
                  error("invalid_params", "proxy.write requires stream_id", id=27))
    daemon.expect({"id": 28, "method": "proxy.write", "params": {"stream_id": "s-1", "data_base64": 5}},
                  error("invalid_params", "proxy.write requires data_base64", id=28))
    daemon.expect({"id": 29, "method": "proxy.write", "params": {"stream_id": "s-1", "data_base64": "aGk"}},
                  error("invalid_params", "data_base64 must be valid base64", id=29))
    daemon.expect({"id": 30, "method": "proxy.write", "params": {"stream_id": "s-1", "data_base64": ""}},
                  error("not_found", "stream not found", id=30))


def test_16_proxy_close_of_unknown_stream_succeeds(daemon):
    daemon.expect({"id": 27, "method": "proxy.close", "params": {"stream_id": "s-404"}},
                  ok({"closed": True}, id=27))
    daemon.expect({"id": 28, "method": "proxy.close", "params": {}},
                  error("invalid_params", "proxy.close requires stream_id", id=28))
    daemon.expect({"id": 29, "method": "proxy.close"},
                  error("invalid_params", "proxy.close requires stream_id", id=29))


def test_16_proxy_close_is_idempotent_and_closes_the_socket(daemon):
    watcher = EofWatcher()
    with TcpServer(watcher) as server:
        daemon.expect({"id": 1, "method": "proxy.open", "params": {"host": "127.0.0.1", "port": server.port}},
                      ok({"stream_id": "s-1"}, id=1))
        daemon.expect({"id": 2, "method": "proxy.stream.subscribe", "params": {"stream_id": "s-1"}},
                      ok({"subscribed": True, "already_subscribed": False}, id=2))
        daemon.expect({"id": 3, "method": "proxy.close", "params": {"stream_id": "s-1"}},
                      ok({"closed": True}, id=3))
        wait_for(lambda: watcher.eofs == 1, message="the proxied socket to close")
        daemon.expect({"id": 4, "method": "proxy.close", "params": {"stream_id": "s-1"}},
                      ok({"closed": True}, id=4))
        daemon.expect({"id": 5, "method": "proxy.write", "params": {"stream_id": "s-1", "data_base64": "aGk="}},
                      error("not_found", "stream not found", id=5))
        # A stream closed by the client emits no event.
        daemon.close_stdin()
        assert daemon.read_until_eof() == []
        assert daemon.wait() == 0


def test_17_push_round_trip(daemon):
    with TcpServer(echo_then_tail(5)) as server:
        daemon.send({"id": 30, "method": "proxy.open", "params": {"host": "127.0.0.1", "port": server.port}})
        match(daemon.next_response(), ok({"stream_id": "s-1"}, id=30))
        daemon.send({"id": 31, "method": "proxy.stream.subscribe", "params": {"stream_id": "s-1"}})
        daemon.send({"id": 32, "method": "proxy.stream.subscribe", "params": {"stream_id": "s-1"}})
        daemon.send({"id": 33, "method": "proxy.write", "params": {"stream_id": "s-1", "data_base64": "aGVsbG8="}})
        # Read every frame in arrival order until the three responses and the eof are in.
        frames = []
        while sum("id" in f for f in frames) < 3 or not any(
                f.get("event") == "proxy.stream.eof" for f in frames):
            frames.append(daemon.recv_frame())
        responses = [f for f in frames if "id" in f]
        match(responses, [
            ok({"subscribed": True, "already_subscribed": False}, id=31),
            ok({"subscribed": True, "already_subscribed": True}, id=32),
            ok({"written": 5}, id=33),
        ])
        events = [f for f in frames if "event" in f]
        assert [e["event"] for e in events[:-1]] == ["proxy.stream.data"] * (len(events) - 1)
        match(events[-1], {"event": "proxy.stream.eof", "stream_id": "s-1"})
        data = b""
        for e in events[:-1]:
            match(e, {"event": "proxy.stream.data", "stream_id": "s-1", "data_base64": NONEMPTY_STR})
            data += base64.b64decode(e["data_base64"], validate=True)
        assert data == b"hellotail"
        daemon.expect({"id": 34, "method": "proxy.write", "params": {"stream_id": "s-1", "data_base64": "aGk="}},
                      error("not_found", "stream not found", id=34))
        daemon.expect({"id": 35, "method": "proxy.close", "params": {"stream_id": "s-1"}},
                      ok({"closed": True}, id=35))
        daemon.close_stdin()
        assert daemon.read_until_eof() == [], "events after eof"
        assert daemon.wait() == 0


def test_17_subscribe_errors(daemon):
    daemon.expect({"id": 1, "method": "proxy.stream.subscribe", "params": {}},
                  error("invalid_params", "proxy.stream.subscribe requires stream_id", id=1))
    daemon.expect({"id": 2, "method": "proxy.stream.subscribe", "params": {"stream_id": "s-1"}},
                  error("not_found", "stream not found", id=2))


def test_18_legacy_proxy_read(daemon):
    with TcpServer(send_and_close(b"hi")) as server:
        daemon.expect({"id": 39, "method": "proxy.open", "params": {"host": "127.0.0.1", "port": server.port}},
                      ok({"stream_id": "s-1"}, id=39))
        daemon.expect({"id": 40, "method": "proxy.read", "params": {"stream_id": "s-1", "max_bytes": 0}},
                      error("invalid_params", "max_bytes must be in range 1-262144", id=40))
        daemon.expect({"id": 41, "method": "proxy.read", "params": {"stream_id": "s-1", "timeout_ms": 1000}},
                      ok({"data_base64": "aGk=", "eof": False}, id=41))
        daemon.expect({"id": 42, "method": "proxy.read", "params": {"stream_id": "s-1", "timeout_ms": 1000}},
                      ok({"data_base64": "", "eof": True}, id=42))
        daemon.expect({"id": 43, "method": "proxy.read", "params": {"stream_id": "s-1"}},
                      error("not_found", "stream not found", id=43))


def test_18_proxy_read_on_an_idle_stream_and_errors(daemon):
    watcher = EofWatcher()
    with TcpServer(watcher) as server:
        daemon.expect({"id": 1, "method": "proxy.open", "params": {"host": "127.0.0.1", "port": server.port}},
                      ok({"stream_id": "s-1"}, id=1))
        start = time.monotonic()
        daemon.expect({"id": 2, "method": "proxy.read", "params": {"stream_id": "s-1", "timeout_ms": 50}},
                      ok({"data_base64": "", "eof": False}, id=2))
        assert time.monotonic() - start >= 0.04
        daemon.expect({"id": 3, "method": "proxy.read", "params": {"stream_id": "s-1", "timeout_ms": 0}},
                      ok({"data_base64": "", "eof": False}, id=3))
        daemon.expect({"id": 4, "method": "proxy.read", "params": {}},
                      error("invalid_params", "proxy.read requires stream_id", id=4))
        daemon.expect({"id": 5, "method": "proxy.read", "params": {"stream_id": "s-1", "max_bytes": 262145}},
                      error("invalid_params", "max_bytes must be in range 1-262144", id=5))
        daemon.expect({"id": 6, "method": "proxy.read", "params": {"stream_id": "s-9", "max_bytes": 0}},
                      error("invalid_params", "max_bytes must be in range 1-262144", id=6))
        daemon.expect({"id": 7, "method": "proxy.read", "params": {"stream_id": "s-9"}},
                      error("not_found", "stream not found", id=7))
        # Bytes written through the stream reach the server.
        daemon.expect({"id": 8, "method": "proxy.write",
                       "params": {"stream_id": "s-1", "data_base64": b64(b"ping\x00\xff")}},
                      ok({"written": 6}, id=8))
        wait_for(lambda: bytes(watcher.received) == b"ping\x00\xff", message="bytes at the server")
        # ◆ A subscribed stream cannot be pulled.
        daemon.expect({"id": 9, "method": "proxy.stream.subscribe", "params": {"stream_id": "s-1"}},
                      ok({"subscribed": True, "already_subscribed": False}, id=9))
        daemon.expect({"id": 10, "method": "proxy.read", "params": {"stream_id": "s-1"}},
                      error("invalid_params", "stream is subscribed", id=10))


def test_18_proxy_read_max_bytes_splits_data(daemon):
    with TcpServer(send_and_close(b"abcdefghij")) as server:
        daemon.expect({"id": 1, "method": "proxy.open", "params": {"host": "127.0.0.1", "port": server.port}},
                      ok({"stream_id": "s-1"}, id=1))
        got = b""
        eof = False
        while not eof:
            resp = daemon.call("proxy.read", {"stream_id": "s-1", "max_bytes": 4, "timeout_ms": 1000})
            chunk = base64.b64decode(resp["result"]["data_base64"], validate=True)
            assert len(chunk) <= 4
            got += chunk
            eof = resp["result"]["eof"]
        assert got == b"abcdefghij"


# ---------------------------------------------------------------------------------------------
# §9 scenarios 19-22: session.* size coordinator


def snapshot(session_id, attachments, cols, rows):
    return {"session_id": session_id,
            "attachments": [{"attachment_id": a, "cols": c, "rows": r, "updated_at": RFC3339}
                            for a, c, r in attachments],
            "effective_cols": cols, "effective_rows": rows,
            "last_known_cols": cols, "last_known_rows": rows}


def test_19_to_22_session_lifecycle(daemon):
    # 19
    daemon.expect({"id": 50, "method": "session.open"}, ok(snapshot("sess-1", [], 0, 0), id=50))
    # 20
    daemon.expect(
        {"id": 51, "method": "session.attach",
         "params": {"session_id": "sess-1", "attachment_id": "a", "cols": 120, "rows": 40}},
        ok(snapshot("sess-1", [("a", 120, 40)], 120, 40), id=51))
    daemon.expect(
        {"id": 52, "method": "session.attach",
         "params": {"session_id": "sess-1", "attachment_id": "b", "cols": 90, "rows": 50}},
        ok(snapshot("sess-1", [("a", 120, 40), ("b", 90, 50)], 90, 40), id=52))
    # 21
    daemon.expect(
        {"id": 53, "method": "session.detach", "params": {"session_id": "sess-1", "attachment_id": "b"}},
        ok(snapshot("sess-1", [("a", 120, 40)], 120, 40), id=53))
    daemon.expect(
        {"id": 54, "method": "session.detach", "params": {"session_id": "sess-1", "attachment_id": "a"}},
        ok(snapshot("sess-1", [], 120, 40), id=54))
    daemon.expect({"id": 55, "method": "session.status", "params": {"session_id": "sess-1"}},
                  ok(snapshot("sess-1", [], 120, 40), id=55))
    # 22
    daemon.expect(
        {"id": 56, "method": "session.attach",
         "params": {"session_id": "sess-1", "attachment_id": "a", "cols": 0, "rows": 40}},
        error("invalid_params", "session.attach requires cols > 0", id=56))
    daemon.expect(
        {"id": 57, "method": "session.attach",
         "params": {"session_id": "nope", "attachment_id": "a", "cols": 80, "rows": 24}},
        error("not_found", "session not found", id=57))
    daemon.expect(
        {"id": 58, "method": "session.resize",
         "params": {"session_id": "sess-1", "attachment_id": "zz", "cols": 80, "rows": 24}},
        error("not_found", "attachment not found", id=58))
    daemon.expect({"id": 59, "method": "session.close", "params": {"session_id": "sess-1"}},
                  ok({"session_id": "sess-1", "closed": True}, id=59))
    daemon.expect({"id": 60, "method": "session.close", "params": {"session_id": "sess-1"}},
                  error("not_found", "session not found", id=60))


def test_20_updated_at_is_current_utc(daemon):
    from datetime import datetime, timedelta, timezone

    daemon.call("session.open")
    before = datetime.now(timezone.utc)
    resp = daemon.call("session.attach", {"session_id": "sess-1", "attachment_id": "a",
                                          "cols": 1, "rows": 1})
    after = datetime.now(timezone.utc)
    stamp = resp["result"]["attachments"][0]["updated_at"]
    assert RFC3339.matches(stamp), stamp
    whole, _, fraction = stamp[:-1].partition(".")
    when = datetime.strptime(whole, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
    when += timedelta(microseconds=int((fraction + "000000")[:6]))
    assert before - timedelta(milliseconds=1) <= when <= after + timedelta(milliseconds=1)


def test_session_validation_order_and_trimming(daemon):
    for method in ("session.attach", "session.resize"):
        daemon.expect({"id": 1, "method": method, "params": {}},
                      error("invalid_params", f"{method} requires session_id", id=1))
        daemon.expect({"id": 2, "method": method, "params": {"session_id": " \t"}},
                      error("invalid_params", f"{method} requires session_id", id=2))
        daemon.expect({"id": 3, "method": method, "params": {"session_id": "x"}},
                      error("invalid_params", f"{method} requires attachment_id", id=3))
        daemon.expect({"id": 4, "method": method,
                       "params": {"session_id": "x", "attachment_id": "a", "cols": 80.5, "rows": 0}},
                      error("invalid_params", f"{method} requires cols > 0", id=4))
        daemon.expect({"id": 5, "method": method,
                       "params": {"session_id": "x", "attachment_id": "a", "cols": 80, "rows": "24"}},
                      error("invalid_params", f"{method} requires rows > 0", id=5))
        daemon.expect({"id": 6, "method": method,
                       "params": {"session_id": "x", "attachment_id": "a", "cols": 80, "rows": 24}},
                      error("not_found", "session not found", id=6))
    for method in ("session.detach",):
        daemon.expect({"id": 7, "method": method, "params": {"session_id": "x"}},
                      error("invalid_params", f"{method} requires attachment_id", id=7))
    for method in ("session.status", "session.close", "session.detach"):
        daemon.expect({"id": 8, "method": method, "params": {"session_id": 5}},
                      error("invalid_params", f"{method} requires session_id", id=8))
    # session.open: explicit ids do not advance the counter; an existing session is unchanged.
    daemon.expect({"id": 9, "method": "session.open", "params": {"session_id": "mine"}},
                  ok(snapshot("mine", [], 0, 0), id=9))
    daemon.expect({"id": 10, "method": "session.open", "params": {"session_id": ""}},
                  ok(snapshot("sess-1", [], 0, 0), id=10))
    daemon.expect({"id": 11, "method": "session.attach",
                   "params": {"session_id": " sess-1 ", "attachment_id": "\tb ", "cols": 90.0, "rows": 5e1}},
                  ok(snapshot("sess-1", [("b", 90, 50)], 90, 50), id=11))
    daemon.expect({"id": 12, "method": "session.open", "params": {"session_id": "sess-1"}},
                  ok(snapshot("sess-1", [("b", 90, 50)], 90, 50), id=12))
    daemon.expect({"id": 13, "method": "session.open"}, ok(snapshot("sess-2", [], 0, 0), id=13))
    # detach/status use ids exactly as given: " sess-1" is another (unknown) session.
    daemon.expect({"id": 14, "method": "session.detach", "params": {"session_id": " sess-1", "attachment_id": "b"}},
                  error("not_found", "session not found", id=14))
    daemon.expect({"id": 15, "method": "session.detach", "params": {"session_id": "sess-1", "attachment_id": " b"}},
                  error("not_found", "attachment not found", id=15))
    # Attachments are sorted by id in byte order; resize replaces a size.
    for aid, cols, rows in [("é", 200, 60), ("B", 100, 70), ("a", 150, 30)]:
        daemon.call("session.attach", {"session_id": "sess-1", "attachment_id": aid, "cols": cols, "rows": rows})
    daemon.expect({"id": 16, "method": "session.resize",
                   "params": {"session_id": "sess-1", "attachment_id": "b", "cols": 300, "rows": 300}},
                  ok(snapshot("sess-1", [("B", 100, 70), ("a", 150, 30), ("b", 300, 300), ("é", 200, 60)],
                              100, 30), id=16))


# ---------------------------------------------------------------------------------------------
# The stdio transport


def garbage_lines(count: int, seed: int = 20240601) -> list[bytes]:
    """Lines that are not valid requests (or are empty), none containing an LF."""
    rng = random.Random(seed)
    request = b'{"id":123,"method":"ping","params":{"k":[1,2,{"x":"y"}],"s":"\\u00e9"}}'
    non_objects = [b"[1,2]", b'"ping"', b"12", b"-0.5e3", b"true", b"false", b"null", b"[]",
                   b'{"id":1,"method":"ping"} 1', b'{"id":NaN,"method":"ping"}',
                   b'{"method":"ping","params":[]}', b'{"method":42}']
    lines = []
    while len(lines) < count:
        kind = rng.randrange(6)
        if kind == 0:
            line = rng.choice([b"", b"\r", b" ", b"\t", b"  \r", b"\r\r"])
        elif kind == 1:
            line = bytes(rng.choice(range(256)) for _ in range(rng.randrange(1, 120))).replace(b"\n", b"")
        elif kind == 2:
            line = request[: rng.randrange(1, len(request))]
        elif kind == 3:
            line = rng.choice(non_objects)
        elif kind == 4:
            line = bytes(rng.choice(b'{}[]":,0123456789.eE+-tfnrul \\') for _ in range(rng.randrange(1, 40)))
        else:
            line = bytes(rng.randrange(0x80, 0x100) for _ in range(rng.randrange(1, 10)))
        body = line[:-1] if line.endswith(b"\r") else line
        try:
            if isinstance(json.loads(body), dict):
                continue  # a valid object by chance is not garbage
        except ValueError:
            pass
        lines.append(line)
    return lines


def test_garbage_lines_then_ping(daemon):
    lines = garbage_lines(10_000)
    expected_errors = sum(1 for line in lines if (line[:-1] if line.endswith(b"\r") else line))
    assert 5_000 < expected_errors < 10_000
    writer = daemon.send_in_background(b"\n".join(lines) + b'\n{"id":"after","method":"ping"}\n')
    for i in range(expected_errors):
        resp = daemon.next_response()
        match(resp, INVALID_JSON)
    match(daemon.next_response(), ok(PONG, id="after"))
    writer.join()
    assert not writer.errors
    assert not daemon.events


def test_stdin_eof_exits_zero_and_closes_proxied_sockets(daemon):
    watcher = EofWatcher()
    with TcpServer(watcher) as server:
        for i, sub in enumerate([False, True, False], start=1):
            daemon.expect({"id": i, "method": "proxy.open", "params": {"host": "127.0.0.1", "port": server.port}},
                          ok({"stream_id": f"s-{i}"}, id=i))
            if sub:
                daemon.call("proxy.stream.subscribe", {"stream_id": f"s-{i}"})
        wait_for(lambda: server.accepted == 3, message="three accepted connections")
        assert watcher.eofs == 0
        daemon.close_stdin()
        assert daemon.read_until_eof() == []
        assert daemon.wait() == 0
        wait_for(lambda: watcher.eofs == 3, message="the server to see EOF on all three sockets")


def test_requests_read_before_eof_are_all_answered(daemon):
    watcher = EofWatcher()
    with TcpServer(watcher) as server:
        daemon.expect({"id": 1, "method": "proxy.open", "params": {"host": "127.0.0.1", "port": server.port}},
                      ok({"stream_id": "s-1"}, id=1))
        # An awaiting handler followed by more requests, then EOF at once.
        daemon.send_raw(
            b'{"id":2,"method":"proxy.read","params":{"stream_id":"s-1","timeout_ms":200}}\n'
            b'{"id":3,"method":"ping"}\n'
            b'{"id":4,"method":"proxy.write","params":{"stream_id":"s-1","data_base64":"aGk="}}\n'
            b'{"id":5,"method":"ping"}'
        )
        daemon.close_stdin()
        frames = daemon.read_until_eof()
        match(frames, [ok({"data_base64": "", "eof": False}, id=2), ok(PONG, id=3),
                       ok({"written": 2}, id=4), ok(PONG, id=5)])
        assert daemon.wait() == 0
        wait_for(lambda: watcher.eofs == 1, message="the stream to close")
        assert bytes(watcher.received) == b"hi"


def test_stream_and_session_ids_are_per_connection(spawn_daemon):
    with TcpServer(EofWatcher()) as server:
        first = spawn_daemon()
        params = {"host": "127.0.0.1", "port": server.port}
        assert first.call("proxy.open", params)["result"] == {"stream_id": "s-1"}
        assert first.call("proxy.open", params)["result"] == {"stream_id": "s-2"}
        first.call("proxy.close", {"stream_id": "s-2"})
        # Ids are never reused within a connection.
        assert first.call("proxy.open", params)["result"] == {"stream_id": "s-3"}
        assert first.call("session.open")["result"]["session_id"] == "sess-1"
        assert first.call("session.open")["result"]["session_id"] == "sess-2"
        # A second process is a second connection: its counters start again, and the first
        # connection's streams and sessions are not visible to it.
        second = spawn_daemon()
        resp = second.call("proxy.write", {"stream_id": "s-1", "data_base64": "aGk="})
        match(resp, error("not_found", "stream not found", id=resp["id"]))
        resp = second.call("session.status", {"session_id": "sess-1"})
        match(resp, error("not_found", "session not found", id=resp["id"]))
        assert second.call("proxy.open", params)["result"] == {"stream_id": "s-1"}
        assert second.call("session.open")["result"]["session_id"] == "sess-1"
        assert first.call("proxy.open", params)["result"] == {"stream_id": "s-4"}


def test_lf_and_crlf_line_endings(daemon):
    daemon.send_raw(
        b'{"id":1,"method":"ping"}\r\n'
        b'{"id":2,"method":"ping"}\n'
        b'{"id":3,"method":"nope"}\r\n'
        b"\r\n"
        b"\r\r\n"                            # a lone CR is left: whitespace, not empty
        b'{"id":4,"method":"ping"}\r{"id":5}\n'  # a CR mid-line is not a line end
        b'{"id":6,"method":"ping"} \r\n'
        b'{"id":7,"method":"ping"}\r\r\n'    # the second CR is trailing JSON whitespace
    )
    match(daemon.next_response(), ok(PONG, id=1))
    match(daemon.next_response(), ok(PONG, id=2))
    match(daemon.next_response(), error("method_not_found", 'unknown method "nope"', id=3))
    match(daemon.next_response(), INVALID_JSON)
    match(daemon.next_response(), INVALID_JSON)
    match(daemon.next_response(), ok(PONG, id=6))
    match(daemon.next_response(), ok(PONG, id=7))
    daemon.close_stdin()
    assert daemon.read_until_eof() == []


def test_pipelined_requests_are_answered_in_order(daemon):
    watcher = EofWatcher()
    with TcpServer(watcher) as server:
        daemon.expect({"id": 0, "method": "proxy.open", "params": {"host": "127.0.0.1", "port": server.port}},
                      ok({"stream_id": "s-1"}, id=0))
        rng = random.Random(7)
        requests, expected = [], []
        for i in range(1, 1201):
            kind = rng.randrange(8)
            if kind == 0:
                requests.append({"id": i, "method": "ping"})
                expected.append(ok(PONG, id=i))
            elif kind == 1:
                requests.append({"id": i, "method": "proxy.read",
                                 "params": {"stream_id": "s-1", "timeout_ms": rng.choice([0, 1, 3])}})
                expected.append(ok({"data_base64": "", "eof": False}, id=i))
            elif kind == 2:
                requests.append({"id": i, "method": "nope"})
                expected.append(error("method_not_found", 'unknown method "nope"', id=i))
            elif kind == 3:
                requests.append({"method": "ping"})
                expected.append(ok(PONG))
            elif kind == 4:
                requests.append({"id": i, "method": "session.status", "params": {"session_id": "x"}})
                expected.append(error("not_found", "session not found", id=i))
            elif kind == 5:
                requests.append({"id": str(i), "method": "proxy.write",
                                 "params": {"stream_id": "s-1", "data_base64": b64(b"%d," % i)}})
                expected.append(ok({"written": len(b"%d," % i)}, id=str(i)))
            elif kind == 6:
                requests.append(None)  # an invalid frame
                expected.append(INVALID_JSON)
            else:
                requests.append({"id": i, "method": "hello"})
                expected.append(ok({"name": "cmuxd-remote", "version": NONEMPTY_STR,
                                    "capabilities": STR_LIST}, id=i))
        data = b"".join(b"[oops\n" if r is None else json.dumps(r).encode() + b"\n" for r in requests)
        writer = daemon.send_in_background(data)
        for i, want in enumerate(expected):
            got = daemon.next_response()
            try:
                match(got, want)
            except AssertionError as exc:
                raise AssertionError(f"response #{i}: {exc}") from None
        writer.join()
        written = b"".join(base64.b64decode(r["params"]["data_base64"])
                           for r in requests if r and r.get("method") == "proxy.write")
        wait_for(lambda: bytes(watcher.received) == written, message="all proxied writes in order")


def test_slow_reader_applies_back_pressure(daemon):
    size = 50 * 1024 * 1024
    payload = random.Random(5).randbytes(size)
    sender = BulkSender(payload)
    with TcpServer(sender) as server:
        daemon.call("ping")
        proc = psutil.Process(daemon.pid)
        baseline = proc.memory_info().rss
        daemon.expect({"id": 1, "method": "proxy.open", "params": {"host": "127.0.0.1", "port": server.port}},
                      ok({"stream_id": "s-1"}, id=1))
        daemon.send({"id": 2, "method": "proxy.stream.subscribe", "params": {"stream_id": "s-1"}})
        # Do not read. The sender must stall well short of the payload.
        stalled = _wait_until_stalled(lambda: sender.sent, quiet=0.5, timeout=30)
        assert not sender.done.is_set()
        assert stalled < 24 * 1024 * 1024, f"{stalled} bytes were taken without being read"
        peak = proc.memory_info().rss
        assert peak - baseline < 32 * 1024 * 1024, f"daemon RSS grew by {(peak - baseline) >> 20} MiB"

        # Now read everything: complete, in order, in chunks of at most 32 KiB.
        digest = hashlib.sha256()
        total = 0
        subscribed = False
        while True:
            msg = daemon.recv_frame(timeout=30)
            if "event" not in msg:
                match(msg, ok({"subscribed": True, "already_subscribed": False}, id=2))
                subscribed = True
                continue
            if msg["event"] == "proxy.stream.eof":
                match(msg, {"event": "proxy.stream.eof", "stream_id": "s-1"})
                break
            match(msg, {"event": "proxy.stream.data", "stream_id": "s-1", "data_base64": NONEMPTY_STR})
            chunk = base64.b64decode(msg["data_base64"], validate=True)
            assert 0 < len(chunk) <= 32768
            digest.update(chunk)
            total += len(chunk)
            if total % (8 << 20) < 32768:
                rss = proc.memory_info().rss
                assert rss - baseline < 32 * 1024 * 1024, f"daemon RSS grew by {(rss - baseline) >> 20} MiB"
        assert subscribed
        assert total == size
        assert digest.digest() == hashlib.sha256(payload).digest()
        assert sender.done.is_set()
        daemon.expect({"id": 3, "method": "ping"}, ok(PONG, id=3))


def test_a_client_that_leaves_replies_unread_is_held(daemon):
    """Requests stop being read once the replies the client leaves unread pass a small
    allowance: what the daemon takes stays bounded, and every request is answered in order
    once the client reads."""
    daemon.call("ping")
    proc = psutil.Process(daemon.pid)
    read = lambda: proc.io_counters().read_chars  # noqa: E731
    before = read()
    count = 200_000
    writer = daemon.send_in_background(b'{"id":1,"method":"ping"}\n' * count)
    taken = _wait_until_stalled(read, quiet=0.5, timeout=30) - before
    assert taken < 2 * 1024 * 1024, f"{taken} bytes of requests were read with replies unread"
    for _ in range(count):
        assert daemon.recv_frame(timeout=30) == ok(PONG, id=1)
    writer.join(30)
    assert not writer.is_alive() and not writer.errors
    daemon.expect({"id": 2, "method": "ping"}, ok(PONG, id=2))


def _wait_until_stalled(progress, quiet: float, timeout: float) -> int:
    """Wait until `progress()` has not changed for `quiet` seconds; return its value."""
    deadline = time.monotonic() + timeout
    last = progress()
    changed = time.monotonic()
    while True:
        time.sleep(0.02)
        now = time.monotonic()
        value = progress()
        if value != last:
            last, changed = value, now
        elif value and now - changed >= quiet:
            return value
        if now > deadline:
            raise AssertionError(f"sender never stalled ({value} bytes sent)")


class ResetOnSignal:
    """Aborts each connection with an RST (not a FIN) once `go` is set."""

    def __init__(self):
        self.go = threading.Event()

    def __call__(self, conn: socket.socket) -> None:
        assert self.go.wait(DEFAULT_TIMEOUT)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()


def test_reset_stream_emits_one_error_event(daemon):
    reset = ResetOnSignal()
    with TcpServer(reset) as server:
        daemon.expect({"id": 1, "method": "proxy.open", "params": {"host": "127.0.0.1", "port": server.port}},
                      ok({"stream_id": "s-1"}, id=1))
        daemon.call("proxy.stream.subscribe", {"stream_id": "s-1"})
        reset.go.set()
        event = daemon.next_event()
        match(event, {"event": "proxy.stream.error", "stream_id": "s-1", "error": NONEMPTY_STR})
        # The stream is gone.
        daemon.expect({"id": 2, "method": "proxy.write", "params": {"stream_id": "s-1", "data_base64": "aGk="}},
                      error("not_found", "stream not found", id=2))
        daemon.close_stdin()
        assert daemon.read_until_eof() == []


def test_reset_stream_fails_a_legacy_read(daemon):
    reset = ResetOnSignal()
    with TcpServer(reset) as server:
        daemon.expect({"id": 1, "method": "proxy.open", "params": {"host": "127.0.0.1", "port": server.port}},
                      ok({"stream_id": "s-1"}, id=1))
        reset.go.set()
        server.join()
        daemon.expect({"id": 2, "method": "proxy.read", "params": {"stream_id": "s-1", "timeout_ms": 2000}},
                      error("stream_error", NONEMPTY_STR, id=2))
        daemon.expect({"id": 3, "method": "proxy.read", "params": {"stream_id": "s-1"}},
                      error("not_found", "stream not found", id=3))


def test_numeric_and_unicode_id_edge_cases(daemon):
    daemon.send_raw(b'{"id":18446744073709551616,"method":"ping"}\n')
    resp = daemon.next_response()
    assert resp["id"] == pytest.approx(18446744073709551616, rel=1e-15)
    daemon.send_raw(b'{"id":"\\ud800!","method":"ping"}\n')
    match(daemon.next_response(), ok(PONG, id="\ufffd!"))
    daemon.send_raw(b'{"id":"\xff!","method":"ping"}\n')
    match(daemon.next_response(), ok(PONG, id="\ufffd!"))
    daemon.send_raw(b'{"id":"\\ud83d\\ude00 \\u2028","method":"ping"}\n')
    match(daemon.next_response(), ok(PONG, id="\U0001F600 \u2028"))


def test_stdout_closed_by_its_reader_is_a_fatal_error(daemon):
    daemon.proc.stdout.close()
    daemon.send_raw(b'{"id":1,"method":"ping"}\n')
    assert daemon.wait() == 1


def test_regular_files_as_stdin_and_stdout(tmp_path):
    requests = (b'{"id":1,"method":"ping"}\n\n[1]\r\n'
                b'{"id":2,"method":"proxy.read","params":{"stream_id":"s-1"}}\n'
                b'{"id":3,"method":"session.open"}\n{"id":4,"method":"ping"}')
    (tmp_path / "in").write_bytes(requests)
    with open(tmp_path / "in", "rb") as stdin, open(tmp_path / "out", "wb") as stdout:
        proc = subprocess.run(daemon_command("serve", "--stdio"), stdin=stdin, stdout=stdout,
                              stderr=subprocess.PIPE, timeout=30)
    assert proc.returncode == 0, proc.stderr
    lines = (tmp_path / "out").read_bytes().split(b"\n")
    assert lines.pop() == b""
    match([json.loads(line) for line in lines], [
        ok(PONG, id=1),
        INVALID_JSON,
        error("not_found", "stream not found", id=2),
        ok(snapshot("sess-1", [], 0, 0), id=3),
        ok(PONG, id=4),
    ])


def test_stdin_and_stdout_on_one_socket(spawn_daemon):
    """inetd style: the same stream socket is stdin and stdout."""
    daemon = spawn_daemon(over_socket=True)
    watcher = EofWatcher()
    with TcpServer(echo_then_tail(5)) as echo, TcpServer(watcher) as idle:
        daemon.expect({"id": 1, "method": "ping"}, ok(PONG, id=1))
        daemon.send_raw(b'\r\n{"id":2,"method":"proxy.open","params":{"host":"127.0.0.1","port":%d}}\r\n'
                        b'{"id":3,"method":"proxy.stream.subscribe","params":{"stream_id":"s-1"}}\n'
                        b'{"id":4,"method":"proxy.write","params":{"stream_id":"s-1","data_base64":"aGVsbG8="}}\n'
                        % echo.port)
        match(daemon.next_response(), ok({"stream_id": "s-1"}, id=2))
        match(daemon.next_response(), ok({"subscribed": True, "already_subscribed": False}, id=3))
        match(daemon.next_response(), ok({"written": 5}, id=4))
        data = b""
        while True:
            event = daemon.next_event()
            if event["event"] == "proxy.stream.eof":
                break
            data += base64.b64decode(event["data_base64"])
        assert data == b"hellotail"
        daemon.expect({"id": 5, "method": "proxy.open", "params": {"host": "127.0.0.1", "port": idle.port}},
                      ok({"stream_id": "s-2"}, id=5))
        daemon.send_raw(b'{"id":6,"method":"ping"}')
        daemon.close_write()
        match(daemon.read_until_eof(), [ok(PONG, id=6)])
        assert daemon.wait() == 0
        wait_for(lambda: watcher.eofs == 1, message="the proxied socket to close")


def echo_all(n: int):
    """Echo everything until `n` bytes went back, then close."""
    def handler(conn: socket.socket) -> None:
        conn.settimeout(DEFAULT_TIMEOUT)
        left = n
        while left:
            chunk = conn.recv(min(left, 65536))
            if not chunk:
                raise EOFError(f"peer closed with {left} bytes to go")
            conn.sendall(chunk)
            left -= len(chunk)
    return handler


def test_proxy_binary_round_trip_with_pipelined_writes(daemon):
    payload = random.Random(11).randbytes(2 * 1024 * 1024 + 3)
    with TcpServer(echo_all(len(payload))) as server:
        daemon.expect({"id": 1, "method": "proxy.open", "params": {"host": "127.0.0.1", "port": server.port}},
                      ok({"stream_id": "s-1"}, id=1))
        daemon.expect({"id": 2, "method": "proxy.stream.subscribe", "params": {"stream_id": "s-1"}},
                      ok({"subscribed": True, "already_subscribed": False}, id=2))
        chunks = [payload[i : i + 49_152] for i in range(0, len(payload), 49_152)]
        writer = daemon.send_in_background(b"".join(
            dumps({"id": 100 + i, "method": "proxy.write",
                   "params": {"stream_id": "s-1", "data_base64": b64(chunk)}})
            for i, chunk in enumerate(chunks)))
        for i, chunk in enumerate(chunks):
            match(daemon.next_response(), ok({"written": len(chunk)}, id=100 + i))
        echoed = bytearray()
        while True:
            event = daemon.next_event()
            if event["event"] == "proxy.stream.eof":
                break
            chunk = base64.b64decode(event["data_base64"], validate=True)
            assert len(chunk) <= 32768
            echoed += chunk
        assert echoed == payload
        writer.join()


def test_proxy_write_timeouts_keep_the_stream_and_do_not_pile_up(daemon):
    go = threading.Event()
    received = bytearray()

    def slow_reader(conn: socket.socket) -> None:
        assert go.wait(30)
        conn.settimeout(30)
        while not received.endswith(b"hi"):
            chunk = conn.recv(1 << 20)
            if not chunk:
                break
            received.extend(chunk)

    with TcpServer(slow_reader, rcvbuf=4096) as server:
        daemon.expect({"id": 1, "method": "proxy.open", "params": {"host": "127.0.0.1", "port": server.port}},
                      ok({"stream_id": "s-1"}, id=1))
        proc = psutil.Process(daemon.pid)
        baseline = proc.memory_info().rss
        blob = b64(b"w" * 3_000_000)
        # Fill every buffer on the way until a write times out.
        for _ in range(10):
            resp = daemon.call("proxy.write", {"stream_id": "s-1", "data_base64": blob, "timeout_ms": 100})
            if not resp["ok"]:
                break
        match(resp, error("stream_error", NONEMPTY_STR, id=resp["id"]))
        # Writes that time out must not queue their bytes without bound.
        for _ in range(15):
            resp = daemon.call("proxy.write", {"stream_id": "s-1", "data_base64": blob, "timeout_ms": 20})
            match(resp, error("stream_error", NONEMPTY_STR, id=resp["id"]))
        grown = proc.memory_info().rss - baseline
        assert grown < 24 * 1024 * 1024, f"daemon RSS grew by {grown >> 20} MiB"
        # A failed write does not close the stream: once the peer reads, writes succeed.
        go.set()
        daemon.expect({"id": 2, "method": "proxy.write", "params": {"stream_id": "s-1", "data_base64": "aGk="}},
                      ok({"written": 2}, id=2), timeout=30)
        wait_for(lambda: received.endswith(b"hi"), message="the last write at the server")
        assert set(received[:-2]) <= {ord("w")}


def test_proxy_open_timeout(daemon):
    # TEST-NET-1 is never routed: the dial either times out or fails at once.
    start = time.monotonic()
    daemon.expect({"id": 1, "method": "proxy.open",
                   "params": {"host": "192.0.2.1", "port": 9, "timeout_ms": 200}},
                  error("open_failed", NONEMPTY_STR, id=1))
    assert time.monotonic() - start < 5


def test_proxy_read_negative_timeout_takes_the_default(daemon):
    with TcpServer(EofWatcher()) as server:
        daemon.expect({"id": 1, "method": "proxy.open", "params": {"host": "127.0.0.1", "port": server.port}},
                      ok({"stream_id": "s-1"}, id=1))
        start = time.monotonic()
        daemon.expect({"id": 2, "method": "proxy.read", "params": {"stream_id": "s-1", "timeout_ms": -1}},
                      ok({"data_base64": "", "eof": False}, id=2))
        assert 0.04 <= time.monotonic() - start < 5


def test_a_clean_session_writes_nothing_to_stderr(daemon):
    """stderr carries only diagnostics: a session without faults leaves it empty."""
    assert daemon.call("ping", id=1)["result"] == {"pong": True}
    daemon.close_stdin()
    assert daemon.wait() == 0
    assert daemon.stderr_text() == ""
