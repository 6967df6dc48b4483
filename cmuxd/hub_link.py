"""The link between workers and the hub process: `HubServer` runs the one `Hub` of the
daemon behind a 0600 Unix socket; `RemoteHub` is what a worker's handlers call instead of an
in-process Hub, with the same methods (the ones that need the hub's answer are coroutines).

Messages are JSON lines with a `type` and named fields (`link_channel`), and may carry fds
and a raw payload.
A worker opens with `hello` and the link version it speaks; the hub refuses any other
version, and each end checks that the other runs as its own uid.

Worker → hub: `hello`, `add_peer`, `remove_peer`, `drained`, `call` (a Hub method by name,
`params` by name; `quiet` for a pty.write notification, answered only if it fails; the
CLI bridge's `cli_subscribe` and `cli_response` are calls too),
`input` (a lease holder's input for the hub's queue), `released` (a lease given back).
Hub → worker: `hello`/`refused`, `reply` (by `rid`; an attach also gets `reserved` once its
session exists), `event` (for one peer), `lease` (+ the PTY master and the ring),
`revoke`, `end_lease`, `input_done`, `input_refused`, `cli_request` (a `cli.request` event
for one subscribed peer: not PTY output, so it never goes through a lease holder),
`upgrading` (the hub is about to re-execute: the worker answers `upgrading_ack`, holds its
input, and on reconnecting with the same `worker` name in its `hello` gets its attachments
back). A `write` call and `input` carry their bytes as the message's raw payload.

Flow control crosses the link as counts: the hub lets at most OUTBOUND_FRAMES events of one
attachment be unconfirmed, and the worker confirms them with `drained` as its client reads
them, so a slow client is dropped by the hub exactly as the spec's per-attachment queue says,
without the link ever buffering without bound. Input is bounded the same way: a worker whose
link holds more than LINK_HIGH_WATER unsent bytes refuses pty.write with
`pty_input_queue_full` instead of buffering it.
"""

from __future__ import annotations

import asyncio
import binascii
import logging
import os
import secrets
import socket
from pathlib import Path

from . import __version__
from .cli_bridge import CAPABILITY as CLI_CAPABILITY
from .hub import Hub
from .link_channel import MessageChannel
from .local_sockets import LocalSocketError, check_server, check_state_dir, make_state_dir, trusted_peer
from .peercred import peer_uid
from .protocol import PTY_INPUT_QUEUE_FULL, PTY_INPUT_SEQ_GAP, UNAVAILABLE, RPCError, b64
from .pty_lease import WorkerLease
from .pty_rules import MSG_NO_HUB, MSG_QUEUE_FULL, pty_error_event

log = logging.getLogger("cmuxd.hub")

LINK_VERSION = 3
"""Bumped whenever a message changes shape; a hub and a worker must speak the same one."""
CONNECT_WAIT = 5.0
LINK_MAX_FRAME = 64 * 1024 * 1024
"""Link frames carry a whole pty.write (up to the 4 MiB request frame, base64 once more)."""
LINK_HIGH_WATER = 1024 * 1024
"""Unsent link bytes past which a worker refuses more input rather than buffer it."""
CALLS = ("attach", "cancel", "write", "resize", "detach", "close", "list", "cli_subscribe",
         "cli_response")
ASYNC_CALLS = ("attach", "cancel")
OWNED_CALLS = ("write", "detach")
"""Calls that change a session's input or attachments: a lent session is taken back first."""


def hub_socket_path(state_dir: str) -> Path:
    return Path(state_dir) / "hub.sock"


class _LinkPeer:
    """One worker-side connection as the hub sees it: its events go over the link."""

    __slots__ = ("link", "remote_id")

    def __init__(self, link: "_Link", remote_id: int):
        self.link = link
        self.remote_id = remote_id

    def deliver(self, event: dict) -> bool:
        self.link.send({"type": "event", "peer": self.remote_id, "event": event})
        return True


