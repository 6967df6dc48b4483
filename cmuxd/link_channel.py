"""A local channel of JSON-line messages that can carry file descriptors (the hub link).

asyncio's transports read with recv(), which drops SCM_RIGHTS, so the channel drives a
non-blocking Unix stream socket itself. A message that carries fds says how many (`nfds`);
the fds travel with the send of its first byte and are queued on arrival, so the receiver
pairs them with messages in order.
"""

from __future__ import annotations

import array
import asyncio
import logging
import os
import socket
from collections import deque
from collections.abc import Callable

import orjson

from .protocol import OVERSIZED, FrameDecoder

log = logging.getLogger("cmuxd.hub")

READ_SIZE = 262144
MAX_FDS_PER_READ = 16


class ChannelError(Exception):
    """The peer broke the channel's rules (oversized or invalid message, missing fds)."""


class MessageChannel:
    """One end of a channel. `on_message(msg, fds)` runs for each message and `on_close()`
    once, when either side closes or the peer misbehaves."""

    def __init__(self, sock: socket.socket, on_message: Callable[[dict, list[int]], None],
                 on_close: Callable[[], None], max_frame: int):
        sock.setblocking(False)
        self.sock = sock
        self.on_message = on_message
        self.on_close = on_close
        self.decoder = FrameDecoder(max_frame)
        self.fds: deque[int] = deque()
        self.out: deque[tuple[memoryview, list[int]]] = deque()
        self.buffered = 0
        self.closed = False
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(sock.fileno(), self._readable)
        self._writing = False

    def send(self, message: dict, fds: list[int] = ()) -> None:
        """Queue one message; `fds` are duplicated by the kernel on send, so the caller keeps
        its own."""
        if self.closed:
            return
        if fds:
            message = {**message, "nfds": len(fds)}
        data = memoryview(orjson.dumps(message, option=orjson.OPT_APPEND_NEWLINE))
        if not self.out and not fds:
            try:
                sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self.close()
                return
            if sent == len(data):
                return
            data = data[sent:]
        self.out.append((data, list(fds)))
        self.buffered += len(data)
        self._flush()

    def _flush(self) -> None:
        while self.out:
            data, fds = self.out[0]
            try:
                if fds:
                    sent = self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                       _pack_fds(fds))])
                else:
                    sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.close()
                return
            self.buffered -= sent
            if sent < len(data):
                self.out[0] = (data[sent:], [])
                break
            self.out.popleft()
        if self.out and not self._writing:
            self.loop.add_writer(self.sock.fileno(), self._flush)
            self._writing = True
        elif not self.out and self._writing:
            self.loop.remove_writer(self.sock.fileno())
            self._writing = False

    def _readable(self) -> None:
        try:
            data, fds, flags, _ = socket.recv_fds(self.sock, READ_SIZE, MAX_FDS_PER_READ)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, fds, flags = b"", [], 0
        self.fds.extend(fds)
        if flags & socket.MSG_CTRUNC:
            log.error("fds passed over the hub link were lost (the fd limit?); closing it")
            self.close()
            return
        if not data:
            self.close()
            return
        try:
            for frame in self.decoder.feed(data):
                if self.closed:
                    return
                if frame is OVERSIZED:
                    raise ChannelError("an oversized message")
                msg = orjson.loads(frame)
                if type(msg) is not dict:
                    raise ChannelError("a message that is not an object")
                n = msg.get("nfds", 0)
                if type(n) is not int or n < 0 or n > len(self.fds):
                    raise ChannelError("a message without the fds it announced")
                self.on_message(msg, [self.fds.popleft() for _ in range(n)])
        except (ChannelError, orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            log.error("the hub link peer sent %s; closing the link", _describe(exc))
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.remove_reader(self.sock.fileno())
        if self._writing:
            self.loop.remove_writer(self.sock.fileno())
        self.sock.close()
        while self.fds:
            os.close(self.fds.popleft())
        self.out.clear()
        self.on_close()


def _pack_fds(fds: list[int]) -> bytes:
    return array.array("i", fds).tobytes()


def _describe(exc: Exception) -> str:
    if isinstance(exc, ChannelError):
        return str(exc)
    if isinstance(exc, orjson.JSONDecodeError):
        return "invalid JSON"
    return f"a malformed message ({type(exc).__name__}: {exc})"
