"""The gate: accepts every connection, authenticates it, and hands it to the pool.

It is the only code that reads bytes from a connection before authentication, so every
pre-auth limit lives here: the auth line size and deadline, the delayed failure reply,
the cap on handshakes in flight with each source's share of it, and the per-source
back-off after repeated failures.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import socket
import sys
import time
from collections import Counter, OrderedDict

from ..auth import (
    FAILURE_DELAY,
    MAX_AUTH_LINE,
    PREAUTH_TIMEOUT,
    Credentials,
    ServerHandshake,
)
from ..peercred import peer_uid
from .listeners import Listener, format_address
from .pool import NoWorkerError
from .sources import LOOPBACK, HandshakeTable, source_key

log = logging.getLogger("cmuxd.supervisor")

REFUSAL_LOG_INTERVAL = 10.0
ACCEPT_INHERITS_OPTIONS = sys.platform.startswith("linux")
BACKOFF_TABLE_MAX = 10000
EXPIRE_BATCH = 32
EXPIRE_PAUSE = 0.005
"""Expired handshakes are closed EXPIRE_BATCH per EXPIRE_PAUSE seconds at most (6,400/s)."""
NO_WORKER_REPLY = (
    b'{"ok":false,"error":{"code":"unavailable","message":"the daemon has no worker running '
    b'(they are being restarted); try again shortly"}}\n'
)

FRONT_TOKEN_REPLY = (
    b'{"ok":false,"error":{"code":"unavailable","message":"the daemon asks local clients for '
    b'the relay token (--unix-auth token), which the front door cannot give"}}\n'
)


class Backoff:
    """Failure counts per source (`sources.source_key`); a source past the threshold is
    refused at accept for a period that doubles on each further offence, so a flood from one
    host costs an accept and a close, not a handshake. Loopback is never counted: every
    local user shares it, so one of them could lock all the others out; its share of the
    handshake table still bounds what a local flood costs.

    Sources that were blocked live in a table of their own, so a churn of sources that
    merely failed (one failure each from many addresses) cannot push a blocked one out and
    reset its period."""

    def __init__(self, threshold: int, window: float, ceiling: float):
        self.threshold = threshold
        self.window = window
        self.ceiling = ceiling
        # source -> [count, first, until, period], least recently failed first
        self.counting: OrderedDict[str, list] = OrderedDict()  # never blocked
        self.punished: OrderedDict[str, list] = OrderedDict()  # blocked at least once

    def blocked(self, key: str, now: float) -> bool:
        entry = self.punished.get(key)
        return entry is not None and entry[2] > now

    def failure(self, key: str, now: float) -> None:
        if key == LOOPBACK:
            return
        entry = self.punished.get(key) or self.counting.get(key)
        if entry is None or now - entry[1] > max(self.window, entry[3] * 2):
            entry = [0, now, 0.0, entry[3] if entry else 0.0]
        entry[0] += 1
        if entry[0] >= self.threshold:
            entry[3] = min(self.ceiling, entry[3] * 2 if entry[3] else 1.0)
            entry[2] = now + entry[3]
            entry[0] = 0
            entry[1] = now
        if entry[3]:
            self.counting.pop(key, None)
            table = self.punished
        else:
            table = self.counting
        table[key] = entry
        table.move_to_end(key)
        if len(table) > BACKOFF_TABLE_MAX:
            table.popitem(last=False)

    def success(self, key: str) -> None:
        self.counting.pop(key, None)
        self.punished.pop(key, None)


class _Pending:
    """One connection between accept and the handshake's end."""

    __slots__ = ("conn", "fd", "hs", "peer", "host", "source", "started", "active", "timer")

    def __init__(self, conn: socket.socket, hs: ServerHandshake, peer: str, host: str | None,
                 source: str, started: float):
        self.conn = conn
        self.fd = conn.fileno()
        self.hs = hs
        self.peer = peer
        self.host = host
        self.source = source
        self.started = started
        self.active = started
        self.timer: asyncio.TimerHandle | None = None


