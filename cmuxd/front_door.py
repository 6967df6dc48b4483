"""The worker's side of the front door: take the stdin and stdout a `serve --stdio` process
hands over (see cmuxd.front for the exchange), serve them, and tell it the exit status.

The front falls back to serving in-process until it reads that the fds were taken, so every
refusal here is sent before the first byte of its stdin is read.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

import orjson

from .connection import Connection, serve_pipes
from .front import MAX_HEADER, PROTOCOL, READY, TAKEN, forwarded
from .link_channel import receive_fds

log = logging.getLogger("cmuxd.worker")

HEADER_TIMEOUT = float(os.environ.get("CMUXD_FRONT_HEADER_TIMEOUT") or 10.0)
"""Seconds a front has to send its header once the worker is ready; tests shorten it with
$CMUXD_FRONT_HEADER_TIMEOUT rather than wait 10 s for a silent front."""


class HandoffError(Exception):
    """The front's handoff is malformed; the message is the refusal it gets."""


async def serve_front(sock: socket.socket, make_connection) -> Connection | None:
    """Serve one front door connection; `make_connection(env)` makes the Connection. The
    Connection served (finished by then), or None when the handoff was refused."""
    loop = asyncio.get_running_loop()
    fds: list[int | None] = []
    try:
        sock.send(READY)
        line = await asyncio.wait_for(_receive(sock, loop, fds), HEADER_TIMEOUT)
    except (OSError, TimeoutError):
        for fd in fds:  # what came before the header's end, or its deadline
            if fd is not None:
                os.close(fd)
        sock.close()
        return None
    try:
        env = parse_header(line, len(fds))
    except HandoffError as exc:
        for fd in fds:
            if fd is not None:
                os.close(fd)
        _refuse(sock, str(exc))
        return None
    try:
        sock.send(TAKEN)
    except OSError:
        for fd in fds:  # the front is gone before it knew: it serves in-process or is dead
            os.close(fd)
        sock.close()
        return None
    conn = make_connection(env)
    # The front process's end is the connection's: killed (or interrupted on a terminal),
    # it leaves no worker reading the terminal or pipe it was given.
    loop.add_reader(sock.fileno(), _front_gone, sock, conn)
    status = 1
    try:
        status = await serve_pipes(conn, fds[0], fds[1])
    except Exception:
        log.exception("serving a front door connection failed")
        conn.connection_lost(None)
    finally:
        loop.remove_reader(sock.fileno())
    try:
        sock.send(b'{"exit":%d}\n' % status)
    except OSError:
        pass
    sock.close()
    return conn


def _front_gone(sock: socket.socket, conn: Connection) -> None:
    try:
        if sock.recv(1):
            return  # the front says nothing after its header; a byte is no reason to stop
    except (BlockingIOError, InterruptedError):
        return
    except OSError:
        pass
    asyncio.get_running_loop().remove_reader(sock.fileno())
    conn.finish()


async def _receive(sock: socket.socket, loop, fds: list[int | None]) -> bytes:
    """The header line; the fds that came with it go to `fds` (a None among them: some did
    not fit)."""
    buf = bytearray()
    while b"\n" not in buf:
        ready = loop.create_future()
        loop.add_reader(sock.fileno(), ready.set_result, None)
        try:
            await ready
        finally:
            loop.remove_reader(sock.fileno())
        received = receive_fds(sock, MAX_HEADER, 2)
        if received is None:
            continue
        data, got, truncated = received
        fds.extend(got)
        if truncated:
            fds.append(None)
        if not data:
            break
        buf += data
        if len(buf) > MAX_HEADER:
            break
    return bytes(buf)


def parse_header(line: bytes, nfds: int) -> dict[str, str]:
    """The environment a valid header carries; HandoffError says what is wrong otherwise."""
    if len(line) > MAX_HEADER or not line.endswith(b"\n"):
        raise HandoffError(f"the handoff header must be one line of at most {MAX_HEADER} bytes")
    try:
        header = orjson.loads(line)
    except orjson.JSONDecodeError:
        raise HandoffError("the handoff header is not JSON; upgrade cmuxd-remote") from None
    if not isinstance(header, dict) or header.get("v") != PROTOCOL:
        raise HandoffError(f"this daemon speaks front door version {PROTOCOL}; run the same "
                           "cmuxd-remote as the daemon")
    if nfds != 2:
        raise HandoffError(f"a handoff carries stdin and stdout, 2 fds; "
                           f"{'more' if nfds > 2 else nfds} came")
    env = header.get("env")
    if not isinstance(env, dict):
        raise HandoffError("the handoff's env must be an object of strings")
    for name, value in env.items():
        if not forwarded(name):
            raise HandoffError(f"the front door passes only the SSH connection's and locale "
                               f"variables to sessions; {name[:64]!r} is not one of them")
        if not isinstance(value, str) or "\0" in value:
            raise HandoffError(f"the handoff's {name} must be a string without NUL")
    return env


def _refuse(sock: socket.socket, message: str) -> None:
    log.warning("refused a front door handoff: %s", message)
    try:
        sock.send(orjson.dumps({"ok": False, "error": {"code": "invalid_request",
                                                       "message": message}}) + b"\n")
    except OSError:
        pass
    sock.close()
