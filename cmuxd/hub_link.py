"""The link between workers and the hub process: `HubServer` runs the one `Hub` of the
daemon behind a 0600 Unix socket; `RemoteHub` is what a worker's handlers call instead of an
in-process Hub, with the same methods (the ones that need the hub's answer are coroutines).

Frames are JSON lines. Worker → hub: `{"op":…}` (calls carry an `rid`). Hub → worker:
replies by `rid` (an attach also gets `{"rid":…,"reserved":true}` once its session exists),
and `{"peer":…,"event":…}` for events. Flow control crosses the link as counts: the hub lets
at most OUTBOUND_FRAMES events of one attachment be unconfirmed, and the worker confirms
them with `drained` as its client reads them, so a slow client is dropped by the hub exactly
as the spec's per-attachment queue says, without the link ever buffering without bound.
"""

from __future__ import annotations

import argparse
import asyncio
import binascii
import logging
import os
import signal
import socket
from pathlib import Path

import orjson

from .handlers.pty import MSG_NO_HUB, OUTBOUND_FRAMES, pty_error_event
from .hub import Hub, watch_children_without_threads
from .local_sockets import LocalSocketError, make_state_dir, open_trusted_unix, trusted_peer
from .peercred import peer_uid
from .protocol import OVERSIZED, UNAVAILABLE, FrameDecoder, RPCError, b64, encode

log = logging.getLogger("cmuxd.hub")

CONNECT_WAIT = 5.0
LINK_MAX_FRAME = 64 * 1024 * 1024
"""Link frames carry a whole pty.write (up to the 4 MiB request frame, base64 once more)."""
CALLS = ("attach", "cancel", "write", "resize", "detach", "close", "list")
ASYNC_CALLS = ("attach", "cancel")


def hub_socket_path(state_dir: str) -> Path:
    return Path(state_dir) / "hub.sock"


class _LinkPeer:
    """One worker-side connection as the hub sees it: events go over the link, counted."""

    def __init__(self, link: "_Link", remote_id: int):
        self.link = link
        self.remote_id = remote_id
        self.unconfirmed: dict[tuple, int] = {}

    def deliver(self, event: dict) -> bool:
        key = (event["session_id"], event["attachment_id"], event["attachment_token"])
        if event["event"] == "pty.exit":
            self.unconfirmed.pop(key, None)
        else:
            count = self.unconfirmed.get(key, 0)
            if count >= OUTBOUND_FRAMES:
                return False
            self.unconfirmed[key] = count + 1
        self.link.send({"peer": self.remote_id, "event": event})
        return True


