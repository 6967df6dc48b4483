"""The control socket: local commands (`status`, `token rotate`, `device revoke`) reach the
running supervisor here.

One JSON request line, one JSON reply line, on a 0600 Unix socket under the state
directory; only the daemon's own user (and root) is answered, checked by the peer's uid, so
a request may carry a secret (a new token) that must never travel in argv.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

import orjson

from ..local_sockets import trusted_peer
from ..protocol import OVERSIZED, FrameDecoder
from .listeners import Listener, bind_unix

log = logging.getLogger("cmuxd.supervisor")

MAX_REQUEST = 65536
ACCEPTED_SETTLE = 0.02
"""Seconds for connections accepted before a pause to reach their handler."""


class ControlError(Exception):
    """A control request that cannot be done; the message is a sentence for the caller."""


class ControlServer:
    def __init__(self, path, methods: dict[str, Callable[[dict], dict]]):
        self.path = path
        self.methods = methods  # name -> callable(request) returning a JSON-ready dict
        self.listener: Listener | None = None
        self.server: asyncio.AbstractServer | None = None
        self.serving = 0  # requests being answered now

    async def start(self, listener: Listener | None = None) -> None:
        """Serve on a new socket, or on `listener` (the one a previous image of this process
        handed over across exec)."""
        self.listener = listener or bind_unix(str(self.path), "the control socket")
        self.server = await asyncio.start_unix_server(self._serve, sock=self.listener.sock,
                                                      limit=MAX_REQUEST)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.serving += 1
        try:
            if not trusted_peer(writer.get_extra_info("socket")):
                return
            line = await asyncio.wait_for(_request_line(reader), 5)
            request = {} if line is OVERSIZED or not line.strip() else orjson.loads(line)
            method = self.methods.get(request.get("method", "status")) \
                if type(request) is dict else None
            if line is OVERSIZED:
                reply = {"ok": False, "error": f"a control request is one line of at most "
                                               f"{MAX_REQUEST} bytes"}
            elif method is None:
                reply = {"ok": False, "error": "unknown control method; the daemon may be "
                                               "older than this command: restart it"}
            else:
                try:
                    reply = {"ok": True, "result": method(request)}
                except ControlError as exc:
                    reply = {"ok": False, "error": str(exc)}
            writer.write(orjson.dumps(reply) + b"\n")
            await writer.drain()
        except (OSError, TimeoutError, ValueError, orjson.JSONDecodeError):
            pass
        finally:
            self.serving -= 1
            writer.close()

    async def pause(self) -> int:
        """Stop taking requests but keep the socket bound: a duplicate of its fd, for the
        next image of this process (or for start() again). Requests being answered finish,
        and so do those accepted just before: such a connection counts in `serving` only
        once its handler runs, a few loop passes after the accept, so they are let run."""
        fd = os.dup(self.listener.sock.fileno())
        self.server.close()
        self.server = None
        await asyncio.sleep(ACCEPTED_SETTLE)
        return fd

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.listener is not None:
            self.listener.close()


async def _request_line(reader: asyncio.StreamReader):
    """The request's line (without its LF), or OVERSIZED."""
    decoder = FrameDecoder(MAX_REQUEST)
    while True:
        data = await reader.read(MAX_REQUEST)
        lines = decoder.feed(data) if data else decoder.eof()
        if lines or not data:
            return lines[0] if lines else b""