class _Link:
    """The hub end of one worker's link; also the `home` that holds that worker's leases."""

    def __init__(self, server: "HubServer", sock: socket.socket):
        self.server = server
        self.hub = server.hub
        self.peers: dict[int, int] = {}  # remote id -> hub peer
        self.remote_ids: dict[int, int] = {}  # hub peer -> remote id
        self.tasks: set[asyncio.Task] = set()
        self.can_hold_leases = False
        self.role = "worker"
        self.worker = ""
        """The worker's identity, which its attachments keep across an upgrade."""
        self.upgrade_acked: asyncio.Future | None = None
        self.channel = MessageChannel(sock, self._handle, self._closed, LINK_MAX_FRAME)

    def send(self, message: dict, fds: list[int] = ()) -> None:
        self.channel.send(message, fds)

    def _closed(self) -> None:
        self.can_hold_leases = False  # what it held comes back below; nothing new goes to it
        self.server.links.discard(self)
        self.server.on_link_closed()
        for task in self.tasks:
            task.cancel()
        # Its attachments are removed only below: a dead link must not get the lease again.
        self.can_hold_leases = False
        self.hub.lease_lost(self)
        for hub_peer in self.peers.values():
            asyncio.get_running_loop().create_task(self.hub.remove_peer(hub_peer))
        self.peers.clear()
        self.remote_ids.clear()

    def _handle(self, msg: dict, fds: list[int], payload: bytearray | None) -> None:
        for fd in fds:  # workers never send fds
            os.close(fd)
        kind = msg["type"]
        if self.role == "supervisor":
            self._supervisor_message(kind)
            return
        if not self.can_hold_leases:
            if kind == "hello" and msg.get("role") == "supervisor":
                # Any version: a daemon with new code must be able to ask an old hub to
                # upgrade. The supervisor link is ping/pong, upgrade and stop, for good.
                self.role = "supervisor"
                self.send({"type": "hello", "version": LINK_VERSION, **self.server.figures()})
                return
            if kind != "hello" or msg.get("version") != LINK_VERSION:
                log.error("a worker speaking hub link version %r connected; this hub speaks "
                          "%d (a daemon mid-upgrade?); closing its link", msg.get("version"),
                          LINK_VERSION)
                self.send({"type": "refused", "reason": f"the PTY hub speaks link version "
                                                        f"{LINK_VERSION}"})
                self.channel.close()
                return
            self.can_hold_leases = True
            self.worker = str(msg.get("worker", ""))
            self.send({"type": "hello", "version": LINK_VERSION,
                       "caps": {"persistent": self.hub.capabilities(True),
                                "local": self.hub.capabilities(False)},
                       "knows_worker": self.hub.expects_worker(self.worker)})
        elif kind == "add_peer":
            peer = _LinkPeer(self, msg["peer"])
            hub_peer = self.hub.add_peer(peer.deliver, home=self)
            self.peers[msg["peer"]] = hub_peer
            self.remote_ids[hub_peer] = msg["peer"]
            self.hub.rebind(self.worker, msg["peer"], hub_peer)
        elif kind == "remove_peer":
            hub_peer = self.peers.pop(msg["peer"], None)
            if hub_peer is not None:
                del self.remote_ids[hub_peer]
                self._spawn(self.hub.remove_peer(hub_peer))
        elif kind == "drained":
            hub_peer = self.peers.get(msg["peer"])
            if hub_peer is not None:
                self.hub.drained(hub_peer, msg["session_id"], msg["attachment_id"], msg["token"],
                                 msg["frames"])
        elif kind == "call":
            self._call(msg, payload)
        elif kind == "input":
            self._input(msg, payload)
        elif kind == "released":
            self.hub.lease_released(msg["session_id"], msg["lease"], msg)
        elif kind == "upgrading_ack":
            if self.upgrade_acked is not None and not self.upgrade_acked.done():
                self.upgrade_acked.set_result(None)
        else:
            log.error("a worker sent an unknown hub link message %r", kind)

    def _supervisor_message(self, kind: str) -> None:
        """The daemon's supervisor watches us (ping) and asks for upgrades and stops."""
        if kind == "ping":
            self.send({"type": "pong", **self.server.figures()})
        elif kind == "upgrade":
            self.server.on_upgrade()
        elif kind == "stop":
            self.server.on_stop()

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # calls

    def _call(self, msg: dict, payload: bytearray | None) -> None:
        if payload is not None:
            msg["payload"] = payload  # the data of a pty.write, as it came
        method, params = msg["method"], msg["params"]
        if method in ASYNC_CALLS:
            self._spawn(self._call_async(msg))
            return
        session = self.hub.leased(params.get("session_id")) if method in OWNED_CALLS else None
        if session is not None:
            self._spawn(self._call_owned(session, msg))
            return
        self._call_now(msg)

    async def _call_owned(self, session, msg: dict) -> None:
        async with session.owned():
            self._call_now(msg)

    def _prepare(self, msg: dict):
        """The hub method and its arguments, with the worker's peer id made ours."""
        method, params = msg["method"], dict(msg["params"])
        if method not in CALLS:
            raise RPCError(UNAVAILABLE, f"unknown hub call {method}")
        if "peer" in params:
            hub_peer = self.peers.get(params["peer"])
            if hub_peer is None:
                raise RPCError(UNAVAILABLE, MSG_NO_HUB)
            params["peer"] = hub_peer
        if method == "write":
            params["data"] = msg.get("payload", b"")
        elif "data_base64" in params:
            data = params.pop("data_base64")
            params["data"] = None if data is None else binascii.a2b_base64(data)
        if method == "cli_subscribe":
            remote_id = msg["params"]["peer"]
            params["push"] = lambda event: self._push_cli_request(remote_id, event)
        return getattr(self.hub, method), params

    def _push_cli_request(self, remote_id: int, event: dict) -> bool:
        self.send({"type": "cli_request", "peer": remote_id, "event": event})
        return True

    def _call_now(self, msg: dict) -> None:
        """Calls the hub answers at once run here, not in a task of their own. A quiet call
        (a pty.write notification) is answered only when it fails, and then as the pty.error
        event its sender would have emitted."""
        try:
            method, params = self._prepare(msg)
            result = method(**params)
        except Exception as exc:
            self._failed(msg, exc)
            return
        if not msg.get("quiet"):
            self.send({"type": "reply", "rid": msg["rid"], "ok": True, "result": result})

    async def _call_async(self, msg: dict) -> None:
        rid = msg["rid"]
        try:
            method, params = self._prepare(msg)
            if method == self.hub.attach:
                params["reserved"] = lambda: self.send({"type": "reserved", "rid": rid})
            result = await method(**params)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed(msg, exc)
            return
        self.send({"type": "reply", "rid": rid, "ok": True, "result": result})

    def _failed(self, msg: dict, exc: Exception) -> None:
        if isinstance(exc, RPCError):
            code, message = exc.code, exc.message
        else:
            log.error("hub call %s failed", msg["method"], exc_info=exc)
            code, message = UNAVAILABLE, "internal error in the PTY hub; see the daemon log"
        if not msg.get("quiet"):
            self.send({"type": "reply", "rid": msg["rid"], "ok": False, "code": code,
                       "message": message})
            return
        params = msg["params"]
        if params.get("peer") in self.peers:
            self.send({"type": "event", "peer": params["peer"], "event": pty_error_event(
                params["session_id"], params["attachment_id"], params["token"], code, message)})

    def _input(self, msg: dict, payload: bytearray | None) -> None:
        try:
            self.hub.forwarded_input(msg["session_id"], msg["attachment_id"],
                                     payload or b"", msg["seq"],
                                     msg["force"], msg["fid"])
        except RPCError as exc:
            self.send({"type": "input_refused", "session_id": msg["session_id"],
                       "fid": msg["fid"], "code": exc.code, "message": exc.message})
            return
        self.send({"type": "input_accepted", "session_id": msg["session_id"], "fid": msg["fid"]})

    # the home of leases (see PtySession.consider_lease)

    def announce_upgrade(self) -> asyncio.Future:
        """Tell the worker the hub is about to re-execute: it holds what it would send and
        says so; the future is its answer."""
        self.upgrade_acked = asyncio.get_running_loop().create_future()
        self.send({"type": "upgrading"})
        return self.upgrade_acked

    def upgrade_aborted(self) -> None:
        """The exec failed: the worker goes on with this hub as it was."""
        self.send({"type": "hello", "version": LINK_VERSION,
                   "caps": {"persistent": self.hub.capabilities(True),
                            "local": self.hub.capabilities(False)}, "knows_worker": True})

    def remote_name(self, hub_peer: int) -> tuple[str, int] | None:
        """Who a peer is to its worker, for carrying its attachments across an upgrade."""
        remote = self.remote_ids.get(hub_peer)
        return None if remote is None or not self.worker else (self.worker, remote)

    def grant_lease(self, session, grant) -> None:
        attachments = [
            {"peer": self.remote_ids.get(a.peer, -1), "attachment_id": a.id, "token": a.token,
             "next_seq": a.next_seq, "acked": a.acked, "seq_ack": a.seq_ack, "slow": a.slow,
             "ext": a.ext}
            for a in session.attachments.values()
        ]
        self.send({"type": "lease", "session_id": session.id, "lease": grant.id,
                   "attachments": attachments, "busy": bool(session.input)},
                  [session.master, session.ring.fd])

    def revoke_lease(self, session, grant) -> None:
        self.send({"type": "revoke", "session_id": session.id, "lease": grant.id})

    def end_lease(self, session, grant) -> None:
        self.send({"type": "end_lease", "session_id": session.id, "lease": grant.id})

    def input_done(self, session, grant, acks: dict, fids: list[int], idle: bool) -> None:
        self.send({"type": "input_done", "session_id": session.id, "lease": grant.id,
                   "acks": acks, "fids": fids, "idle": idle})


