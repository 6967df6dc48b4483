"""The connection loop: bytes in, frames decoded, handlers run, frames out.

One loop serves stdio and every socket a worker is handed. Requests run one at a time in
arrival order; handlers that finish at once are answered in the same batch, and every frame
produced from one read goes out in one write. While a handler awaits, or while the peer is
not reading what we write, the connection stops reading, so neither side can make the other
buffer without bound.
"""

from __future__ import annotations

import asyncio
import binascii
import logging
import os
import re
import socket
import sys
import time
from collections import deque
from typing import Any

from .handlers import METHODS
from .protocol import (
    INVALID_REQUEST,
    LARGE_FRAME,
    METHOD_NOT_FOUND,
    MSG_METHOD_REQUIRED,
    NO_RESPONSE,
    OVERSIZED,
    OVERSIZED_RESPONSE,
    UNAVAILABLE,
    FrameDecoder,
    Request,
    RPCError,
    drop_empty_frames,
    encode,
    error_response,
    ok_response,
    parse_large_request,
    parse_request,
    repeat_shape,
    unknown_method_message,
)

log = logging.getLogger("cmuxd.connection")

class ConnectionContext:
    """All a handler knows of its connection: its kind, its state, how to push events."""

    __slots__ = ("_conn", "transport", "hub", "daemon", "_state", "caller", "device", "env")

    def __init__(self, conn: "Connection", transport: str, hub: Any, daemon: Any = None,
                 caller: str | None = None, device: str | None = None,
                 env: dict[str, str] | None = None):
        self._conn = conn
        self.transport = transport
        self.hub = hub
        self.daemon = daemon  # handlers.system.DaemonFigures in a worker; None under stdio
        self.caller = caller  # "device NAME", "shared token" or "uid N"; None under stdio
        self.device = device  # the device key that authenticated it, if one did
        self.env = env
        """The SSH connection's variables for the sessions it starts (front door only)."""
        self._state: dict[type, Any] = {}

    def state(self, cls):
        """The connection's instance of `cls(ctx)`, made on first use, closed with it."""
        obj = self._state.get(cls)
        if obj is None:
            obj = self._state[cls] = cls(self)
        return obj

    def send_event(self, message: dict) -> None:
        self._conn.send(encode(message))

    def send_frame(self, frame: bytes) -> None:
        """An event already encoded, LF included."""
        self._conn.send(frame)

    def writable(self):
        """Awaitable that completes once the peer is reading what we write."""
        return self._conn.writable()

    def can_write(self) -> bool:
        """Whether a write now would go out rather than pile up."""
        conn = self._conn
        return not conn.write_paused and not conn.closing

    def spawn(self, coro) -> asyncio.Task:
        """Run a task that lives no longer than the connection."""
        return self._conn.spawn(coro)

    def repeatable(self, req: Request, text_key: str, count_key: str | None, run) -> None:
        """Called from the handler of a notification `req` that it has validated: a frame
        like it but for `params[text_key]` (base64) and `params[count_key]` (an integer, if
        named) may go straight to `run(decoded bytes, count or None)`, which does what the
        handler would, unparsed (see Connection.express)."""
        self._conn.offer_express(req, text_key, count_key, run)

    def unblock(self) -> None:
        """Called from inside an awaiting handler: let the connection read the next request
        while this one goes on; its reply is written whenever it completes."""
        self._conn.unblock()

    @property
    def closing(self) -> bool:
        return self._conn.closing


