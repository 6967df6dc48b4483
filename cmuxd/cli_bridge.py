"""The CLI bridge (spec §6.7): how a `cmux` CLI run inside a PTY session reaches the app
over the daemon connection instead of an `ssh -R` forward.

Each session gets its own Unix socket (0600, in a 0700 directory, peer uid checked), named
in the session's `CMUX_SOCKET_PATH`: the path travels with the environment, so the routing
survives setsid, tmux, nohup and pid reuse. A CLI sends one request line; it is offered as a
`cli.request` event to one subscribed connection at a time, most recently attached first,
and the first answer that is not a routing refusal is the CLI's reply.

Lives in whatever owns the sessions (the hub process, or an in-process Hub under stdio) and
knows sessions only through `candidates(session_id)`: the hub peers to offer to, in order.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import select
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

import orjson

from .peercred import peer_uid
from .protocol import MAX_FRAME, NOT_FOUND, OVERSIZED, FrameDecoder, RPCError, b64

log = logging.getLogger("cmuxd.cli_bridge")

CAPABILITY = "cli.bridge"
REPLY_TIMEOUT = float(os.environ.get("CMUXD_CLI_REPLY_TIMEOUT") or 15.0)
"""How long a CLI waits for the app, as upstream's CLI does; $CMUXD_CLI_REPLY_TIMEOUT changes
it, so the tests need not wait 15 s to see the timeout."""
MAX_PENDING = 16
"""Requests one session may have waiting for the app; more are refused at once."""
READ_CHUNK = 65536
HANGUP_POLL = 0.25
ROUTING_REFUSALS = ("remote_cli_workspace_denied", "remote_cli_unscoped")
"""An app answering with these is not the right one: the next candidate is asked."""

MSG_NOT_FOUND = "cloud CLI request not found"
MSG_BRIDGE_OFF = "cloud CLI bridge is not enabled"
MSG_NO_APP = ("no cmux app is attached to this session; attach to it from the cmux app (a "
              "client that subscribed with ext.cli.subscribe) and run the command again")
MSG_TIMEOUT = "timed out waiting for cmux app response"
MSG_BUSY = (f"{MAX_PENDING} cmux CLI requests of this session are already waiting for the app; "
            "try again once they are answered")
MSG_REJECTED = "cmux app rejected cloud CLI request"


def error_line(code: str, message: str) -> bytes:
    return orjson.dumps({"ok": False, "error": {"code": code, "message": message}},
                        option=orjson.OPT_APPEND_NEWLINE)


TOO_LARGE = error_line("request_too_large", "cloud CLI request exceeded maximum size")


def _is_refusal(reply: bytes) -> bool:
    try:
        msg = orjson.loads(reply)
    except orjson.JSONDecodeError:
        return False
    if type(msg) is not dict or msg.get("ok") is not False:
        return False
    error = msg.get("error")
    return type(error) is dict and error.get("code") in ROUTING_REFUSALS


class _Request:
    """One CLI's request while it waits: who has been asked, and who is asked now."""

    __slots__ = ("session_id", "line", "tried", "offer", "peer", "refusal", "reply")

    def __init__(self, session_id: str, line: bytes):
        self.session_id = session_id
        self.line = line
        self.tried: set[int] = set()
        self.offer: str | None = None
        self.peer: int | None = None
        self.refusal: bytes | None = None
        self.reply: asyncio.Future = asyncio.get_running_loop().create_future()


