"""proxy.*: TCP tunnels for the client's SOCKS5 and HTTP CONNECT brokers.

Each stream is an asyncio protocol with a bounded receive buffer: when the buffer is full
the proxied socket stops being read, and the pump that pushes events waits while the client
connection is not writable. A slow client therefore slows the far end instead of growing
memory.
"""

from __future__ import annotations

import asyncio
import os
import socket

from ..protocol import (
    INVALID_PARAMS,
    NOT_FOUND,
    OPEN_FAILED,
    STREAM_ERROR,
    RPCError,
    b64,
    event,
    param_int,
    param_str,
    request_base64,
)

EVENT_CHUNK = 32768
READ_MAX = 262144
BUFFER_HIGH = 256 * 1024
"""Bytes buffered from the far end before its socket stops being read."""


class ProxyStream(asyncio.Protocol):
    def __init__(self, stream_id: str):
        self.stream_id = stream_id
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.eof = False
        self.error: Exception | None = None
        self.subscribed = False
        self.pump: asyncio.Task | None = None
        self._reading_paused = False
        self._data_waiter: asyncio.Future | None = None
        self._write_paused = False
        self._drain_waiter: asyncio.Future | None = None

    # asyncio.Protocol

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) >= BUFFER_HIGH and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False

    def connection_lost(self, exc) -> None:
        if exc is not None and not self.eof:
            self.error = exc
        self.eof = True
        self._wake()
        self._write_paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    # used by the handlers

    def _wake(self) -> None:
        if self._data_waiter is not None and not self._data_waiter.done():
            self._data_waiter.set_result(None)

    async def wait_readable(self) -> None:
        """Return once there is data, EOF or an error to report."""
        if self.buffer or self.eof:
            return
        self._data_waiter = asyncio.get_running_loop().create_future()
        try:
            await self._data_waiter
        finally:
            self._data_waiter = None

    def take(self, limit: int) -> bytes:
        data = bytes(self.buffer[:limit])
        del self.buffer[:limit]
        if self._reading_paused and len(self.buffer) < BUFFER_HIGH // 2:
            self._reading_paused = False
            if not self.transport.is_closing():
                self.transport.resume_reading()
        return data

    async def write(self, data: bytes) -> None:
        # The bytes of an earlier write that timed out may still be queued: wait for them
        # first, so that writes that time out cannot pile up in memory.
        await self._drain()
        if self.transport.is_closing():
            raise OSError(self.error or "stream is closed")
        self.transport.write(data)
        await self._drain()

    async def _drain(self) -> None:
        if self._write_paused:
            self._drain_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None
            if self.transport.is_closing() and self.error is not None:
                raise self.error

    def close(self) -> None:
        if self.pump is not None:
            self.pump.cancel()
        if self.transport is not None:
            self.transport.close()


class ProxyStreams:
    """The proxy streams of one connection: ids s-1, s-2, … never reused."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.counter = 0
        self.by_id: dict[str, ProxyStream] = {}

    def get(self, stream_id: str) -> ProxyStream:
        stream = self.by_id.get(stream_id)
        if stream is None:
            raise RPCError(NOT_FOUND, "stream not found")
        return stream

    def remove(self, stream: ProxyStream) -> None:
        if self.by_id.get(stream.stream_id) is stream:
            del self.by_id[stream.stream_id]
        stream.close()

    def close(self) -> None:
        for stream in list(self.by_id.values()):
            self.remove(stream)

    async def pump(self, stream: ProxyStream) -> None:
        """Push a subscribed stream's bytes as events until EOF or error."""
        ctx = self.ctx
        sid = stream.stream_id
        while True:
            await stream.wait_readable()
            while stream.buffer:
                await ctx.writable()
                ctx.send_event(
                    {"event": "proxy.stream.data", "stream_id": sid,
                     "data_base64": b64(stream.take(EVENT_CHUNK))}
                )
            if stream.eof:
                break
        if stream.error is not None:
            ctx.send_event(event("proxy.stream.error", stream_id=sid, error=_text(stream.error)))
        else:
            ctx.send_event(event("proxy.stream.eof", stream_id=sid))
        stream.pump = None
        self.remove(stream)