class _Link(asyncio.Protocol):
    """The hub end of one worker's link."""

    def __init__(self, server: "HubServer"):
        self.server = server
        self.hub = server.hub
        self.decoder = FrameDecoder(LINK_MAX_FRAME)
        self.transport = None
        self.peers: dict[int, tuple[int, _LinkPeer]] = {}  # remote id -> (hub peer, peer)
        self.tasks: set[asyncio.Task] = set()

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if not trusted_peer(sock):
            log.warning("refused a PTY hub link from uid %d: only this daemon's workers may "
                        "connect", peer_uid(sock))
            transport.close()
            return
        self.send({"hello": {"persistent": self.hub.capabilities(True),
                             "local": self.hub.capabilities(False)}})

    def send(self, message: dict) -> None:
        if not self.transport.is_closing():
            self.transport.write(encode(message))

    def data_received(self, data: bytes) -> None:
        for frame in self.decoder.feed(data):
            if frame is OVERSIZED:
                log.error("a worker sent a link frame over %d bytes; closing its link",
                          LINK_MAX_FRAME)
                self.transport.close()
                return
            self._handle(orjson.loads(frame))

    def connection_lost(self, exc) -> None:
        for task in self.tasks:
            task.cancel()
        for hub_peer, _ in self.peers.values():
            asyncio.get_running_loop().create_task(self.hub.remove_peer(hub_peer))
        self.peers.clear()

    def _handle(self, msg: dict) -> None:
        op = msg["op"]
        if op == "add_peer":
            peer = _LinkPeer(self, msg["peer"])
            self.peers[msg["peer"]] = (self.hub.add_peer(peer.deliver), peer)
        elif op == "remove_peer":
            entry = self.peers.pop(msg["peer"], None)
            if entry is not None:
                self._spawn(self.hub.remove_peer(entry[0]))
        elif op == "drained":
            entry = self.peers.get(msg["peer"])
            if entry is not None:
                key = tuple(msg["key"])
                left = entry[1].unconfirmed.get(key, 0) - msg["n"]
                if key in entry[1].unconfirmed:
                    entry[1].unconfirmed[key] = max(0, left)
                self.hub.drained(entry[0], *key, msg["n"])
        elif op == "call":
            if msg["method"] in ASYNC_CALLS:
                self._spawn(self._call(msg))
            else:
                self._call_now(msg)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _prepare(self, msg: dict) -> tuple:
        """The hub method and its arguments, with the worker's peer id made ours."""
        method, args = msg["method"], msg["args"]
        if method not in CALLS:
            raise RPCError(UNAVAILABLE, f"unknown hub call {method}")
        if method in ("list", "close"):
            return getattr(self.hub, method), args
        entry = self.peers.get(args[0])
        if entry is None:
            raise RPCError(UNAVAILABLE, MSG_NO_HUB)
        args = [entry[0], *args[1:]]
        if method == "write":
            args[4] = binascii.a2b_base64(args[4])
        return getattr(self.hub, method), args

    def _call_now(self, msg: dict) -> None:
        """Calls the hub answers at once run here, not in a task of their own: keystrokes
        take this path. A quiet call (a pty.write notification) is answered only when it
        fails, and then as the pty.error event its sender would have emitted."""
        try:
            method, args = self._prepare(msg)
            result = method(*args)
        except Exception as exc:
            self._failed(msg, exc)
            return
        if not msg.get("quiet"):
            self.send({"rid": msg["rid"], "ok": True, "result": result})

    async def _call(self, msg: dict) -> None:
        rid = msg["rid"]
        try:
            method, args = self._prepare(msg)
            if method == self.hub.attach:
                result = await method(*args, reserved=lambda: self.send(
                    {"rid": rid, "reserved": True}))
            else:
                result = await method(*args)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed(msg, exc)
            return
        self.send({"rid": rid, "ok": True, "result": result})

    def _failed(self, msg: dict, exc: Exception) -> None:
        if isinstance(exc, RPCError):
            code, message = exc.code, exc.message
        else:
            log.error("hub call %s failed", msg["method"], exc_info=exc)
            code, message = UNAVAILABLE, "internal error in the PTY hub; see the daemon log"
        if not msg.get("quiet"):
            self.send({"rid": msg["rid"], "ok": False, "code": code, "message": message})
            return
        entry = self.peers.get(msg["args"][0])
        if entry is not None:
            _, sid, aid, token = msg["args"][:4]
            entry[1].deliver(pty_error_event(sid, aid, token, code, message))


class HubServer:
    def __init__(self, hub, path: Path):
        self.hub = hub
        self.path = path
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        make_state_dir(self.path.parent)
        if self.path.exists():
            self.path.unlink()
        old = os.umask(0o177)
        try:
            self.server = await asyncio.get_running_loop().create_unix_server(
                lambda: _Link(self), str(self.path))
        finally:
            os.umask(old)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