class CliBridge:
    """The bridge sockets of every session in one 0700 directory, and the requests that wait.

    `directory` None makes a private temporary one, removed by `close()`."""

    def __init__(self, candidates: Callable[[str], list[int]], directory: str | None = None):
        self.candidates = candidates
        if directory is None:
            self.dir = Path(tempfile.mkdtemp(prefix="cmuxd-cli-"))
            self.owns_dir = True
        else:
            self.dir = Path(directory)
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.dir, 0o700)
            self.owns_dir = False
            # A hub that died left its sockets behind; their sessions died with it.
            for stale in self.dir.glob("*.sock"):
                stale.unlink(missing_ok=True)
        self.listeners: dict[str, socket.socket] = {}  # by path
        self.subscribers: dict[int, Callable[[dict], bool]] = {}
        self.offers: dict[str, _Request] = {}
        self.pending: dict[str, int] = {}
        self.tasks: set[asyncio.Task] = set()
        self._next_request = 0

    # sockets

    def open(self, session_id: str, path: str | None = None) -> str:
        """Listen for this session's CLIs; the path for its CMUX_SOCKET_PATH. A session
        adopted after an upgrade gets the path its processes already know."""
        if path is None:
            path = self.dir / f"{secrets.token_hex(8)}.sock"
        path = Path(path)
        if path.parent != self.dir:
            raise ValueError(f"a CLI bridge socket outside {self.dir}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            if path.exists():
                path.unlink()
            sock.bind(str(path))
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(old)
        sock.listen(64)
        sock.setblocking(False)
        self.listeners[str(path)] = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._accept, session_id, sock)
        return str(path)

    def close_socket(self, path: str) -> None:
        """Its session ended: no new CLIs. Requests already waiting keep their offers."""
        sock = self.listeners.pop(path, None)
        if sock is None:
            return
        asyncio.get_running_loop().remove_reader(sock.fileno())
        sock.close()
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        for path in list(self.listeners):
            self.close_socket(path)
        for task in list(self.tasks):
            task.cancel()
        if self.owns_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _accept(self, session_id: str, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accepting a CLI of PTY %s failed: %s", session_id, exc)
                return
            uid = peer_uid(conn)
            if uid not in (os.getuid(), 0):
                log.warning("refused a CLI of uid %d on PTY %s's bridge: only uid %d and root "
                            "may use it", uid, session_id, os.getuid())
                conn.close()
                continue
            conn.setblocking(False)
            task = asyncio.get_running_loop().create_task(self._serve(session_id, conn))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _serve(self, session_id: str, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            line = await asyncio.wait_for(_read_line(loop, conn), REPLY_TIMEOUT)
            if line is None:
                return
            if line is OVERSIZED:
                reply = TOO_LARGE
            else:
                reply = await self._forward(session_id, line, loop, conn)
            if reply is not None:
                # A CLI that does not read its reply is not waited for any longer than an app.
                await asyncio.wait_for(loop.sock_sendall(
                    conn, reply if reply.endswith(b"\n") else reply + b"\n"), REPLY_TIMEOUT)
        except (TimeoutError, OSError):
            pass
        finally:
            conn.close()

    # requests

    async def _forward(self, session_id: str, line: bytes, loop, conn) -> bytes | None:
        """The CLI's reply line; None when the CLI went away first."""
        if self.pending.get(session_id, 0) >= MAX_PENDING:
            return error_line("cloud_cli_unavailable", MSG_BUSY)
        self.pending[session_id] = self.pending.get(session_id, 0) + 1
        req = _Request(session_id, line)
        gone = loop.create_task(_until_gone(loop, conn))
        try:
            self._offer_next(req)
            done, _ = await asyncio.wait((req.reply, gone), timeout=REPLY_TIMEOUT,
                                         return_when=asyncio.FIRST_COMPLETED)
            if req.reply.done():
                return req.reply.result()
            if gone in done:
                return None
            return error_line("cloud_cli_unavailable", MSG_TIMEOUT)
        finally:
            gone.cancel()
            self._withdraw(req)
            self.pending[session_id] -= 1
            if not self.pending[session_id]:
                del self.pending[session_id]

    def _withdraw(self, req: _Request) -> None:
        if req.offer is not None:
            self.offers.pop(req.offer, None)
            req.offer = req.peer = None

    def _offer_next(self, req: _Request) -> None:
        """Offer the request to the next candidate not yet asked; with none left, the CLI
        gets the last refusal, or the news that no app can answer."""
        self._withdraw(req)
        for peer in self.candidates(req.session_id):
            push = self.subscribers.get(peer)
            if push is None or peer in req.tried:
                continue
            req.tried.add(peer)
            self._next_request += 1
            offer = f"cli-{self._next_request}"
            req.offer, req.peer = offer, peer
            self.offers[offer] = req
            if push({"event": "cli.request", "request_id": offer,
                     "data_base64": b64(req.line)}):
                return
            self._withdraw(req)
        if not req.reply.done():
            req.reply.set_result(req.refusal or error_line("cloud_cli_unavailable", MSG_NO_APP))

    def subscribe(self, peer: int, push: Callable[[dict], bool]) -> dict:
        """`push(event) -> bool` sends a cli.request to that connection; False if it cannot."""
        self.subscribers[peer] = push
        return {"subscribed": True}

    def peer_gone(self, peer: int) -> None:
        """A connection ended: requests offered to it go to the next candidate."""
        self.subscribers.pop(peer, None)
        for req in [r for r in self.offers.values() if r.peer == peer]:
            self._offer_next(req)

    def respond(self, peer: int, request_id: str, ok: bool, data: bytes | None,
                error) -> dict:
        req = self.offers.get(request_id)
        if req is None or req.peer != peer:
            raise RPCError(NOT_FOUND, MSG_NOT_FOUND)
        self._withdraw(req)
        if not ok:
            req.reply.set_result(_app_error(error))
        elif _is_refusal(data):
            req.refusal = data
            self._offer_next(req)
        else:
            req.reply.set_result(data)
        return {"delivered": True}


def _app_error(error) -> bytes:
    """The app's own error for the CLI: upstream sends a string; a {code, message} object is
    passed on as it is."""
    if type(error) is dict and type(error.get("code")) is str \
            and type(error.get("message")) is str:
        return error_line(error["code"], error["message"])
    if type(error) is str and error:
        return error_line("cloud_cli_unavailable", error)
    return error_line("cloud_cli_unavailable", MSG_REJECTED)


async def _read_line(loop, conn: socket.socket):
    """The CLI's one request line (without its LF), OVERSIZED, or None if it sent nothing."""
    decoder = FrameDecoder(MAX_FRAME)
    while True:
        data = await loop.sock_recv(conn, READ_CHUNK)
        frames = decoder.feed(data) if data else decoder.eof()
        if frames:
            return frames[0]
        if not data:
            return None


async def _until_gone(loop, conn: socket.socket) -> None:
    """Completes when the CLI hangs up (anything more it sends is ignored). A CLI that only
    shut its sending side still waits for the reply: only a full close raises POLLHUP."""
    while await loop.sock_recv(conn, READ_CHUNK):
        pass
    poller = select.poll()
    poller.register(conn, select.POLLHUP)
    while not poller.poll(0):
        await asyncio.sleep(HANGUP_POLL)
