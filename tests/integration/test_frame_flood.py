"""A client streaming empty or invalid frames as fast as it can does not stall its worker:
another client of the same worker keeps getting its pings answered meanwhile, and the
flooding connection itself still works afterwards."""

from __future__ import annotations

import select
import socket
import threading
import time

import pytest

from listening import ListeningDaemon

FLOOD_SECONDS = 3.0
PING_BOUND = 5.0
"""Generous: a ping takes about a millisecond, yet on a loaded machine one can take most of a
second even without a flood. Before the fix a worker handled pings between reads of the
flood, each of which took it a second or more."""


def flood(sock: socket.socket, chunk: bytes, stop: threading.Event) -> None:
    """Write `chunk` again and again until `stop`."""
    while not stop.is_set():
        sock.sendall(chunk)


def drain(sock: socket.socket, stop: threading.Event, replies: list) -> None:
    """Read and count the replies (to invalid frames) until `stop`, so they keep flowing."""
    while not stop.is_set():
        if select.select([sock], [], [], 0.2)[0]:
            replies.append(sock.recv(1 << 20).count(b"\n"))


def read_until(sock: socket.socket, want: bytes, timeout: float = 60) -> bytes:
    """Raw bytes up to the end of the line holding `want` (a backlog of error replies may
    come first: they are skipped without parsing each)."""
    deadline = time.monotonic() + timeout
    buf = b""
    while (at := buf.find(want)) < 0 or buf.find(b"\n", at) < 0:
        if not select.select([sock], [], [], max(0.0, deadline - time.monotonic()))[0]:
            raise AssertionError(f"no {want!r} within {timeout} s")
        data = sock.recv(1 << 20)
        assert data, "the connection was closed"
        buf = buf[-4096:] + data
    return buf[buf.rfind(b"\n", 0, at) + 1:buf.find(b"\n", at)]


@pytest.mark.parametrize("chunk", [b"\n" * (1 << 20), b"\r\n" * (1 << 19),
                                   b"{x}\n" * (1 << 18), b"garbage\n" * (1 << 17)],
                         ids=["LF", "CRLF", "invalid-object", "garbage"])
def test_a_flooding_client_does_not_stall_another_on_the_same_worker(chunk):
    d = ListeningDaemon(workers=1).wait_ready()
    try:
        other = d.authed()
        flooder = d.authed()
        # A small send buffer floods the worker all the same, and leaves less backlog for it
        # to work through before the last ping.
        flooder.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        stop, drained = threading.Event(), threading.Event()
        replies: list[int] = []
        threads = [threading.Thread(target=flood, args=(flooder.sock, chunk, stop)),
                   threading.Thread(target=drain, args=(flooder.sock, drained, replies))]
        for thread in threads:
            thread.start()
        answered = 0
        started = time.monotonic()
        try:
            while time.monotonic() - started < FLOOD_SECONDS:
                answered += 1
                reply = other.call("ping", id=answered, timeout=PING_BOUND)
                assert reply["ok"] is True and reply["id"] == answered
        finally:
            stop.set()
            threads[0].join(60)  # its last write may wait for the daemon to read it
            drained.set()
            threads[1].join(30)
        assert answered >= 20, f"only {answered} pings answered during the flood"
        if chunk.strip():
            assert sum(replies) > 0  # the invalid frames were answered, as the spec says
        # The flooding connection still works once its backlog is handled.
        flooder.send({"id": "last", "method": "ping"})
        assert b'{"id":"last","ok":true' in read_until(flooder.sock, b'"id":"last"')
    finally:
        d.close()


def test_a_connection_resting_for_its_junk_still_answers_every_frame_in_order():
    """The rest a junk stream earns delays its replies, never drops or reorders one."""
    d = ListeningDaemon(workers=1).wait_ready()
    try:
        s = d.authed()
        junk = 60_000
        stream = (b"{x}\n" * junk + b'{"id":1,"method":"ping"}\n' + b"\r\n" * 200_000
                  + b"\n" * 200_000 + b"garbage\n" * junk + b'{"id":2,"method":"ping"}\r\n')
        replies = []

        def read_all():
            buf = b""
            while b'"id":2' not in buf:
                assert select.select([s.sock], [], [], 120)[0], "the daemon stopped answering"
                data = s.sock.recv(1 << 20)
                assert data, "the connection was closed"
                buf += data
            replies.append(buf)

        reader = threading.Thread(target=read_all)
        reader.start()
        s.sock.sendall(stream)
        reader.join(180)
        lines = replies[0].splitlines()
        ids = [i for i, line in enumerate(lines) if b'"id":' in line]
        assert [lines[i][:8] for i in ids] == [b'{"id":1,', b'{"id":2,']
        assert ids == [junk, 2 * junk + 1]
        assert all(b'"invalid JSON request"' in line for i, line in enumerate(lines)
                   if i not in ids)
    finally:
        d.close()
