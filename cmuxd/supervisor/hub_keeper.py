"""The supervisor's side of the PTY hub: find it, or start it, and watch it.

The hub owns the terminal sessions users cannot get back, so it does not live and die with
the supervisor. At start the supervisor adopts a hub already serving its state directory
(one of its own uid speaking the link version it knows: the hub a stopped or restarted
daemon left running, or the one a separate unit runs outside the daemon's sandbox); only
when there is none does it start one, in a session of its own, so that stopping the daemon
does not stop it. Watching happens over a supervisor link on the hub's own socket: pings
answered with the session count, the hub's pid and version, and `upgrade` on reload, which
makes the hub re-execute its (possibly new) code in place with its sessions.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import time
from collections import Counter

import orjson

from .. import __version__
from ..hub_link import LINK_VERSION, hub_socket_path
from ..link_channel import MessageChannel
from .child import Child
from .pool import CHILD_CWD, child_command, respawn_delay
from ..local_sockets import LocalSocketError, check_server, check_state_dir

log = logging.getLogger("cmuxd.supervisor")

LINK_MAX_FRAME = 1 << 20
START_WAIT = 10.0
"""How long a hub we started may take to open its socket."""


class HubKeeper:
    def __init__(self, config, counters: Counter, adopt_only: bool = False):
        self.config = config
        self.counters = counters
        self.adopt_only = adopt_only
        """Never start a hub: one runs elsewhere (its own unit) and is adopted when it comes."""
        self.path = hub_socket_path(config.state_dir)
        self.channel: MessageChannel | None = None
        self.proc: Child | None = None
        """The hub we started, while it runs as our child (reaped by us)."""
        self.pid = 0
        self.version = ""
        self.sessions = 0
        self.upgrades_refused = 0
        self.last_pong = 0.0
        self.lost_at: float | None = time.monotonic()
        self.stopping = False
        self.spawned_at = 0.0
        self.streak = 0
        """Quick deaths in a row of hubs we started: each doubles the wait for the next."""
        self.respawn_at = 0.0
        self._connecting: asyncio.Task | None = None
        self.upgrade_on_adopt: bool | None = None
        """After a re-exec, what to ask the hub adopted at start: True, to upgrade even at
        our version (its code may have changed as well); False, nothing (the previous image
        asked already, and the hub may still be at it); None: upgrade if it runs other code."""

    async def start(self) -> None:
        if await self._connect():
            log.info("adopted the PTY hub serving %s (pid %d, %s): its %d session(s) go on",
                     self.path, self.pid, self.version or "?", self.sessions)
            asked, self.upgrade_on_adopt = self.upgrade_on_adopt, None
            if asked:
                self.upgrade()
            elif asked is None and self.version != __version__:
                # A restart is how new code at a new path (a Nix store path) arrives.
                log.info("the PTY hub runs %s; asking it to upgrade in place to %s",
                         self.version, __version__)
                self.upgrade()
            return
        if self.adopt_only:
            log.warning("no PTY hub serves %s yet; PTY sessions are unavailable until its unit "
                        "starts it", self.path)
            return
        self._spawn()
        deadline = time.monotonic() + START_WAIT
        while time.monotonic() < deadline and not self.stopping:
            if await self._connect():
                return
            if self.proc is not None and self.proc.poll() is not None:
                break
            await asyncio.sleep(0.02)
        log.error("the PTY hub did not start; PTY sessions are unavailable (see above)")

    def _spawn(self) -> None:
        cmd = child_command("cmuxd.hub_process",
                            "--config", orjson.dumps(self.config.worker_json()).decode())
        # Its own session: a stop of this daemon (or of its process group) leaves it running.
        self.proc = Child.start(cmd, stdin=subprocess.DEVNULL, close_fds=True,
                                start_new_session=True, cwd=CHILD_CWD)
        self.proc.watch(self._exited)
        self.lost_at = self.spawned_at = time.monotonic()
        log.info("PTY hub started (pid %d)", self.proc.pid)

    async def _connect(self) -> bool:
        """Open the supervisor link to the hub on our state directory; False if none answers
        as it should."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            check_state_dir(self.path.parent)
            await asyncio.wait_for(loop.sock_connect(sock, str(self.path)), 2.0)
            check_server(sock, self.path)
        except LocalSocketError as exc:
            log.error("not using the PTY hub: %s", exc)
            sock.close()
            return False
        except (OSError, TimeoutError):
            sock.close()
            return False
        hello: asyncio.Future = loop.create_future()

        def on_message(msg: dict, fds: list[int], payload) -> None:
            for fd in fds:
                os.close(fd)
            if not hello.done():
                hello.set_result(msg)
            else:
                self._handle(msg)

        channel = MessageChannel(sock, on_message, lambda: self._lost(channel, hello),
                                 LINK_MAX_FRAME)
        channel.send({"type": "hello", "version": LINK_VERSION, "role": "supervisor"})
        try:
            msg = await asyncio.wait_for(asyncio.shield(hello), 5.0)
        except (TimeoutError, ConnectionError):
            channel.close()
            return False
        if msg.get("type") != "hello":
            log.error("the PTY hub on %s refused this daemon: %s", self.path,
                      msg.get("reason", "no reason given"))
            channel.close()
            return False
        self.channel = channel
        self._handle(msg)
        self.lost_at = None
        return True

    def _lost(self, channel: MessageChannel, hello: asyncio.Future) -> None:
        if not hello.done():
            hello.set_exception(ConnectionError("closed"))
        if self.channel is channel:
            self.channel = None
            self.lost_at = time.monotonic()
            if not self.stopping:
                log.warning("lost the PTY hub (pid %d); looking for it again", self.pid)

    def _handle(self, msg: dict) -> None:
        kind = msg.get("type")
        if kind in ("hello", "pong"):
            self.pid = msg.get("pid", self.pid)
            self.version = msg.get("code_version", self.version)
            self.sessions = msg.get("sessions", self.sessions)
            self.upgrades_refused = msg.get("upgrades_refused", self.upgrades_refused)
            self.last_pong = time.monotonic()

    def _exited(self, child: Child) -> None:
        """The hub we started ended (its pidfd said so)."""
        if child is not self.proc:
            return
        log.error("the PTY hub (pid %d) exited with status %s; its sessions are lost",
                  child.pid, child.returncode)
        now = time.monotonic()
        quick = now - self.spawned_at < 5
        self.streak = self.streak + 1 if quick else 0
        self.respawn_at = now + respawn_delay(self.streak)
        self.proc = None
        self.counters["hub_restarts"] += 1
        self.sessions = 0

    def tick(self, now: float) -> None:
        """Ping the hub; find it again after it went away (an upgrade re-executes it, which
        drops our link for a moment); start a new one when it is gone for good."""
        if self.stopping:
            return
        if self.channel is not None:
            if now - self.last_pong > self.config.worker_timeout:
                self._kill_hung(now)
                return
            self.channel.send({"type": "ping"})
            return
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.get_running_loop().create_task(self._find_again(now))

    def _kill_hung(self, now: float) -> None:
        """A hub whose loop stopped answering: SIGABRT first, so faulthandler puts its
        traceback in the log, then SIGKILL; its sessions are lost either way, and a new hub
        takes new ones."""
        log.warning("the PTY hub (pid %d) has not answered for %.0f s; killing it", self.pid,
                    now - self.last_pong)
        self._process().abort()
        self.channel.close()
        if self.proc is None:
            self.counters["hub_restarts"] += 1  # ours is counted when it is reaped

    async def _find_again(self, now: float) -> None:
        if await self._connect():
            log.info("PTY hub found again (pid %d, %s)", self.pid, self.version)
            return
        gone_for = now - (self.lost_at or now)
        hub_alive = self.proc is not None and self.proc.poll() is None
        if hub_alive and gone_for > self.config.worker_timeout and not self.stopping:
            log.warning("the PTY hub (pid %d) has not answered for %.0f s; killing it",
                        self.proc.pid, gone_for)
            self.proc.abort()
            self.lost_at = time.monotonic()
            return
        if (not self.adopt_only and not hub_alive and gone_for > 1.0 and not self.stopping
                and time.monotonic() >= self.respawn_at):
            self.sessions = 0
            self._spawn()
            self.lost_at = time.monotonic()

    def _process(self) -> Child:
        """The hub's process: ours if we started it, else watched by pid only."""
        if self.proc is not None and self.proc.pid == self.pid:
            return self.proc
        return Child(self.pid, ours=False)

    def upgrade(self) -> bool:
        """Reload: the hub checks the code now installed and re-executes into it; False if
        there is no link to ask it over."""
        if self.channel is None:
            return False
        self.channel.send({"type": "upgrade"})
        return not self.channel.closed and not self.channel.out

    def handover(self, upgrading: bool) -> dict:
        """The supervisor re-executes itself: drop the link quietly (the next image links up
        again and adopts the hub); a hub we started stays our child, reaped by the next image.
        `upgrading`: the hub was just asked to upgrade."""
        self.stopping = True
        if self.channel is not None:
            self.channel.close()
        if self.proc is not None:
            self.proc.forget()
        return {"pid": self.proc.pid if self.proc is not None else None,
                "spawned_at": self.spawned_at, "streak": self.streak, "upgrading": upgrading}

    def adopt(self, state: dict) -> None:
        """Take over what handover() gave."""
        if state["pid"] is not None:
            self.proc = Child(state["pid"])
            self.proc.watch(self._exited)
        self.spawned_at = state["spawned_at"]
        self.streak = state["streak"]
        self.upgrade_on_adopt = not state["upgrading"]

    def resume(self) -> None:
        """The exec after handover() failed: watch the hub again."""
        self.stopping = False
        if self.proc is not None:
            self.proc.watch(self._exited)

    def stop(self) -> None:
        """The daemon stops; the hub does not (it ends on its own once it has no session)."""
        self.stopping = True
        if self.channel is not None:
            self.channel.close()

    def snapshot(self) -> dict:
        return {"pid": self.pid, "version": self.version, "sessions": self.sessions,
                "connected": self.channel is not None,
                "upgrades_refused": self.upgrades_refused}

