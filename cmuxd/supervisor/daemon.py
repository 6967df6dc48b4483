"""The supervisor process: listeners, gate, pool, control socket and signals, wired together.

It runs no RPC handler: whatever a handler does, the listeners stay up.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter

import orjson

from .. import __version__, devices
from ..auth import (FAILURE_DELAY, PREAUTH_TIMEOUT, AuthError, Credentials, parse_token,
                    server_credentials)
from ..local_sockets import LocalSocketError, make_state_dir
from .control import ControlError, ControlServer
from .gate import Gate
from . import handover
from .hub_keeper import HubKeeper
from .listeners import Listener, ListenerError, bind_unix
from .notify import Notifier, pool_healthy, status_line
from .pool import WorkerPool

log = logging.getLogger("cmuxd.supervisor")

STOP_DRAIN = 1.0  # seconds accepted connections get to finish before a stop closes them
MAX_GRACE = 7 * 86400.0  # a rotated-out token is accepted for a week at most
LAST_USED_WRITE_INTERVAL = 60.0  # "last used" of devices reaches the disk at most this often


class Supervisor:
    def __init__(self, config, listeners: list[Listener], creds: Credentials | None,
                 secret_env: dict | None = None, adopted: dict | None = None):
        self.config = config
        self.adopted = adopted
        """The state a previous image of this process handed over when it re-executed."""
        self.listeners = listeners
        self.creds = creds
        self.secret_env = secret_env or {}  # token variables taken out of os.environ
        self.counters: Counter = Counter()
        self.started = time.time()
        self.pool = WorkerPool(config, counters=self.counters)
        self.hub = HubKeeper(config, self.counters, adopt_only=config.external_hub)
        self._hub_ticks: asyncio.Task | None = None
        self.immediate = False
        self.gate = Gate(listeners, creds, self.pool, config, self.counters)
        self.control = ControlServer(config.control_path, {
            "status": lambda request: self.status(),
            "rotate_token": self.rotate_token,
            "devices_changed": lambda request: self.load_devices(),
            "devices": lambda request: self.device_status(),
        })
        self.last_used: dict[str, dict] = devices.read_last_used()  # name -> {"at", "from"}
        self._last_used_timer: asyncio.TimerHandle | None = None
        self.gate.on_device = self._device_used
        self.replaced_token: bytes | None = None  # the token `token rotate` last replaced
        self.previous_until: float | None = None  # wall clock, for status
        self.front: Listener | None = None  # serve --stdio hands its pipes over here
        self.stop_requested: asyncio.Event | None = None
        # sd_notify; does nothing without NOTIFY_SOCKET (kept in the handover across exec)
        self.notifier = Notifier(dict(adopted["notify"])) if adopted else Notifier()

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
            if self.adopted:
                await self.control.start(handover.adopt_listener(self.adopted["control"]))
                self.front = handover.adopt_listener(self.adopted["front"])
            else:
                await self.control.start()
                self.front = front_door(self.config.front_path)
        except (LocalSocketError, ListenerError) as exc:
            log.error("%s", exc if isinstance(exc, LocalSocketError) else
                      f"state directory {self.config.state_dir}: {exc}; pass another --state-dir")
            for listener in self.listeners:
                listener.close()
            return 1
        try:
            self.load_devices()
        except AuthError as exc:
            log.error("%s", exc)
            self.control.close()
            self.front.close()
            for listener in self.listeners:
                listener.close()
            return 1
        if self.adopted:
            self._adopt(self.adopted)
        self._hub_ticks = loop.create_task(self._watch_hub())
        if self.adopted:
            self.pool.adopt(self.adopted["pool"])
        else:
            self.pool.start()
        self.gate.listeners = [*self.listeners, self.front]
        self.gate.start()
        if self.adopted:
            log.info("cmuxd %s took over from %s in place (pid %d): generation %d serves new "
                     "connections; %d older worker(s) keep theirs until they close",
                     __version__, self.adopted["version"], os.getpid(), self.pool.generation,
                     sum(w.state == "retiring" for w in self.pool.workers))
            self.adopted = None
        else:
            for listener in self.listeners:
                auth = "relay-token auth" if listener.kind == "tcp" \
                    or self.config.unix_auth == "token" else "peer uid check"
                log.info("listening on %s %s (%s, %s)", listener.kind, listener.address,
                         listener.origin, auth)
            log.info("serve --stdio of this user hands its stdin and stdout over %s",
                     self.front.address)
            log.info("cmuxd %s serving with %d workers", __version__, self.config.workers)
        self.notifier.start(lambda: status_line(self.listeners, self.pool),
                            lambda: pool_healthy(self.pool))
        await self._ready()
        await self.stop_requested.wait()
        log.info("stopping")
        await self.shutdown()
        return 0

    async def _ready(self) -> None:
        if not await self.pool.wait_ready():
            log.warning("not every worker reported in within 10 s; serving with those that did")
        self.notifier.ready()

    def _adopt(self, state: dict) -> None:
        """Go on from where the previous image of this process stopped (pool and hub aside)."""
        self.started = state["started"]
        self.counters.update(state["counters"])
        self.gate.next_id = state["next_id"]
        self.last_used.update(state["last_used"])
        rotation = state["rotation"]
        if rotation["replaced_token"] is not None:
            self.replaced_token = bytes.fromhex(rotation["replaced_token"])
        if rotation["previous"] is not None and rotation["previous_for"]:
            # rotate() makes the token in use now the accepted previous one, for the rest of
            # its grace period.
            previous = bytes.fromhex(rotation["previous"])
            self.gate.creds = Credentials(self.creds.relay_id, previous)
            self.gate.rotate(self.creds, rotation["previous_for"])
            self.previous_until = rotation["previous_until"]
        self.hub.adopt(state["hub"])

    async def _watch_hub(self) -> None:
        """Find or start the hub beside the workers (they reach it on their own), then
        watch it."""
        await self.hub.start()
        while True:
            await asyncio.sleep(1.0)
            self.hub.tick(time.monotonic())

    def stop_now(self) -> None:
        """SIGQUIT: stop without letting workers finish the requests they have read."""
        self.immediate = True
        self.stop_requested.set()

    def reload(self) -> None:
        if not self.pool.stopping:
            asyncio.get_running_loop().create_task(self._reload())

    async def _reload(self) -> None:
        """SIGHUP: re-read the token, start a new generation of workers (fresh interpreters:
        they run the code installed now); the old one keeps its open connections until they
        close or --graceful-timeout passes. The PTY hub re-executes itself into the code
        installed now, keeping its sessions."""
        if self.pool.stopping:
            return
        log.info("reloading")
        self.notifier.reloading()
        problem, installed = await preflight(handover.redacted(self._state()))
        if problem:
            self.counters["reloads_refused"] += 1
            log.error("reload refused, nothing changed: the code now installed %s", problem)
            self.notifier.ready()
            return
        try:
            if self.creds is not None:
                creds = server_credentials(self.config.token_file, self.config.relay_id,
                                           env={**os.environ, **self.secret_env})
                if creds.token == self.replaced_token:
                    # A systemd credential is copied only at start: it still holds the token
                    # `token rotate` replaced, and going back to it would undo the rotation.
                    log.info("reload: %s still holds the token replaced by `token rotate`; "
                             "keeping the rotated one", creds.source)
                else:
                    self.creds = self.gate.creds = creds
        except AuthError as exc:
            log.error("reload: keeping the old token: %s", exc)
        try:
            self.load_devices()
        except AuthError as exc:
            log.error("reload: keeping the device keys as they were: %s", exc)
        upgrade = installed != __version__
        self.pool.reload(upgrade=upgrade)
        hub_asked = self.hub.upgrade()
        if upgrade:
            await self._reexec(installed, hub_asked)
            if self.pool.stopping or self.stop_requested.is_set():
                return
        if upgrade:
            log.info("upgraded to %s: generation %d serves new connections; the old one keeps "
                     "its open connections until they close (this supervisor could not "
                     "re-execute and goes on with %s until the next restart)", installed,
                     self.pool.generation, __version__)
        else:
            log.info("reloaded: generation %d serves new connections", self.pool.generation)
        self.notifier.ready()

    async def _reexec(self, installed: str, hub_asked: bool) -> None:
        """Replace this process's code with the code installed now, keeping its pid, its
        listeners, its workers (channels, counts, fds in flight) and its token; returns only
        if exec failed, with everything as it was.

        The new worker generation and the hub's upgrade are on their way already: they
        start while this process execs. Handshakes in flight are finished first, not
        carried: accepting stops, so new connections wait in the listen backlog, and the ones
        in flight end (handed to a worker, refused, or timed out) within PREAUTH_TIMEOUT.
        Control requests being answered finish too (each has a deadline of its own)."""
        log.info("upgrading to %s: the supervisor re-executes itself in place (pid %d)",
                 installed, os.getpid())
        loop = asyncio.get_running_loop()
        self.gate.stop_accepting()
        control_fd = await self.control.pause()
        deadline = loop.time() + PREAUTH_TIMEOUT + FAILURE_DELAY + 1.0
        while (self.gate.in_flight or self.control.serving) and loop.time() < deadline:
            await asyncio.sleep(0.005)
        if self.stop_requested.is_set():
            await self._resume(control_fd)
            return
        state = self._handover_state(control_fd, hub_asked)
        listener_fds = [*(l.sock.fileno() for l in self.listeners), self.front.sock.fileno(),
                        control_fd]
        state_fd = None
        try:
            state_fd = handover.write_state(state)
            for fd in listener_fds:
                os.set_inheritable(fd, True)
            handover.reexec(state_fd)
        except OSError as exc:
            log.error("could not re-execute the supervisor (%s); it goes on with %s",
                      exc.strerror or exc, __version__)
            self.counters["reexecs_failed"] += 1
        if state_fd is not None:
            os.close(state_fd)
        for fd in listener_fds[:-1]:
            os.set_inheritable(fd, False)
        await self._resume(control_fd)

    def _handover_state(self, control_fd: int, hub_asked: bool) -> dict:
        """Hand the pool and the hub over (their fds inheritable from now on) and say the
        rest of what the next image goes on with."""
        if self._hub_ticks is not None:
            self._hub_ticks.cancel()
        if self._last_used_timer is not None:
            self._last_used_timer.cancel()
            self._last_used_timer = None
        self.notifier.close()
        return dict(self._state(control_fd), pool=self.pool.handover(),
                    hub=self.hub.handover(hub_asked))

    def _state(self, control_fd: int | None = None) -> dict:
        creds = self.creds
        previous = self.gate.previous
        loop = asyncio.get_running_loop()
        return {
            "format": handover.FORMAT, "version": __version__,
            "listeners": [handover.listener_state(l) for l in self.listeners],
            "front": handover.listener_state(self.front),
            "control": handover.listener_state(self.control.listener, control_fd),
            "creds": None if creds is None else {
                "relay_id": creds.relay_id, "token": creds.token.hex(), "source": creds.source,
                "path": creds.path, "origin": creds.origin},
            "secret_env": self.secret_env,
            "rotation": {
                "replaced_token": self.replaced_token.hex() if self.replaced_token else None,
                "previous": previous.hex() if previous else None,
                "previous_for": max(0.0, self.gate.previous_until - loop.time())
                if previous else None,
                "previous_until": self.previous_until if previous else None},
            "counters": dict(self.counters), "started": self.started,
            "next_id": self.gate.next_id, "notify": self.notifier.inherited,
            "last_used": self.last_used,
            "pool": self.pool.state(),
            "hub": {"pid": None, "spawned_at": 0.0, "streak": 0, "upgrading": False},
        }

    async def _resume(self, control_fd: int) -> None:
        """Exec failed (or a stop came first): serve on as before."""
        self.pool.resume()
        self.hub.resume()
        os.set_inheritable(control_fd, False)
        self.control.listener.sock = socket.socket(fileno=control_fd)
        await self.control.start(self.control.listener)
        self.gate.start()
        if self._hub_ticks is not None:
            self._hub_ticks.cancel()
        self._hub_ticks = asyncio.get_running_loop().create_task(self._watch_hub())
        self.notifier.close()
        self.notifier.start(lambda: status_line(self.listeners, self.pool),
                            lambda: pool_healthy(self.pool))

    def rotate_token(self, request: dict) -> dict:
        """`token rotate`: take the new token sent over the control socket (the token file
        is rewritten already; under systemd the service only ever sees a snapshot of it)."""
        if self.creds is None:
            raise ControlError("this daemon runs without a relay token (it serves only Unix "
                               "sockets with the peer uid check); there is nothing to rotate")
        grace = request.get("grace")
        if type(grace) not in (int, float) or not 0 <= grace <= MAX_GRACE:
            raise ControlError(f"the grace period must be 0 to {MAX_GRACE:.0f} seconds")
        text = request.get("token")
        try:
            token = parse_token(text if type(text) is str else "", source="the new token")
        except AuthError as exc:
            raise ControlError(str(exc)) from None
        if token == self.creds.token:
            raise ControlError("the new token is the one the daemon uses already")
        self.replaced_token = self.creds.token
        self.creds = Credentials(self.creds.relay_id, token,
                                 "token from `token rotate`, relay id as before",
                                 self.creds.path, self.creds.origin)
        self.gate.rotate(self.creds, grace)
        self.previous_until = time.time() + grace if grace else None
        if grace:
            log.info("relay token rotated; the previous one is accepted for new connections "
                     "for %.0f s more", grace)
        else:
            log.info("relay token rotated; the previous one is no longer accepted")
        return {"previous_token_until": self.previous_until}

    def load_devices(self) -> dict:
        """Read the host key and the authorized devices (at start, on reload, and when
        `device add` or `device revoke` says they changed); the connections of a device no
        longer authorized are closed at once."""
        loaded = devices.load_host_devices()
        before = set(self.gate.devices.devices) if self.gate.devices else set()
        self.gate.devices = loaded
        now = set(loaded.devices) if loaded else set()
        for name in sorted(before - now):
            log.info("device %s revoked: closing its connections", name,
                     extra={"DEVICE": name})
            self.pool.close_device(name)
        if loaded is not None and not before:
            log.info("device keys taken (host key %s, %d device(s))", loaded.host_fp,
                     len(now))
        return {"devices": len(now), "revoked": sorted(before - now)}

    def _device_used(self, name: str, peer: str) -> None:
        self.last_used[name] = {"at": round(time.time()), "from": peer}
        if self._last_used_timer is None:
            self._last_used_timer = asyncio.get_running_loop().call_later(
                LAST_USED_WRITE_INTERVAL, self._write_last_used)

    def _write_last_used(self) -> None:
        self._last_used_timer = None
        try:
            devices.write_last_used(self.last_used)
        except OSError as exc:
            log.warning("could not record when devices were last used: %s", exc)

    def device_status(self) -> dict:
        live: Counter = Counter()
        for worker in self.pool.workers:
            live.update(worker.devices)
        return {"connections": dict(live), "last_used": self.last_used}

    def _previous_token_until(self) -> float | None:
        return self.previous_until if self.gate.previous is not None else None

    async def shutdown(self) -> None:
        self.notifier.stopping()
        if not self.immediate:
            await self.gate.drain(STOP_DRAIN)
        self.gate.stop()
        for listener in self.gate.listeners:
            listener.close()
        await self.pool.stop(graceful=not self.immediate)
        if self._hub_ticks is not None:
            self._hub_ticks.cancel()
        self.hub.stop()
        if self._last_used_timer is not None:
            self._last_used_timer.cancel()
            self._write_last_used()
        self.control.close()
        self.notifier.close()
        log.info("stopped")

    def status(self) -> dict:
        return {
            "pid": os.getpid(),
            "version": __version__,
            "uptime": round(time.time() - self.started, 3),
            "relay_id": self.creds.relay_id if self.creds else None,
            "token_origin": self.creds.origin if self.creds else None,
            "token_file": self.creds.path if self.creds else None,
            "previous_token_until": self._previous_token_until(),
            "listeners": [
                {"kind": l.kind, "address": l.address, "origin": l.origin} for l in self.listeners
            ],
            "workers": self.pool.snapshot(),
            "counters": dict(self.counters),
            "generation": self.pool.generation,
            "connections": self.pool.total_load(),
            "pty_sessions": self.hub.sessions,
            "hub": self.hub.snapshot(),
            "handshakes_in_flight": self.gate.in_flight,
            "devices_only": self.config.devices_only,
            "device_connections": self.device_status()["connections"],
        }


def front_door(path) -> Listener:
    """The socket `serve --stdio` of our user hands its stdin and stdout over. A socket of
    its own, not a marker on the Unix listeners: their clients keep getting no preamble and
    no extra read before their handoff."""
    listener = bind_unix(str(path), "the front door socket")
    listener.kind = "front"
    return listener


PREFLIGHT_TIMEOUT = 30.0


PREFLIGHT = ("import sys, cmuxd, cmuxd.worker, cmuxd.hub_process, cmuxd.cli, "
             "cmuxd.supervisor.handover as h\n"
             "status = h.main()\nprint(cmuxd.__version__)\nsys.exit(status)")


async def preflight(state: dict) -> tuple[str | None, str]:
    """Import what a reload starts (workers, the hub, the supervisor itself) in a fresh
    interpreter, from the code installed now, and have it check it can adopt `state` (secrets
    replaced): the reason it cannot (or None), and its version. A broken upgrade is refused
    before any process is replaced by it."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-P", "-c", PREFLIGHT,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/")
    try:
        out, err = await asyncio.wait_for(proc.communicate(orjson.dumps(state)),
                                          PREFLIGHT_TIMEOUT)
    except TimeoutError:
        proc.kill()
        return f"did not import within {PREFLIGHT_TIMEOUT:.0f} s", ""
    if proc.returncode != 0:
        lines = err.decode("utf-8", "replace").strip().splitlines()
        return f"does not import: {lines[-1] if lines else f'status {proc.returncode}'}", ""
    return None, out.decode().strip()
