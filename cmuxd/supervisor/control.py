"""The control socket: local commands (`status`, `token rotate`, `device revoke`) reach the
running supervisor here.

One JSON request line, one JSON reply line, on a 0600 Unix socket under the state
directory; only the daemon's own user (and root) is answered, checked by the peer's uid, so
a request may carry a secret (a new token) that must never travel in argv.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import orjson

from ..local_sockets import trusted_peer
from .listeners import Listener, bind_unix

log = logging.getLogger("cmuxd.supervisor")

MAX_REQUEST = 65536


class ControlError(Exception):
    """A control request that cannot be done; the message is a sentence for the caller."""


class ControlServer:
    def __init__(self, path, methods: dict[str, Callable[[dict], dict]]):
        self.path = path
        self.methods = methods  # name -> callable(request) returning a JSON-ready dict
        self.listener: Listener | None = None
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.listener = bind_unix(str(self.path), "the control socket")
        self.server = await asyncio.start_unix_server(self._serve, sock=self.listener.sock,
                                                      limit=MAX_REQUEST)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if not trusted_peer(writer.get_extra_info("socket")):
                return
            line = await asyncio.wait_for(reader.readline(), 5)
            request = orjson.loads(line) if line.strip() else {}
            method = self.methods.get(request.get("method", "status")) \
                if type(request) is dict else None
            if method is None:
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
            writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.listener is not None:
            self.listener.close()