class Connection(asyncio.BufferedProtocol):
    """One RPC connection. `reader` and `writer` are the same socket transport except under
    stdio, where they are the stdin and stdout pipes (which call `data_received`)."""

    def __init__(self, transport: str, hub: Any = None, initial: bytes = b"",
                 daemon: Any = None, caller: str | None = None, device: str | None = None,
                 env: dict[str, str] | None = None):
        self.ctx = ConnectionContext(self, transport, hub, daemon, caller, device, env)
        self.decoder = FrameDecoder()
        self.pending: deque = deque()
        self.reader = None
        self.writer = None
        self.out = bytearray()
        """Frames of the current batch. Appended to as they are made rather than joined at
        the end: thousands of small reply objects alive at once fragment the C heap, and
        every reply then costs a fresh page (a page fault) instead of reusing the last."""
        self.batching = False
        self.busy = False
        self.input_eof = False
        self.closing = False
        self.write_paused = False
        self.paused_replies = 0
        """Reply bytes written since the peer stopped keeping up (see REPLY_ALLOWANCE)."""
        self.reading_paused = False
        self.junk = 0
        """Empty or invalid frames met in the current pass."""
        self.junk_debt = 0.0
        self.junk_at = 0.0
        self.throttled: asyncio.TimerHandle | None = None
        """Set while the connection rests to pay for the junk it sent (see JUNK_SHARE)."""
        self.tasks: set[asyncio.Task] = set()
        self.express: _Express | None = None
        """The shape of the last repeatable notification (a keystroke's pty.write): a read
        that is one frame of that shape is handled without decoding or parsing it."""
        self._frame: bytes | None = None
        """The frame being dispatched, for `offer_express`."""
        self._writable: asyncio.Future | None = None
        self._blocking: asyncio.Task | None = None
        self._initial = initial
        self.done = asyncio.get_event_loop().create_future()
        """Resolves to None, or to the I/O error that ended the connection."""

    # asyncio.Protocol

    def connection_made(self, transport) -> None:
        self.reader = transport
        if self.writer is None:
            self.writer = transport
        if self._initial:
            initial, self._initial = self._initial, b""
            self.data_received(initial)

    def get_buffer(self, sizehint: int) -> bytearray:
        return _READ_BUFFER

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(_READ_VIEW[:nbytes]))

    def data_received(self, data: bytes) -> None:
        express = self.express
        if (express is not None and not self.pending and not self.busy and self.throttled is None
                and not self.decoder.buffered and not self.closing and express.take(data)):
            return
        size = len(data)
        started = time.monotonic()
        data = drop_empty_frames(data)
        frames = self.decoder.feed(data)
        if len(data) < size:
            self._charge(started, (size - len(data)) / size)
        if frames:
            self.pending.extend(frames)
            del frames  # the queue holds them now; a frame's handler may release it
            if not self.busy:
                self._run()

    def eof_received(self) -> bool:
        self.pending.extend(self.decoder.eof())
        self.input_eof = True
        if not self.busy:
            self._run()
        return True

    def connection_lost(self, exc) -> None:
        self.input_eof = True
        self.pending.clear()
        self._close(exc)
        if not self.done.done():
            self.done.set_result(exc)

    def pause_writing(self) -> None:
        self.write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.paused_replies = 0
        if self._writable is not None:
            if not self._writable.done():
                self._writable.set_result(None)
            self._writable = None
        if not self.busy and not self.closing:
            self._run()

    # the loop

    def _run(self) -> None:
        pending = self.pending
        dispatch = self.dispatch
        self.batching = True
        handled = 0
        self.junk = 0
        started = time.monotonic()
        deadline = started + PASS_BUDGET
        try:
            while pending and self.throttled is None and not self._replies_held():
                handled += 1
                if not handled % 32 and time.monotonic() > deadline:
                    # Let the other connections of this worker have the loop; reading
                    # pauses until the rest of this read is handled.
                    self.busy = True
                    asyncio.get_running_loop().call_soon(self._next_pass)
                    break
                reply = dispatch(pending.popleft())
                if reply is None:
                    continue
                if type(reply) is bytes:
                    self.out += reply
                    if self.write_paused:
                        self.paused_replies += len(reply)
                    continue
                self.busy = True
                self._blocking = self.spawn(self._complete(reply))
                break
        finally:
            self.batching = False
            self._flush()
        if self.junk:
            self._charge(started, self.junk / handled)
        if self.input_eof and not pending and not self.busy:
            self._close(None)
        else:
            self._update_reading()

    def dispatch(self, frame) -> bytes | None | Any:
        """Answer one frame: encoded reply bytes, None for no reply, or a coroutine."""
        if frame is OVERSIZED:
            self.junk += 1
            return OVERSIZED_RESPONSE
        if len(frame) <= LARGE_FRAME:
            req = parse_request(frame)
            self._frame = frame
        else:
            req = parse_large_request(frame)
        del frame  # a large request is held once, as parsed, while its handler runs
        if type(req) is not Request:
            self.junk += 1
            return req
        rid = req.id
        if not req.method:
            return error_response(rid, INVALID_REQUEST, MSG_METHOD_REQUIRED)
        handler = METHODS.get(req.method)
        if handler is None:
            return error_response(rid, METHOD_NOT_FOUND, unknown_method_message(req.method))
        try:
            result = handler(self.ctx, req)
        except RPCError as exc:
            return error_response(rid, exc.code, exc.message)
        except Exception:
            log.exception("handler for %s failed", req.method)
            return error_response(rid, UNAVAILABLE, INTERNAL_ERROR)
        finally:
            self._frame = None
        if type(result) is dict:
            return ok_response(rid, result)
        if result is NO_RESPONSE:
            return None
        return self._await_reply(req, result)

    def offer_express(self, req: Request, text_key: str, count_key: str | None, run) -> None:
        frame = self._frame
        if frame is None:
            return
        express = self.express
        if express is not None and express.fits(frame):
            return  # the same notification again (a read of several keystrokes)
        pattern = repeat_shape(bytes(frame), req, text_key, count_key)
        if pattern is not None:
            self.express = _Express(pattern, count_key is not None, run)

    async def _await_reply(self, req: Request, awaitable) -> bytes | None:
        try:
            result = await awaitable
        except RPCError as exc:
            return error_response(req.id, exc.code, exc.message)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("handler for %s failed", req.method)
            return error_response(req.id, UNAVAILABLE, INTERNAL_ERROR)
        if result is NO_RESPONSE:
            return None
        return ok_response(req.id, result)

    async def _complete(self, reply_coro) -> None:
        reply = await reply_coro
        if reply is not None:
            self.send(reply)
            if self.write_paused:
                self.paused_replies += len(reply)
        if self._blocking is asyncio.current_task():
            self._blocking = None
            self.busy = False
            if not self.closing:
                self._run()

    def unblock(self) -> None:
        task = asyncio.current_task()
        if task is None or task is not self._blocking:
            return
        self._blocking = None
        self.busy = False
        asyncio.get_running_loop().call_soon(self._resume)

    def _charge(self, started: float, share: float) -> None:
        """Count the time since `started`, `share` of which went on junk, against the
        connection; once it owes more than JUNK_GRACE of rest, stop reading and handling its
        frames for that long. A client streaming junk then takes at most about JUNK_SHARE of
        the worker (and, blocked in its writes, no more of the machine's CPU either), and the
        worker's other connections keep their latency. The bytes still get their replies."""
        now = time.monotonic()
        debt = self.junk_debt - (now - self.junk_at)
        debt = (debt if debt > 0 else 0.0) + (now - started) * share * (1 / JUNK_SHARE - 1)
        self.junk_debt, self.junk_at = debt, now
        if debt > JUNK_GRACE and self.throttled is None and not self.closing:
            self.throttled = asyncio.get_running_loop().call_later(debt, self._rested)
            self._update_reading()

    def _rested(self) -> None:
        self.throttled = None
        self.junk_debt, self.junk_at = 0.0, time.monotonic()
        if self.closing:
            return
        if self.busy:
            self._update_reading()
        else:
            self._run()

    def _next_pass(self) -> None:
        self.busy = False
        self._resume()

    def _resume(self) -> None:
        if not self.busy and not self.closing:
            self._run()

    # output

    def send(self, frame: bytes) -> None:
        if self.batching:
            self.out += frame
        elif not self.closing and self.writer is not None:
            self.writer.write(frame)

    def _flush(self) -> None:
        if self.out:
            # A new buffer each time: the transport may keep a view of the one it was given.
            out, self.out = self.out, bytearray()
            if not self.closing:
                self.writer.write(out)

    def writable(self):
        if not self.write_paused or self.closing:
            fut = asyncio.get_running_loop().create_future()
            fut.set_result(None)
            return fut
        if self._writable is None:
            self._writable = asyncio.get_running_loop().create_future()
        return self._writable

    def _replies_held(self) -> bool:
        """Requests wait while the peer leaves our replies unread. Events alone (a busy
        terminal, a proxied download) do not hold them: their producers wait for the
        peer on their own, bounded queues, and a request such as a Ctrl-C must get
        through while the output that prompted it is still flowing."""
        return self.write_paused and self.paused_replies >= REPLY_ALLOWANCE

    def _update_reading(self) -> None:
        want_paused = self.busy or self.throttled is not None or self._replies_held()
        if want_paused == self.reading_paused or self.reader is None or self.input_eof:
            return
        self.reading_paused = want_paused
        if want_paused:
            self.reader.pause_reading()
        else:
            self.reader.resume_reading()

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("connection task failed", exc_info=task.exception())

    def abort(self) -> None:
        """Drop the connection now, unanswered requests and unsent replies with it."""
        if self.reader is not None:
            self.reader.abort()

    def finish(self) -> None:
        """Close at a frame boundary: answer every request already read, read no more."""
        if self.closing:
            return
        if self.reader is not None and not self.reading_paused:
            self.reading_paused = True
            self.reader.pause_reading()
        self.input_eof = True
        if not self.busy:
            self._run()

    def _close(self, exc) -> None:
        """Release per-connection state, then close once the last frame is written."""
        if self.closing:
            return
        self._flush()
        self.closing = True
        if self.throttled is not None:
            self.throttled.cancel()
            self.throttled = None
        for task in list(self.tasks):
            task.cancel()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        for obj in self.ctx._state.values():
            try:
                obj.close()
            except Exception:
                log.exception("closing connection state failed")
        if self.writer is not None:
            self.writer.close()
        if self.reader is not None and self.reader is not self.writer:
            self.reader.close()