class HubServer:
    """The hub's socket. What the process around it does on an upgrade, a stop or the last
    link closing is its own (`on_upgrade`, `on_stop`, `on_link_closed`)."""

    def __init__(self, hub, path: Path):
        self.hub = hub
        self.path = path
        self.sock: socket.socket | None = None
        self.links: set[_Link] = set()
        self.upgrades_refused = 0
        self.on_upgrade = lambda: None
        self.on_stop = lambda: None
        self.on_link_closed = lambda: None

    def figures(self) -> dict:
        return {"pid": os.getpid(), "code_version": __version__,
                "sessions": len(self.hub.sessions), "upgrades_refused": self.upgrades_refused}

    async def start(self, inherited: int | None = None) -> None:
        """Listen on our path, or go on listening on the socket an earlier image of this
        process bound (an upgrade refuses no connection attempt)."""
        if inherited is not None:
            sock = socket.socket(fileno=inherited)
        else:
            make_state_dir(self.path.parent)
            if self.path.exists():
                self.path.unlink()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old = os.umask(0o177)
            try:
                sock.bind(str(self.path))
            finally:
                os.umask(old)
            sock.listen(128)
        sock.setblocking(False)
        self.sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accepting a worker's link failed: %s", exc)
                return
            if not trusted_peer(conn):
                log.warning("refused a PTY hub link from uid %d: only this daemon's user (or "
                            "root) may connect", peer_uid(conn))
                conn.close()
                continue
            self.links.add(_Link(self, conn))

    async def close(self) -> None:
        if self.sock is not None:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