def _text(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        if exc.errno and exc.errno > 0:
            return os.strerror(exc.errno).lower()
        if exc.strerror:
            return exc.strerror
    return str(exc) or type(exc).__name__


def _timeout(params: dict, default_ms: int) -> int:
    value = param_int(params, "timeout_ms")
    return default_ms if value is None or value < 0 else value


async def proxy_open_async(ctx, host: str, port: int, timeout_ms: int) -> dict:
    streams = ctx.state(ProxyStreams)
    loop = asyncio.get_running_loop()
    pending_id = f"s-{streams.counter + 1}"
    try:
        dial = loop.create_connection(lambda: ProxyStream(pending_id), host, port)
        if timeout_ms > 0:
            _, stream = await asyncio.wait_for(dial, timeout_ms / 1000)
        else:
            _, stream = await dial
    except TimeoutError:
        raise RPCError(OPEN_FAILED, f"dial tcp {host}:{port}: i/o timeout") from None
    except (OSError, ValueError, UnicodeError) as exc:
        raise RPCError(OPEN_FAILED, f"dial tcp {host}:{port}: {_text(exc)}") from None
    streams.counter += 1
    streams.by_id[pending_id] = stream
    return {"stream_id": pending_id}


def proxy_open(ctx, req):
    params = req.params
    host = param_str(params, "host")
    if host is None:
        raise RPCError(INVALID_PARAMS, "proxy.open requires host")
    port = param_int(params, "port")
    if port is None or not 1 <= port <= 65535:
        raise RPCError(INVALID_PARAMS, "proxy.open requires port in range 1-65535")
    return proxy_open_async(ctx, host, port, _timeout(params, 10000))


async def _write(stream: ProxyStream, data: bytes, timeout_ms: int) -> dict:
    try:
        if timeout_ms > 0:
            await asyncio.wait_for(stream.write(data), timeout_ms / 1000)
        else:
            await stream.write(data)
    except TimeoutError:
        raise RPCError(STREAM_ERROR, "write timed out") from None
    except OSError as exc:
        raise RPCError(STREAM_ERROR, _text(exc)) from None
    return {"written": len(data)}


def proxy_write(ctx, req):
    params = req.params
    stream_id = param_str(params, "stream_id")
    if stream_id is None:
        raise RPCError(INVALID_PARAMS, "proxy.write requires stream_id")
    data = request_base64(req, "proxy.write requires data_base64")
    stream = ctx.state(ProxyStreams).get(stream_id)
    if not data:
        return {"written": 0}
    param = param_int(params, "timeout_ms")
    return _write(stream, data, 8000 if param is None else param)


def proxy_close(ctx, req) -> dict:
    stream_id = param_str(req.params, "stream_id")
    if stream_id is None:
        raise RPCError(INVALID_PARAMS, "proxy.close requires stream_id")
    streams = ctx.state(ProxyStreams)
    stream = streams.by_id.get(stream_id)
    if stream is not None:
        streams.remove(stream)
    return {"closed": True}


def proxy_subscribe(ctx, req) -> dict:
    stream_id = param_str(req.params, "stream_id")
    if stream_id is None:
        raise RPCError(INVALID_PARAMS, "proxy.stream.subscribe requires stream_id")
    streams = ctx.state(ProxyStreams)
    stream = streams.get(stream_id)
    if stream.subscribed:
        return {"subscribed": True, "already_subscribed": True}
    stream.subscribed = True
    stream.pump = ctx.spawn(streams.pump(stream))
    return {"subscribed": True, "already_subscribed": False}


async def _read(streams: ProxyStreams, stream: ProxyStream, max_bytes: int, timeout_ms: int):
    if not (stream.buffer or stream.eof) and timeout_ms > 0:
        try:
            await asyncio.wait_for(stream.wait_readable(), timeout_ms / 1000)
        except TimeoutError:
            pass
    if stream.buffer:
        return {"data_base64": b64(stream.take(max_bytes)), "eof": False}
    if stream.eof:
        streams.remove(stream)
        if stream.error is not None:
            raise RPCError(STREAM_ERROR, _text(stream.error))
        return {"data_base64": "", "eof": True}
    return {"data_base64": "", "eof": False}


def proxy_read(ctx, req):
    params = req.params
    stream_id = param_str(params, "stream_id")
    if stream_id is None:
        raise RPCError(INVALID_PARAMS, "proxy.read requires stream_id")
    max_bytes = param_int(params, "max_bytes")
    if max_bytes is None:
        max_bytes = EVENT_CHUNK
    if not 1 <= max_bytes <= READ_MAX:
        raise RPCError(INVALID_PARAMS, "max_bytes must be in range 1-262144")
    streams = ctx.state(ProxyStreams)
    stream = streams.get(stream_id)
    if stream.subscribed:
        raise RPCError(INVALID_PARAMS, "stream is subscribed")
    return _read(streams, stream, max_bytes, _timeout(params, 50))


METHODS = {
    "proxy.open": proxy_open,
    "proxy.write": proxy_write,
    "proxy.close": proxy_close,
    "proxy.stream.subscribe": proxy_subscribe,
    "proxy.read": proxy_read,
}