class _Express:
    """One frame shape that goes straight to its handler's `run`: a pattern of the frame's
    bytes around a base64 value and maybe a count (see protocol.repeat_shape). A read of
    exactly one frame of that shape, whose text decodes, is that notification with new
    values; anything else (several frames, part of one, another request, text that is not
    strict base64) takes the usual path, so order and every answer stay as they were. On
    the keystroke path this saves the frame split, the JSON parse, the parameter checks and
    the dispatch."""

    __slots__ = ("pattern", "counted", "run")

    def __init__(self, pattern: re.Pattern, counted: bool, run):
        self.pattern = pattern
        self.counted = counted
        self.run = run

    def fits(self, frame: bytes) -> bool:
        return self.pattern.fullmatch(frame) is not None

    def take(self, data: bytes) -> bool:
        if data[-1:] != b"\n":
            return False
        match = self.pattern.fullmatch(data, 0, len(data) - 1)
        if match is None:
            return False
        try:
            payload = binascii.a2b_base64(match.group("text"), strict_mode=True)
        except ValueError:
            return False
        self.run(payload, int(match.group("count")) if self.counted else None)
        return True


INTERNAL_ERROR = "internal error in the daemon; see its log"

PASS_BUDGET = 0.001
"""Seconds one connection may spend on the frames it has read before the worker's other
connections get the event loop (checked every 32 frames)."""