class RemoteHub:
    """A worker's handle on the hub process. While the link is down, calls fail with
    `unavailable` and the worker keeps reconnecting."""

    def __init__(self, path: Path, cli_bridge: bool = False):
        self.path = path
        self.channel: MessageChannel | None = None
        # PTY support is a property of this host, so it is known before the link is up:
        # a connection that arrives first (the one that socket-activated us) sees it too.
        probe = Hub()
        self.caps = {"persistent": probe.capabilities(True), "local": probe.capabilities(False)}
        if cli_bridge:
            for caps in self.caps.values():
                if caps:
                    caps.append(CLI_CAPABILITY)
        self.peers: dict[int, object] = {}
        self.direct: dict[int, object] = {}
        """Each peer's `send_now(key, frame) -> bool`: a lease's output written at once."""
        self.cli_pushers: dict[int, object] = {}
        """Subscribed peers' way to send a cli.request to their connection."""
        self.attachments: dict[int, set] = {}  # peer -> attachments seen live
        self.behind: dict[tuple, int] = {}
        """Frames of each attachment given to its connection and not yet written out."""
        self.leases: dict[str, WorkerLease] = {}
        self._next_peer = 0
        self._next_rid = 0
        self._next_fid = 0
        self._waiting: dict[int, tuple[asyncio.Future, object]] = {}
        self._inputs: dict[int, asyncio.Future] = {}
        self._runner: asyncio.Task | None = None
        self._lost: asyncio.Future | None = None
        self.connected = asyncio.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.identity = secrets.token_hex(8)
        """Who this worker is to the hub, so a hub that upgraded in place gives its
        attachments back to it."""
        self.upgrading = False
        self.held: list[tuple[dict, bytes]] = []
        """pty.write notifications taken while the hub re-executes, sent once it is back."""
        self.held_bytes = 0

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._runner = self.loop.create_task(self._run())

    async def _run(self) -> None:
        delay = 0.05
        refusal = ""
        while True:
            try:
                sock = await self._connect()
            except OSError as exc:
                if isinstance(exc, LocalSocketError) and str(exc) != refusal:
                    refusal = str(exc)
                    log.error("not connecting to the PTY hub: %s", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            delay = 0.05
            refusal = ""
            self._lost = self.loop.create_future()
            self.channel = MessageChannel(sock, self._handle, self._channel_closed,
                                          LINK_MAX_FRAME)
            self.channel.send({"type": "hello", "version": LINK_VERSION,
                               "worker": self.identity})
            for peer in self.peers:
                self.channel.send({"type": "add_peer", "peer": peer})
            for peer in self.cli_pushers:
                self._call("cli_subscribe", {"peer": peer}).add_done_callback(_logged)
            await self._lost
            self.channel = None
            self.connected.clear()
            for fut, _ in self._waiting.values():
                if not fut.done():
                    fut.set_exception(RPCError(UNAVAILABLE, MSG_NO_HUB))
            self._waiting.clear()
            for fut in self._inputs.values():
                if not fut.done():
                    fut.set_exception(RPCError(UNAVAILABLE, MSG_NO_HUB))
            self._inputs.clear()
            for lease in list(self.leases.values()):
                lease.close()
            if self.upgrading:
                log.info("the PTY hub is upgrading in place; reconnecting")
                continue
            self._hub_lost()
            log.warning("lost the PTY hub; reconnecting")
            await asyncio.sleep(delay)

    async def _connect(self) -> socket.socket:
        check_state_dir(self.path.parent)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await self.loop.sock_connect(sock, str(self.path))
            check_server(sock, self.path)
        except BaseException:
            sock.close()
            raise
        return sock

    def _channel_closed(self) -> None:
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    def _handle(self, msg: dict, fds: list[int], payload: bytearray | None) -> None:
        kind = msg["type"]
        if kind == "event":
            self._event(msg["peer"], msg["event"])
        elif kind == "reply":
            self._reply(msg)
        elif kind == "reserved":
            entry = self._waiting.get(msg["rid"])
            if entry is not None and entry[1] is not None:
                entry[1]()
        elif kind == "lease":
            self._leased(msg, fds)
            return
        elif kind == "revoke":
            lease = self.leases.get(msg["session_id"])
            if lease is not None and lease.id == msg["lease"]:
                lease.give_back()
        elif kind == "end_lease":
            lease = self.leases.get(msg["session_id"])
            if lease is not None and lease.id == msg["lease"]:
                lease.close()
        elif kind == "input_done":
            lease = self.leases.get(msg["session_id"])
            if lease is not None and lease.id == msg["lease"]:
                lease.input_done(msg)
        elif kind in ("input_accepted", "input_refused"):
            self._input_answered(msg)
        elif kind == "cli_request":
            push = self.cli_pushers.get(msg["peer"])
            if push is not None:
                push(msg["event"])
        elif kind == "hello":
            self.caps = msg["caps"]
            if self.upgrading:
                self._back_from_upgrade(msg.get("knows_worker") is True)
            self.connected.set()
        elif kind == "upgrading":
            # From now on nothing goes to this hub image: what it has not read is lost.
            self.upgrading = True
            self.connected.clear()
            self.channel.send({"type": "upgrading_ack"})
        elif kind == "refused":
            log.error("the PTY hub refused this worker: %s", msg.get("reason"))
        for fd in fds:
            os.close(fd)

    def _leased(self, msg: dict, fds: list[int]) -> None:
        old = self.leases.pop(msg["session_id"], None)
        if old is not None:
            old.close()
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            log.error("the PTY hub lent session %s without its PTY and ring", msg["session_id"])
            return
        try:
            self.leases[msg["session_id"]] = WorkerLease(self, msg, fds)
        except (OSError, ValueError) as exc:
            log.error("could not take the reading of PTY %s: %s", msg["session_id"], exc)
            self.channel.send({"type": "released", "session_id": msg["session_id"],
                               "lease": msg["lease"], "attachments": [], "dropped": [],
                               "eof": False})

    def lease_given_back(self, lease: WorkerLease, state: dict) -> None:
        if self.channel is not None:
            self.channel.send({"type": "released", "session_id": lease.session_id,
                               "lease": lease.id, **state})

    # events

    def deliver(self, peer: int, event: dict) -> bool:
        """Give one event to its connection, counting it until drained; False when that
        attachment's queue is full."""
        deliver = self.peers.get(peer)
        if deliver is None:
            return True
        key = (event["session_id"], event["attachment_id"], event["attachment_token"])
        kind = event["event"]
        live = self.attachments.get(peer)
        if live is None:
            live = self.attachments[peer] = set()
        if kind == "pty.exit":
            deliver(event)
            live.discard(key)
            self.behind.pop(key, None)
            return True
        # Counted before delivery: the connection may write it and report it at once.
        self.behind[key] = self.behind.get(key, 0) + 1
        if not deliver(event):
            self.behind[key] -= 1
            return False
        if kind != "pty.error":  # an error may name no live attachment
            live.add(key)
        return True

    def _event(self, peer: int, event: dict) -> None:
        self.deliver(peer, event)

    def _back_from_upgrade(self, knows_us: bool) -> None:
        """The hub is back from its upgrade: send what was held meanwhile; a hub that does
        not know us (a new one, the upgraded one having died) ended our attachments."""
        self.upgrading = False
        held, self.held, self.held_bytes = self.held, [], 0
        if not knows_us:
            self._hub_lost()
            return
        for msg, data in held:
            self.channel.send(msg, payload=data)

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
        self.behind.clear()

    # calls

    def _reply(self, msg: dict) -> None:
        entry = self._waiting.pop(msg["rid"], None)
        if entry is None or entry[0].done():
            return
        if msg["ok"]:
            entry[0].set_result(msg["result"])
        else:
            entry[0].set_exception(RPCError(msg["code"], msg["message"]))

    def _send(self, msg: dict, payload=None) -> None:
        if self.channel is not None:
            self.channel.send(msg, payload=payload)

    def link_full(self) -> bool:
        return self.channel is not None and self.channel.buffered > LINK_HIGH_WATER

    def _call(self, method: str, params: dict, reserved=None, payload=None) -> asyncio.Future:
        """Send the call now, so calls reach the hub in the order the requests arrived, and
        return the future of its answer."""
        if self.channel is None or not self.connected.is_set():
            return asyncio.ensure_future(self._call_once_connected(method, params, reserved,
                                                                   payload))
        self._next_rid += 1
        rid = self._next_rid
        fut = self.loop.create_future()
        self._waiting[rid] = (fut, reserved)
        fut.add_done_callback(lambda _: self._waiting.pop(rid, None))
        self._send({"type": "call", "rid": rid, "method": method, "params": params}, payload)
        return fut

    async def _call_once_connected(self, method: str, params: dict, reserved, payload):
        """Just started, or the hub is being replaced: give the link a moment."""
        try:
            await asyncio.wait_for(self.connected.wait(), CONNECT_WAIT)
        except TimeoutError:
            raise RPCError(UNAVAILABLE, MSG_NO_HUB) from None
        return await self._call(method, params, reserved=reserved, payload=payload)

    def forward_input(self, lease: WorkerLease, att, data: bytes, seq, force: bool,
                      notification: bool) -> int:
        """Input a lease holder hands to the hub's queue; its id."""
        self._next_fid += 1
        fid = self._next_fid
        if not notification and not force:
            self._inputs[fid] = self.loop.create_future()
        self._send({"type": "input", "session_id": lease.session_id, "lease": lease.id,
                    "attachment_id": att.id, "seq": seq, "force": force, "fid": fid}, data)
        return fid

    async def reply_of(self, fid: int, att, seq, length: int) -> dict:
        await self._inputs[fid]
        if seq is not None:
            att.next_seq = max(att.next_seq, seq + 1)
        return {"written": length}

    def _input_answered(self, msg: dict) -> None:
        fid = msg["fid"]
        fut = self._inputs.pop(fid, None)
        lease = self.leases.get(msg["session_id"])
        refused = msg["type"] == "input_refused"
        if refused and lease is not None:
            lease.input_refused(fid)
        if fut is not None:
            if not fut.done():
                if refused:
                    fut.set_exception(RPCError(msg["code"], msg["message"]))
                else:
                    fut.set_result(None)
            return
        if refused and lease is not None:
            self._notification_refused(lease, msg)

    def _notification_refused(self, lease: WorkerLease, msg: dict) -> None:
        att = lease.attachments.get(msg.get("attachment_id"))
        if att is not None:
            self._refuse_notification(lease, att, msg["code"], msg["message"])

    def _refuse_notification(self, lease: WorkerLease, att, code: str, message: str) -> None:
        """A pty.write notification refused on sequence or capacity: pty.error, then the
        attachment is detached, as the spec says for the notification form. It takes no more
        input here meanwhile; the hub's pty.exit comes after the error."""
        self.deliver(att.peer, pty_error_event(lease.session_id, att.id, att.token, code,
                                               message))
        lease.attachments.pop(att.id, None)
        self.loop.create_task(self._detach_quietly(att.peer, lease.session_id, att.id,
                                                   att.token))

    async def _detach_quietly(self, peer, sid, aid, token) -> None:
        try:
            await self.detach(peer, sid, aid, token)
        except RPCError:
            pass

    # the Hub interface the handlers use

    def capabilities(self, persistent: bool) -> list[str]:
        return list(self.caps["persistent" if persistent else "local"])

    def add_peer(self, deliver, send_now=None) -> int:
        self._next_peer += 1
        self.peers[self._next_peer] = deliver
        if send_now is not None:
            self.direct[self._next_peer] = send_now
        self._send({"type": "add_peer", "peer": self._next_peer})
        return self._next_peer

    async def remove_peer(self, peer: int) -> None:
        self.peers.pop(peer, None)
        self.direct.pop(peer, None)
        self.cli_pushers.pop(peer, None)
        for key in self.attachments.pop(peer, ()):
            self.behind.pop(key, None)
        self._send({"type": "remove_peer", "peer": peer})

    def drained(self, peer: int, session_id: str, attachment_id: str, token: str,
                frames: int) -> None:
        key = (session_id, attachment_id, token)
        behind = self.behind.get(key)
        if behind is not None:
            self.behind[key] = behind - frames if behind > frames else 0
        lease = self.leases.get(session_id)
        if lease is not None:
            # The key is the connection's own queue key, made from an event we sent, not
            # a client's claim: a plain compare, no constant-time one, is right here.
            att = lease.attachments.get(attachment_id)
            if att is not None and att.key == key:
                lease.drained()
                return
        if self.upgrading:
            return  # the upgraded hub starts counting afresh
        self._send({"type": "drained", "peer": peer, "session_id": session_id,
                    "attachment_id": attachment_id, "token": token, "frames": frames})

    async def attach(self, peer, session_id, attachment_id, token, cols, rows, command,
                     require_existing, input_seq_ack, reserved=None, resume_from=None,
                     wants_exit_status=False, env=None) -> dict:
        params = {
            "peer": peer, "session_id": session_id, "attachment_id": attachment_id,
            "token": token, "cols": cols, "rows": rows, "command": command,
            "require_existing": require_existing, "input_seq_ack": input_seq_ack,
            "resume_from": resume_from, "wants_exit_status": wants_exit_status}
        if env is not None:  # only then: a hub older than the front door takes the rest
            params["env"] = env
        return await self._call("attach", params, reserved=reserved)

    async def cancel(self, peer, session_id, attachment_id, token) -> None:
        await self._call("cancel", {"peer": peer, "session_id": session_id,
                                    "attachment_id": attachment_id, "token": token})

    def write(self, peer, session_id, attachment_id, token, data: bytes, seq, notification):
        lease = self.leases.get(session_id)
        att = lease.find(attachment_id, token) if lease is not None else None
        if att is not None:
            try:
                return lease.write(att, data, seq, notification)
            except RPCError as exc:
                if not notification or exc.code not in (PTY_INPUT_SEQ_GAP, PTY_INPUT_QUEUE_FULL):
                    raise
                self._refuse_notification(lease, att, exc.code, exc.message)
                return {"written": 0}
        if self.upgrading and notification:
            if self.held_bytes + len(data) > LINK_HIGH_WATER:
                raise RPCError(PTY_INPUT_QUEUE_FULL, MSG_QUEUE_FULL)
            self.held.append(({"type": "call", "rid": 0, "method": "write", "quiet": True,
                               "params": {"peer": peer, "session_id": session_id,
                                          "attachment_id": attachment_id, "token": token,
                                          "seq": seq, "notification": True}}, data))
            self.held_bytes += len(data)
            return {"written": len(data)}
        if self.channel is None or not self.connected.is_set():
            if notification:
                raise RPCError(UNAVAILABLE, MSG_NO_HUB)
        elif self.link_full():
            raise RPCError(PTY_INPUT_QUEUE_FULL, MSG_QUEUE_FULL)
        params = {"peer": peer, "session_id": session_id, "attachment_id": attachment_id,
                  "token": token, "seq": seq, "notification": notification}
        if not notification:
            return self._call("write", params, payload=data)
        # A notification is answered only if it fails, by a pty.error the hub sends: no
        # round trip on the keystroke path.
        self._send({"type": "call", "rid": 0, "method": "write", "params": params,
                    "quiet": True}, data)
        return {"written": len(data)}

    def resize(self, peer, session_id, attachment_id, token, cols, rows):
        return self._call("resize", {"peer": peer, "session_id": session_id,
                                     "attachment_id": attachment_id, "token": token,
                                     "cols": cols, "rows": rows})

    def detach(self, peer, session_id, attachment_id, token):
        return self._call("detach", {"peer": peer, "session_id": session_id,
                                     "attachment_id": attachment_id, "token": token})

    def close(self, session_id):
        return self._call("close", {"session_id": session_id})

    def list(self, command: bool = False, idle: bool = False, offsets: bool = False):
        return self._call("list", {"command": command, "idle": idle, "offsets": offsets})

    def cli_subscribe(self, peer, push):
        """Kept here too, so a new hub learns it again when the link comes back."""
        self.cli_pushers[peer] = push
        return self._call("cli_subscribe", {"peer": peer})

    def cli_response(self, peer, request_id, ok, data, error=None):
        return self._call("cli_response", {
            "peer": peer, "request_id": request_id, "ok": ok,
            "data_base64": None if data is None else b64(data), "error": error})


def _logged(fut: asyncio.Future) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.warning("could not subscribe a connection to the CLI bridge again: %s",
                    fut.exception())
