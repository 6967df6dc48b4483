"""The supervisor process: listeners, gate, pool, control socket and signals, wired together.

It runs no RPC handler: whatever a handler does, the listeners stay up.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections import Counter

from .. import __version__
from ..auth import AuthError, Credentials, server_credentials
from ..local_sockets import LocalSocketError, make_state_dir
from .control import ControlServer
from .gate import Gate
from .listeners import Listener, ListenerError
from .notify import Notifier, pool_healthy, status_line
from .pool import WorkerPool

log = logging.getLogger("cmuxd.supervisor")

STOP_DRAIN = 1.0  # seconds accepted connections get to finish before a stop closes them


class Supervisor:
    def __init__(self, config, listeners: list[Listener], creds: Credentials | None,
                 secret_env: dict | None = None):
        self.config = config
        self.listeners = listeners
        self.creds = creds
        self.secret_env = secret_env or {}  # token variables taken out of os.environ
        self.counters: Counter = Counter()
        self.started = time.time()
        self.pool = WorkerPool(config, counters=self.counters)
        self.immediate = False
        self.gate = Gate(listeners, creds, self.pool, config, self.counters)
        self.control = ControlServer(config.control_path, self.status)
        self.stop_requested: asyncio.Event | None = None
        self.notifier = Notifier()  # sd_notify; does nothing without NOTIFY_SOCKET

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.stop_requested = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_requested.set)
        loop.add_signal_handler(signal.SIGQUIT, self.stop_now)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        loop.add_signal_handler(signal.SIGTTIN, self.pool.scale, 1)
        loop.add_signal_handler(signal.SIGTTOU, self.pool.scale, -1)
        # The state directory holds the control and PTY hub sockets: it must be ours alone,
        # and used by no other daemon, or keystrokes could reach someone else's hub.
        try:
            make_state_dir(self.config.state_dir)
            await self.control.start()
        except (LocalSocketError, ListenerError) as exc:
            log.error("%s", exc if isinstance(exc, LocalSocketError) else
                      f"state directory {self.config.state_dir}: {exc}; pass another --state-dir")
            for listener in self.listeners:
                listener.close()
            return 1
        self.pool.start()
        self.gate.start()
        for listener in self.listeners:
            auth = "relay-token auth" if listener.kind == "tcp" or self.config.unix_auth == "token" \
                else "peer uid check"
            log.info("listening on %s %s (%s, %s)", listener.kind, listener.address,
                     listener.origin, auth)
        log.info("cmuxd %s serving with %d workers", __version__, self.config.workers)
        self.notifier.start(lambda: status_line(self.listeners, self.pool),
                            lambda: pool_healthy(self.pool))
        if not await self.pool.wait_ready():
            log.warning("not every worker reported in within 10 s; serving with those that did")
        self.notifier.ready()
        await self.stop_requested.wait()
        log.info("stopping")
        await self.shutdown()
        return 0

    def stop_now(self) -> None:
        """SIGQUIT: stop without letting workers finish the requests they have read."""
        self.immediate = True
        self.stop_requested.set()

    def reload(self) -> None:
        """SIGHUP: re-read the token, start a new generation of workers; the old one keeps
        its open connections until they close or --graceful-timeout passes."""
        if self.pool.stopping:
            return
        log.info("reloading")
        self.notifier.reloading()
        try:
            if self.creds is not None:
                self.creds = server_credentials(self.config.token_file, self.config.relay_id,
                                                env={**os.environ, **self.secret_env})
                self.gate.creds = self.creds
        except AuthError as exc:
            log.error("reload: keeping the old token: %s", exc)
        self.pool.reload()
        log.info("reloaded: generation %d serves new connections", self.pool.generation)
        self.notifier.ready()

    async def shutdown(self) -> None:
        self.notifier.stopping()
        if not self.immediate:
            await self.gate.drain(STOP_DRAIN)
        self.gate.stop()
        for listener in self.listeners:
            listener.close()
        await self.pool.stop(graceful=not self.immediate)
        self.control.close()
        self.notifier.close()
        log.info("stopped")

    def status(self) -> dict:
        return {
            "pid": os.getpid(),
            "version": __version__,
            "uptime": round(time.time() - self.started, 3),
            "relay_id": self.creds.relay_id if self.creds else None,
            "listeners": [
                {"kind": l.kind, "address": l.address, "origin": l.origin} for l in self.listeners
            ],
            "workers": self.pool.snapshot(),
            "counters": dict(self.counters),
            "generation": self.pool.generation,
            "connections": self.pool.total_load(),
            "handshakes_in_flight": self.gate.in_flight,
        }