READ_SIZE = 256 * 1024
"""Bytes a socket read may return: asyncio's own read size."""

_READ_BUFFER = bytearray(READ_SIZE)
_READ_VIEW = memoryview(_READ_BUFFER)
"""Every socket connection of the process reads into this one buffer, and takes a copy of
what it read at once: a read of its own would allocate READ_SIZE each time, a mapping and a
page fault for every keystroke."""

JUNK_SHARE = 0.25
"""Largest share of a worker's time that one connection's empty and invalid frames get."""

JUNK_GRACE = 0.002
"""Seconds of rest a connection may owe for junk before it has to take them: a stray blank
line or bad request costs a well-behaved client nothing."""

REPLY_ALLOWANCE = 64 * 1024
"""Reply bytes a connection may add past the write buffer's high-water mark before it stops
reading requests."""

PIPE_READ_SIZE = 64 * 1024
"""Bytes a stdin read may return. asyncio's pipe transport reads up to 256 KiB into a new
object each time, which under a worker's fixed mmap threshold (memory.py) is a mapping, a
page fault and an unmapping per read: 19 µs against 1.4 µs for a keystroke that arrives
over ssh and the front door."""

STDOUT_HIGH_WATER = 256 * 1024
"""Bytes buffered for a stdout pipe before the connection stops reading (back-pressure)."""


class _StdoutSide(asyncio.Protocol):
    """Forwards the stdout pipe's flow control and closing to the connection."""

    def __init__(self, conn: Connection):
        self.conn = conn

    def connection_made(self, transport) -> None:
        if transport.get_extra_info("socket") is not None:
            # A socket stdout is only written: its bytes belong to stdin.
            transport.pause_reading()

    def pause_writing(self) -> None:
        self.conn.pause_writing()

    def resume_writing(self) -> None:
        self.conn.resume_writing()

    def connection_lost(self, exc) -> None:
        if exc is None and not self.conn.closing:
            # The reader of stdout went away before we closed it: nothing can be answered
            # any more, which is a fatal I/O error, not a clean end.
            exc = BrokenPipeError("stdout was closed by its reader")
        self.conn.connection_lost(exc)


