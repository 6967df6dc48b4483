"""The hub link's message channel over a real socketpair: messages with fds and payloads in
any chunking, and every way a peer can break its rules closes the link and leaks no fd."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from cmuxd.link_channel import MessageChannel


def run(peer_writes):
    """Feed `peer_writes` (bytes, or (bytes, fds)) from the other end; the messages
    delivered (with the number of fds and the payload) and whether the channel closed."""
    async def main():
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        got, closed = [], asyncio.get_running_loop().create_future()

        def on_message(msg, fds, payload):
            got.append((msg.get("m"), len(fds), payload))
            for fd in fds:
                os.close(fd)

        channel = MessageChannel(ours, on_message, lambda: closed.set_result(True), 64)
        for item in peer_writes:
            data, fds = item if isinstance(item, tuple) else (item, [])
            if fds:
                socket.send_fds(theirs, [data], fds)
            else:
                theirs.sendall(data)
            await asyncio.sleep(0.01)
        theirs.close()
        await asyncio.wait_for(closed, 10)
        return got, channel

    return asyncio.run(main())


def open_fds() -> set[int]:
    return set(int(n) for n in os.listdir("/proc/self/fd"))


def test_messages_fds_and_payloads_in_pieces():
    r, w = os.pipe()
    writes = [b'{"m":1,"nb', b'ytes":3}\nab', (b'\n{"m":2,"nfds":1}\n', [r]), b'{"m":3}\n']
    got, _ = run(writes)
    os.close(r)
    os.close(w)
    assert got == [(1, 0, b"ab\n"), (2, 1, None), (3, 0, None)]


@pytest.mark.parametrize("bad", [
    b'{"m":"' + b"x" * 80 + b'"}\n',
    b'[1,2]\n',
    b'{"m":1,"nfds":2}\n',
    b'{"m":1,"nbytes":65}\n',
    b'{"m":1,"nbytes":-1}\n',
    b'not json\n',
])
def test_a_message_that_breaks_the_rules_closes_the_link_after_the_good_ones(bad):
    before = open_fds()
    r, w = os.pipe()
    got, channel = run([(b'{"m":1,"nfds":1}\n' + bad + b'{"m":9}\n', [r])])
    os.close(r)
    os.close(w)
    assert got == [(1, 1, None)]
    assert channel.closed
    assert open_fds() <= before  # nothing the peer sent is left open


def test_fds_of_a_message_not_yet_delivered_are_closed_with_the_link():
    before = open_fds()
    r, w = os.pipe()
    got, _ = run([(b'{"m":1,"nfds":1,"nbytes":10}\nabc', [r])])
    os.close(r)
    os.close(w)
    assert got == []
    assert open_fds() <= before