class Gate:
    def __init__(self, listeners: list[Listener], creds: Credentials | None, pool, config,
                 counters: Counter):
        self.listeners = listeners
        self.creds = creds
        self.pool = pool
        self.config = config
        self.counters = counters
        self.in_flight = 0
        self.backoff = Backoff(config.backoff_failures, config.backoff_window, config.backoff_max)
        self.backlog_drained: set[int] = set()  # listener fds accepted down to EAGAIN once
        self.pending: dict[int, _Pending] = {}  # fd -> handshake waiting for its auth line
        self.table = HandshakeTable(config.max_handshakes)  # the pending that hold a slot
        # fd -> pending that lost its slot to a newcomer, oldest first: it gets its capacity
        # refusal when its auth line shows whether it understands `ext_busy`, or at its
        # deadline. Closing it sooner would only invite its reconnect: the churn of a flood
        # that reconnects at once is what costs the gate its CPU and good clients their time.
        self.evicted: OrderedDict[int, _Pending] = OrderedDict()
        self.evicted_limit = evicted_limit(config)
        self._deadline: asyncio.TimerHandle | None = None  # for the oldest entry of `pending`
        self.failing: dict[int, _Pending] = {}  # fd -> refused, waiting out FAILURE_DELAY
        self.next_id = 0
        # A token replaced by `token rotate`, accepted for new handshakes until `previous_until`
        # (loop time): devices not yet given the new one keep connecting meanwhile.
        self.previous: bytes | None = None
        self.previous_until = 0.0
        self._previous_timer: asyncio.TimerHandle | None = None
        self.devices = None  # devices.HostDevices: device keys are taken when it is set
        self.on_device = lambda name, peer: None  # an authorized device got through
        self._device_failures: Counter = Counter()  # fingerprint of an authorized key -> n
        self._refusals: Counter = Counter()
        self._refusal_logger: asyncio.TimerHandle | None = None
        self.uid = os.geteuid()
        self.limit_reply = (
            b'{"ok":false,"error":{"code":"unavailable","message":"the daemon is at its limit of '
            + str(config.max_connections).encode()
            + b' connections (--max-connections); try again later"}}\n'
        )

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        for listener in self.listeners:
            if listener.kind == "tcp":
                # Linux copies these to every accepted socket: set once, not per connection.
                _tune_tcp(listener.sock)
            loop.add_reader(listener.sock.fileno(), self._accept, listener)

    def rotate(self, creds: Credentials, grace: float) -> None:
        """Use `creds` for every new handshake from now on; the token they replace is still
        accepted for `grace` seconds (not at all for 0). Connections already authenticated
        are not touched: a token is checked once, at the handshake."""
        loop = asyncio.get_running_loop()
        if self._previous_timer is not None:
            self._previous_timer.cancel()
            self._previous_timer = None
        old, self.creds = self.creds, creds
        self.previous = old.token if grace > 0 and old is not None else None
        self.previous_until = loop.time() + grace if self.previous else 0.0
        if self.previous:
            self._previous_timer = loop.call_at(self.previous_until, self._previous_expired)

    def _previous_expired(self) -> None:
        self._previous_timer = None
        self.previous = None
        log.info("the previous relay token is no longer accepted")

    def stop(self) -> None:
        self.stop_accepting()
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        for pending in list(self.pending.values()) + list(self.failing.values()):
            self._settle(pending)
            pending.conn.close()
        self.pending.clear()
        self.table = HandshakeTable(self.config.max_handshakes)
        self.evicted.clear()
        self.failing.clear()
        self.in_flight = 0

    def stop_accepting(self) -> None:
        loop = asyncio.get_running_loop()
        for listener in self.listeners:
            try:
                loop.remove_reader(listener.sock.fileno())
            except (ValueError, OSError):
                pass

    async def drain(self, timeout: float) -> None:
        """Stop accepting, then give what was already accepted up to `timeout` seconds to
        finish: handshakes in flight complete and are handed off, short connections get their
        answers. New connections wait in the listen backlog meanwhile; under socket activation
        the service manager keeps that backlog for the next process, so a restart loses no
        connection attempt."""
        self.stop_accepting()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (self.in_flight or self.pool.total_load()) and loop.time() < deadline:
            await asyncio.sleep(0.01)

    def _accept(self, listener: Listener) -> None:
        for _ in range(128):
            try:
                conn, addr = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                # The backlog queued before start() is gone: later sockets inherit the options.
                self.backlog_drained.add(listener.sock.fileno())
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._refuse("fd_limit")
                    log.warning("accept failed: %s; raise the fd limit (LimitNOFILE=)", exc.strerror)
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                raise
            conn.setblocking(False)
            self.counters["accepted"] += 1
            if listener.kind == "unix":
                self._accept_unix(conn)
            elif listener.kind == "front":
                self._accept_front(conn)
            else:
                if not (ACCEPT_INHERITS_OPTIONS
                        and listener.sock.fileno() in self.backlog_drained):
                    try:
                        _tune_tcp(conn)
                    except OSError:  # reset by the peer already (macOS says EINVAL)
                        conn.close()
                        continue
                self._accept_tcp(conn, addr, format_address(conn.family, addr))

    def _accept_unix(self, conn: socket.socket) -> None:
        uid = peer_uid(conn)
        peer = f"uid {uid}"
        if self.config.unix_auth == "token":
            if self._admit(conn):
                self._start_handshake(conn, peer, None, peer)
        elif uid in (self.uid, 0):
            if self._admit(conn):
                self.counters["authenticated"] += 1
                self._hand_off(conn, "unix", peer, b"")
        else:
            self._refuse("peer_uid")
            conn.close()

    def _accept_front(self, conn: socket.socket) -> None:
        """A `serve --stdio` of our user handing over its stdin and stdout: a worker reads
        nothing but the handoff from it, so no byte of the connection passes here."""
        uid = peer_uid(conn)
        if uid not in (self.uid, 0):
            self._refuse("peer_uid")
            conn.close()
        elif self.config.unix_auth == "token":
            self._refuse("front_unix_auth")
            _send_and_close(conn, FRONT_TOKEN_REPLY)
        elif self._admit(conn):
            self.counters["authenticated"] += 1
            self._hand_off(conn, "front", f"uid {uid}", b"")

    def _accept_tcp(self, conn: socket.socket, addr, peer: str) -> None:
        host = addr[0]
        allow = self.config.allow
        if allow is not None and not allow.allows(host):
            # Before the challenge: a peer outside --allow-from learns nothing, not even that
            # a cmux relay listens here, and costs no handshake slot.
            self._refuse("not_allowed")
            conn.close()
            return
        source = source_key(host)
        if self.backoff.blocked(source, time.monotonic()):
            self._refuse("backoff")
            conn.close()
            return
        if self._admit(conn):
            self._start_handshake(conn, peer, host, source)

    def _admit(self, conn: socket.socket) -> bool:
        """Refuse, with a one-line reason, a connection there is no room for. Only peers that
        passed --allow-from, the back-off and the uid check get this far: the reason names
        our limits, which outsiders need not learn."""
        if self.pool.total_load() + self.in_flight >= self.config.max_connections:
            self._refuse("max_connections")
            _send_and_close(conn, self.limit_reply)
            return False
        if not self.pool.has_worker():
            # Workers are being restarted (crash back-off): authenticating the client only
            # to drop it would look like a daemon fault, so say so before the challenge.
            self._refuse("no_worker")
            _send_and_close(conn, NO_WORKER_REPLY)
            return False
        return True

    def _start_handshake(self, conn: socket.socket, peer: str, host: str | None,
                         source: str) -> None:
        """Challenge now; the rest runs from the loop's callbacks (data, deadline), with no
        task per connection: the gate's cost per connection is what bounds the accept rate.
        A full table never turns the newcomer away: an idle flood would then lock everyone
        out. The table drops the handshake idle longest of the source holding the most."""
        if self.creds is None:
            self._refuse("no_token")
            conn.close()
            return
        loop = asyncio.get_running_loop()
        self.in_flight += 1
        devices = self.devices
        hs = ServerHandshake(
            self.creds.token, self.creds.relay_id, previous=self.previous,
            devices=devices.keys if devices else None,
            host_key=devices.host_key if devices else None,
            host_fp=devices.host_fp if devices else "",
            token_allowed=host is None or not self.config.devices_only)
        pending = _Pending(conn, hs, peer, host, source, loop.time())
        try:
            conn.send(hs.challenge())
        except OSError:
            self._fail(pending, "io")
            return
        pending.started = pending.active = loop.time()  # the failure delay counts from here
        loop.add_reader(pending.fd, self._readable, pending)
        self.pending[pending.fd] = pending
        if self._deadline is None:
            self._deadline = loop.call_at(pending.started + PREAUTH_TIMEOUT, self._expire)
        dropped = self.table.add(pending)
        if dropped is not None:
            self._evict(dropped)

    def _evict(self, pending: "_Pending") -> None:
        """`pending` lost its slot: it stays, costing an fd but no CPU, until its auth line
        shows whether its refusal may say `ext_busy` or its deadline passes. The evicted are
        capped too (`evicted_limit`), oldest out first."""
        pending.hs.busy()
        self.counters["evicted"] += 1
        self.evicted[pending.fd] = pending
        if len(self.evicted) > self.evicted_limit:
            self._fail(next(iter(self.evicted.values())), "capacity")

    def _expire(self) -> None:
        """Fail the handshakes past the pre-auth deadline. `pending` is in the order the
        challenges went out, so one timer for its oldest entry serves every connection
        instead of a timer made and cancelled per connection. At most EXPIRE_BATCH go per
        pass, the rest a moment later: a flood opened at once expires at once and would
        reconnect at once, and a good client's connection waits behind every one of those
        in the listen backlog."""
        self._deadline = None
        loop = asyncio.get_running_loop()
        for _ in range(EXPIRE_BATCH):
            if not self.pending:
                return
            oldest = next(iter(self.pending.values()))
            if oldest.started + PREAUTH_TIMEOUT > loop.time():
                self._deadline = loop.call_at(oldest.started + PREAUTH_TIMEOUT, self._expire)
                return
            self._fail(oldest, "timeout")
        if self.pending:
            self._deadline = loop.call_later(EXPIRE_PAUSE, self._expire)

    def _readable(self, pending: "_Pending") -> None:
        try:
            data = pending.conn.recv(MAX_AUTH_LINE + 1)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._fail(pending, "io")
            return
        hs = pending.hs
        if data:
            hs.feed(data)
        else:
            hs.eof()
        if hs.state == "waiting":
            if pending.fd not in self.evicted:
                self.table.heard(pending, asyncio.get_running_loop().time())
            return
        if hs.state != "accepted":
            self._fail(pending, hs.reason or "refused")
            return
        self._settle(pending)
        self.in_flight -= 1
        conn = pending.conn
        try:
            conn.send(hs.reply)
        except OSError:
            self._refuse("io")
            conn.close()
            return
        self.counters["authenticated"] += 1
        if pending.host is not None:
            self.backoff.success(pending.source)
        if hs.device is not None:
            self.on_device(hs.device, pending.peer)
        self._hand_off(conn, "unix" if pending.host is None else "tcp", pending.peer,
                       hs.leftover, hs.device)

    def _settle(self, pending: "_Pending") -> None:
        """The handshake is decided: stop watching the socket (and a refusal's delay)."""
        if self.pending.pop(pending.fd, None) is not None:
            asyncio.get_running_loop().remove_reader(pending.fd)
            if self.evicted.pop(pending.fd, None) is None:
                self.table.remove(pending)
        if pending.timer is not None:
            pending.timer.cancel()

    def _fail(self, pending: "_Pending", reason: str) -> None:
        if pending.fd in self.evicted:
            reason = "capacity"
        if pending.hs.state == "waiting":
            pending.hs.fail(reason)
        self._settle(pending)
        if pending.host is not None and reason != "capacity":  # our limit, not the peer's
            self.backoff.failure(pending.source, time.monotonic())
        if pending.hs.device_fp is not None:
            # Only authorized keys have a fingerprint here: a bounded set, never a name an
            # attacker made up.
            self._device_failures[pending.hs.device_fp] += 1
        self._refuse(reason)
        loop = asyncio.get_running_loop()
        pending.timer = loop.call_at(pending.started + FAILURE_DELAY, self._send_failure,
                                     pending)
        self.failing[pending.fd] = pending

    def _send_failure(self, pending: "_Pending") -> None:
        self.failing.pop(pending.fd, None)
        self.in_flight -= 1
        _send_and_close(pending.conn, pending.hs.reply)

    def _hand_off(self, conn: socket.socket, kind: str, peer: str, leftover: bytes,
                  device: str | None = None) -> None:
        self.next_id += 1
        try:
            self.pool.dispatch(conn, kind, peer, leftover, self.next_id, device)
        except NoWorkerError as exc:
            log.warning("could not hand a connection to a worker: %s", exc)
            self._refuse("no_worker")
        except Exception:
            log.exception("could not hand a connection to a worker")
            self._refuse("no_worker")
        finally:
            conn.close()

    def _refuse(self, reason: str) -> None:
        """Count a refusal; the log gets one aggregated line per interval, not one per
        attacker packet."""
        self.counters["refused"] += 1
        self.counters["refused_" + reason] += 1
        self._refusals[reason] += 1
        if self._refusal_logger is None:
            self._refusal_logger = asyncio.get_running_loop().call_later(
                REFUSAL_LOG_INTERVAL, self._log_refusals
            )

    def _log_refusals(self) -> None:
        self._refusal_logger = None
        total = sum(self._refusals.values())
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(self._refusals.items()))
        if self._device_failures:
            detail += "; failed device keys: " + ", ".join(
                f"{fp}: {n}" for fp, n in sorted(self._device_failures.items()))
        log.warning("refused %d connection(s) in the last %.0f s (%s)", total,
                    REFUSAL_LOG_INTERVAL, detail)
        self._refusals.clear()
        self._device_failures.clear()


def evicted_limit(config) -> int:
    """How many evicted handshakes may wait out their deadline: a quarter of the connections
    the daemon may hold (--max-connections, and the fd limit, whichever is lower), and never
    fewer than the table holds."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    room = config.max_connections
    if soft != resource.RLIM_INFINITY:
        room = min(room, soft)
    return max(config.max_handshakes, room // 4)


def _tune_tcp(conn: socket.socket) -> None:
    """No Nagle delay for small RPC frames; keepalives so a peer that vanished while idle
    (a laptop asleep, a NAT mapping gone) frees its connection within minutes."""
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 15), ("TCP_KEEPCNT", 4)):
        if hasattr(socket, name):
            conn.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def _send_and_close(conn: socket.socket, data: bytes) -> None:
    try:
        conn.send(data)
    except OSError:
        pass
    _close_discarding(conn)


def _close_discarding(conn: socket.socket) -> None:
    """Close without a reset: unread bytes must not turn our reply into an RST."""
    try:
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(65536):
            pass
    except OSError:
        pass
    conn.close()