class _StdinSide(asyncio.Protocol):
    """Forwards stdin to the connection; the end of stdin is EOF, not a lost connection."""

    def __init__(self, conn: Connection):
        self.conn = conn

    def connection_made(self, transport) -> None:
        self.conn.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.conn.data_received(data)

    def eof_received(self) -> bool:
        return self.conn.eof_received()

    def connection_lost(self, exc) -> None:
        if exc is not None:
            self.conn.connection_lost(exc)
        elif not self.conn.input_eof:
            self.conn.eof_received()


class _FileWriter:
    """Blocking writes for a stdout that is a regular file, which asyncio cannot watch."""

    def __init__(self, fd: int, conn: Connection):
        self.fd = fd
        self.conn = conn
        self.closed = False

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)
            asyncio.get_running_loop().call_soon(self.conn.connection_lost, None)


async def _feed_from_file(fd: int, conn: Connection) -> None:
    """Read a regular-file stdin in a thread; a file never blocks long, but asyncio refuses it."""
    loop = asyncio.get_running_loop()
    while not conn.closing:
        if conn.busy or conn.write_paused or conn.throttled is not None:
            await asyncio.sleep(0.001)
            continue
        data = await loop.run_in_executor(None, os.read, fd, 262144)
        if not data:
            conn.eof_received()
            return
        conn.data_received(data)


class _PausableFile:
    """Stands in for a read transport when stdin is a regular file."""

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass


async def serve_stdio(hub: Any = None) -> int:
    """Serve one connection on stdin/stdout; the exit status the process should have."""
    return await serve_pipes(Connection("stdio", hub), os.dup(sys.stdin.fileno()),
                             os.dup(sys.stdout.fileno()))


async def serve_pipes(conn: Connection, in_fd: int, out_fd: int) -> int:
    """Serve `conn` reading `in_fd` and writing `out_fd` (ours to close): a pipe, a socket,
    a terminal, a file or /dev/null each. 0 after the input's end, 1 after an I/O error."""
    loop = asyncio.get_running_loop()
    if _is_regular(out_fd):
        conn.writer = _FileWriter(out_fd, conn)
    elif _is_stream_socket(out_fd):
        # inetd style (systemd Accept=yes, a socketpair): a pipe transport would take any byte
        # arriving on the socket for the reader having gone, so write through a socket
        # transport that never reads.
        conn.writer, _ = await loop.connect_accepted_socket(
            lambda: _StdoutSide(conn), sock=socket.socket(fileno=out_fd)
        )
    else:
        conn.writer, _ = await loop.connect_write_pipe(
            lambda: _StdoutSide(conn), os.fdopen(out_fd, "wb", buffering=0)
        )
        # A 64 KiB pipe fills with every batch of pipelined replies; with asyncio's default
        # 64 KiB high-water mark that paused reading after nearly every read. Still bounded.
        conn.writer.set_write_buffer_limits(high=STDOUT_HIGH_WATER)
    if _is_regular(in_fd):
        conn.connection_made(_PausableFile())
        feeder = loop.create_task(_feed_from_file(in_fd, conn))
    else:
        feeder = None
        stdin, _ = await loop.connect_read_pipe(
            lambda: _StdinSide(conn), os.fdopen(in_fd, "rb", buffering=0)
        )
        stdin.max_size = PIPE_READ_SIZE
    exc = await conn.done
    if feeder is not None:
        feeder.cancel()
    if exc is not None:
        log.error("connection over stdin and stdout failed: %s", exc)
        return 1
    return 0


def _is_regular(fd: int) -> bool:
    """A regular file or /dev/null: always ready, and no event loop can watch either."""
    import stat

    st = os.fstat(fd)
    return stat.S_ISREG(st.st_mode) or os.path.samestat(st, os.stat(os.devnull))


def _is_stream_socket(fd: int) -> bool:
    import stat

    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        return False
    sock = socket.socket(fileno=os.dup(fd))
    try:
        return sock.type == socket.SOCK_STREAM
    finally:
        sock.close()
