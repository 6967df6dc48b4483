"""The control socket: `cmuxd-remote status` asks the running supervisor how it is doing.

One JSON request line, one JSON reply line, on a 0600 Unix socket under the state
directory; only the daemon's own user (and root) can connect.
"""

from __future__ import annotations

import asyncio
import logging

import orjson

from ..local_sockets import trusted_peer
from .listeners import Listener, bind_unix

log = logging.getLogger("cmuxd.supervisor")


class ControlServer:
    def __init__(self, path, status):
        self.path = path
        self.status = status  # callable returning a JSON-ready dict
        self.listener: Listener | None = None
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.listener = bind_unix(str(self.path))
        self.server = await asyncio.start_unix_server(self._serve, sock=self.listener.sock)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if not trusted_peer(writer.get_extra_info("socket")):
                return
            line = await asyncio.wait_for(reader.readline(), 5)
            request = orjson.loads(line) if line.strip() else {}
            if request.get("method", "status") == "status":
                writer.write(orjson.dumps({"ok": True, "result": self.status()}) + b"\n")
            else:
                writer.write(b'{"ok":false,"error":"unknown control method"}\n')
            await writer.drain()
        except (OSError, TimeoutError, orjson.JSONDecodeError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.listener is not None:
            self.listener.close()
