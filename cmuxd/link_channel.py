"""A local channel of JSON-line messages that can carry file descriptors and raw bytes (the
hub link).

asyncio's transports read with recv(), which drops SCM_RIGHTS, so the channel drives a
non-blocking Unix stream socket itself. A message that carries fds says how many (`nfds`);
the fds travel with the send of its first byte and are queued on arrival, so the receiver
pairs them with messages in order. A message that carries a payload says how long it is
(`nbytes`) and the raw bytes follow its line: input crosses the link as it will be written
to the PTY, neither base64-encoded again nor copied on the way.
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

from .protocol import OVERSIZED, AnnouncedDecoder

log = logging.getLogger("cmuxd.hub")

READ_SIZE = 262144
MAX_FDS_PER_READ = 16


def receive_fds(sock: socket.socket, size: int,
                max_fds: int) -> tuple[bytes, list[int], bool] | None:
    """One read of bytes and the fds that came with them, and whether the kernel dropped some
    fds on the way (MSG_CTRUNC: we are at our fd limit). None when there is nothing to read
    yet; b"" at the end of the stream, and on an error, which ends it as well."""
    try:
        data, fds, flags, _ = socket.recv_fds(sock, size, max_fds)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b"", [], False
    return data, fds, bool(flags & socket.MSG_CTRUNC)


class ChannelError(Exception):
    """The peer broke the channel's rules (oversized or invalid message, missing fds)."""


class MessageChannel:
    """One end of a channel. `on_message(msg, fds, payload)` runs for each message (`payload`
    is None unless the message carries one) and `on_close()` once, when either side closes
    or the peer misbehaves."""

    def __init__(self, sock: socket.socket,
                 on_message: Callable[[dict, list[int], bytes | None], None],
                 on_close: Callable[[], None], max_frame: int):
        sock.setblocking(False)
        self.sock = sock
        self.on_message = on_message
        self.on_close = on_close
        self.max_frame = max_frame
        self.fds: deque[int] = deque()
        self.out: deque[tuple[memoryview, list[int]]] = deque()
        self.buffered = 0
        self.closed = False
        self.decoder = AnnouncedDecoder(self._announced, max_frame)
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(sock.fileno(), self._readable)
        self._writing = False

    def send(self, message: dict, fds: list[int] = (), payload=None) -> None:
        """Queue one message; `fds` are duplicated by the kernel on send, so the caller keeps
        its own; `payload` (bytes-like) is sent as it is, after the line."""
        if self.closed:
            return
        if fds:
            message = {**message, "nfds": len(fds)}
        if payload is not None:
            message = {**message, "nbytes": len(payload)}
        data = memoryview(orjson.dumps(message, option=orjson.OPT_APPEND_NEWLINE))
        if not self.out and not fds and payload is None:
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
        self._queue(data, list(fds))
        if payload:
            self._queue(memoryview(payload).cast("B"), [])
        self._flush()

    def _queue(self, data: memoryview, fds: list[int]) -> None:
        self.out.append((data, fds))
        self.buffered += len(data)

    def _flush(self) -> None:
        while self.out:
            data, fds = self.out[0]
            try:
                if fds:
                    sent = self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                       array.array("i", fds).tobytes())])
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
        got = receive_fds(self.sock, READ_SIZE, MAX_FDS_PER_READ)
        if got is None:
            return
        data, fds, truncated = got
        self.fds.extend(fds)
        if truncated:
            log.error("fds passed over the hub link were lost (the fd limit?); closing it")
            self.close()
            return
        if not data:
            self.close()
            return
        try:
            self._feed(data)
        except (ChannelError, orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            log.error("the hub link peer sent %s; closing the link", _describe(exc))
            self.close()

    def _feed(self, data: bytes) -> None:
        """Deliver the messages `data` completes, in order, until one breaks the rules or
        a handler closes the channel; the fds of messages not delivered are closed."""
        items = self.decoder.feed(data)
        try:
            while items and not self.closed:
                item = items.pop(0)
                if item is OVERSIZED:
                    raise ChannelError("an oversized message")
                (msg, fds), payload = item
                if isinstance(msg, Exception):
                    raise msg
                self.on_message(msg, fds, payload if msg.get("nbytes") else None)
        finally:
            for item in items:
                if item is not OVERSIZED and not isinstance(item[0][0], Exception):
                    for fd in item[0][1]:
                        os.close(fd)

    def _announced(self, line: bytes):
        """A message line as the decoder reads it (so its fds are taken in order): the
        message and its fds, and the payload's size. A line that breaks the rules comes out as
        its error, in its place, so the messages before it are still delivered."""
        try:
            msg = orjson.loads(line)
            if type(msg) is not dict:
                raise ChannelError("a message that is not an object")
            n, size = msg.get("nfds", 0), msg.get("nbytes", 0)
            if type(n) is not int or n < 0 or n > len(self.fds):
                raise ChannelError("a message without the fds it announced")
            if type(size) is not int or size < 0 or size > self.max_frame:
                raise ChannelError("a message with a payload size out of bounds")
        except (ChannelError, orjson.JSONDecodeError) as exc:
            return (exc, []), 0
        return (msg, [self.fds.popleft() for _ in range(n)]), size

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.remove_reader(self.sock.fileno())
        if self._writing:
            self.loop.remove_writer(self.sock.fileno())
        self.sock.close()
        held = self.decoder.held()
        if held is not None:
            for fd in held[1]:
                os.close(fd)
        while self.fds:
            os.close(self.fds.popleft())
        self.out.clear()
        self.on_close()


def _describe(exc: Exception) -> str:
    if isinstance(exc, ChannelError):
        return str(exc)
    if isinstance(exc, orjson.JSONDecodeError):
        return "invalid JSON"
    return f"a malformed message ({type(exc).__name__}: {exc})"