class RemoteHub:
    """A worker's handle on the hub process. While the link is down, calls fail with
    `unavailable` and the worker keeps reconnecting."""

    def __init__(self, path: Path):
        self.path = path
        self.writer: asyncio.StreamWriter | None = None
        # PTY support is a property of this host, so it is known before the link is up:
        # a connection that arrives first (the one that socket-activated us) sees it too.
        probe = Hub()
        self.caps = {"persistent": probe.capabilities(True), "local": probe.capabilities(False)}
        self.peers: dict[int, object] = {}
        self.attachments: dict[int, set] = {}  # peer -> attachments seen live
        self._next_peer = 0
        self._next_rid = 0
        self._waiting: dict[int, tuple[asyncio.Future, object]] = {}
        self._runner: asyncio.Task | None = None
        self.connected = asyncio.Event()

    def start(self) -> None:
        self._runner = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        delay = 0.05
        refusal = ""
        while True:
            try:
                reader, writer = await open_trusted_unix(self.path)
            except OSError as exc:
                if isinstance(exc, LocalSocketError) and str(exc) != refusal:
                    refusal = str(exc)
                    log.error("not connecting to the PTY hub: %s", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            delay = 0.05
            refusal = ""
            self.writer = writer
            for peer in self.peers:
                self._send({"op": "add_peer", "peer": peer})
            try:
                await self._read(reader)
            except (OSError, orjson.JSONDecodeError):
                pass
            self.writer = None
            self.connected.clear()
            writer.close()
            for fut, _ in self._waiting.values():
                if not fut.done():
                    fut.set_exception(RPCError(UNAVAILABLE, MSG_NO_HUB))
            self._waiting.clear()
            self._hub_lost()
            log.warning("lost the PTY hub; reconnecting")

    async def _read(self, reader: asyncio.StreamReader) -> None:
        decoder = FrameDecoder(LINK_MAX_FRAME)
        while data := await reader.read(262144):
            for frame in decoder.feed(data):
                if frame is OVERSIZED:
                    raise OSError("the hub sent an oversized link frame")
                msg = orjson.loads(frame)
                if "event" in msg:
                    self._event(msg["peer"], msg["event"])
                elif "rid" in msg:
                    self._reply(msg)
                elif "hello" in msg:
                    self.caps = msg["hello"]
                    self.connected.set()

    def _event(self, peer: int, event: dict) -> None:
        deliver = self.peers.get(peer)
        if deliver is None:
            return
        key = (event["session_id"], event["attachment_id"], event["attachment_token"])
        live = self.attachments.setdefault(peer, set())
        if event["event"] == "pty.exit":
            live.discard(key)
        elif event["event"] != "pty.error":  # an error may name no live attachment
            live.add(key)
        deliver(event)

    def _hub_lost(self) -> None:
        """The hub's sessions died with it: end every attachment we were showing, so clients
        hear pty.exit instead of waiting on a terminal that is gone."""
        for peer, keys in self.attachments.items():
            deliver = self.peers.get(peer)
            for sid, aid, token in keys:
                if deliver is not None:
                    deliver({"event": "pty.exit", "session_id": sid, "attachment_id": aid,
                             "attachment_token": token})
        self.attachments.clear()

    def _reply(self, msg: dict) -> None:
        if msg.get("reserved"):
            entry = self._waiting.get(msg["rid"])
            if entry is not None and entry[1] is not None:
                entry[1]()
            return
        entry = self._waiting.pop(msg["rid"], None)
        if entry is None or entry[0].done():
            return
        if msg["ok"]:
            entry[0].set_result(msg["result"])
        else:
            entry[0].set_exception(RPCError(msg["code"], msg["message"]))

    def _send(self, msg: dict) -> None:
        if self.writer is not None:
            self.writer.write(encode(msg))

    def _call(self, method: str, *args, reserved=None) -> asyncio.Future:
        """Send the call now, so calls reach the hub in the order the requests arrived, and
        return the future of its answer."""
        if self.writer is None or not self.connected.is_set():
            return asyncio.ensure_future(self._call_once_connected(method, args, reserved))
        self._next_rid += 1
        rid = self._next_rid
        fut = asyncio.get_running_loop().create_future()
        self._waiting[rid] = (fut, reserved)
        fut.add_done_callback(lambda _: self._waiting.pop(rid, None))
        self._send({"op": "call", "rid": rid, "method": method, "args": list(args)})
        return fut

    async def _call_once_connected(self, method: str, args: tuple, reserved):
        """Just started, or the hub is being replaced: give the link a moment."""
        try:
            await asyncio.wait_for(self.connected.wait(), CONNECT_WAIT)
        except TimeoutError:
            raise RPCError(UNAVAILABLE, MSG_NO_HUB) from None
        return await self._call(method, *args, reserved=reserved)

    # the Hub interface the handlers use

    def capabilities(self, persistent: bool) -> list[str]:
        return list(self.caps["persistent" if persistent else "local"])

    def add_peer(self, deliver) -> int:
        self._next_peer += 1
        self.peers[self._next_peer] = deliver
        self._send({"op": "add_peer", "peer": self._next_peer})
        return self._next_peer

    async def remove_peer(self, peer: int) -> None:
        self.peers.pop(peer, None)
        self.attachments.pop(peer, None)
        self._send({"op": "remove_peer", "peer": peer})

    def drained(self, peer: int, session_id: str, attachment_id: str, token: str,
                frames: int) -> None:
        self._send({"op": "drained", "peer": peer, "key": [session_id, attachment_id, token],
                    "n": frames})

    async def attach(self, peer, session_id, attachment_id, token, cols, rows, command,
                     require_existing, input_seq_ack, reserved=None) -> dict:
        return await self._call("attach", peer, session_id, attachment_id, token, cols, rows,
                                command, require_existing, input_seq_ack, reserved=reserved)

    async def cancel(self, peer, session_id, attachment_id, token) -> None:
        await self._call("cancel", peer, session_id, attachment_id, token)

    def write(self, peer, session_id, attachment_id, token, data: bytes, seq, notification):
        args = [peer, session_id, attachment_id, token, b64(data), seq, notification]
        if not notification:
            return self._call("write", *args)
        # A notification is answered only if it fails, by a pty.error the hub sends: no
        # round trip on the keystroke path.
        if self.writer is None or not self.connected.is_set():
            raise RPCError(UNAVAILABLE, MSG_NO_HUB)
        self._send({"op": "call", "rid": 0, "method": "write", "args": args, "quiet": True})
        return {"written": len(data)}

    def resize(self, peer, session_id, attachment_id, token, cols, rows):
        return self._call("resize", peer, session_id, attachment_id, token, cols, rows)

    def detach(self, peer, session_id, attachment_id, token):
        return self._call("detach", peer, session_id, attachment_id, token)

    def close(self, session_id):
        return self._call("close", session_id)

    def list(self):
        return self._call("list")


async def _serve(config: dict, lifeline: int | None) -> None:
    watch_children_without_threads()
    hub = Hub(scrollback=config.get("scrollback", 1 << 20),
              idle_ttl=config.get("idle_ttl", 86400.0), shell=config.get("shell"))
    server = HubServer(hub, hub_socket_path(config["state_dir"]))
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, lambda: None)
    if lifeline is not None:
        supervisor = socket.socket(fileno=lifeline)
        supervisor.setblocking(False)

        def heartbeat() -> None:
            """Answer the supervisor's pings; its end closing means it is gone."""
            try:
                data = supervisor.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if data:
                try:
                    supervisor.send(b"p")
                except OSError:
                    pass
                return
            loop.remove_reader(lifeline)
            stop.set()

        loop.add_reader(lifeline, heartbeat)
    log.info("PTY hub serving on %s", server.path)
    await stop.wait()
    await server.close()
    await hub.shutdown()


def main(argv: list[str] | None = None) -> None:
    from .logs import setup_logging

    parser = argparse.ArgumentParser(prog="cmuxd.hub_link")
    parser.add_argument("--config", default="{}")
    parser.add_argument("--lifeline-fd", type=int, default=None)
    args = parser.parse_args(argv)
    setup_logging(f"cmuxd hub [{os.getpid()}]")
    try:
        asyncio.run(_serve(orjson.loads(args.config), args.lifeline_fd))
    except LocalSocketError as exc:
        log.error("%s", exc)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
