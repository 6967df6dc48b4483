"""The PTY hub process: the one `Hub` of a daemon behind its socket, living apart from the
supervisor.

It outlives the daemon that started it, so that a stop and start, a restart of the unit or a
crash of the supervisor loses no terminal session: the next supervisor adopts it. It ends on
SIGTERM or a `stop` from the supervisor link (`cmuxd-remote hub stop`), ending every session.
A hub a daemon started also ends on its own once it has neither a session nor a link left; one
run by `hub run` (a unit) does not, since an `--external-hub` daemon never starts another.

An upgrade (SIGHUP, or `upgrade` from the supervisor's reload) re-executes the process in
place, same pid, so the session processes stay its children: the code now installed is first
imported by a fresh interpreter that also checks the state to be handed over (the pre-flight);
if that fails, nothing changes. Else every lent session is taken back, and the PTY masters,
the rings and the listening socket cross exec as inherited fds with the state in a memfd.
An exec that fails leaves the process running the old code, with everything it had.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import logging
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import orjson

from .fd_store import FdStore, store_address, take_stored
from .hub import Hub, check_state, watch_children_without_threads
from .hub_link import HubServer, hub_socket_path
from .local_sockets import LocalSocketError
from .memory import return_large_blocks

log = logging.getLogger("cmuxd.hub")

ALONE_GRACE = 2.0
"""Seconds with neither a session nor a link before the hub ends (a restarting daemon
reconnects well within it)."""
LEASE_TIMEOUT = 3.0
PREFLIGHT_TIMEOUT = 30.0


class HubProcess:
    def __init__(self, config: dict):
        self.config = config
        self.hub = Hub(scrollback=config.get("scrollback", 1 << 20),
                       idle_ttl=config.get("idle_ttl", 86400.0), shell=config.get("shell"),
                       cli_bridge=config.get("cli_bridge", True),
                       cli_dir=str(Path(config["state_dir"]) / "cli"))
        if config.get("notify_socket"):
            self.hub.fd_store = FdStore(config["notify_socket"])
        self.server = HubServer(self.hub, hub_socket_path(config["state_dir"]))
        self.server.on_upgrade = self.request_upgrade
        self.server.on_stop = self.request_stop
        self.server.on_link_closed = self.check_alone
        self.hub.on_session_end = self.check_alone
        self.done: asyncio.Future | None = None
        self.upgrading = False
        self._alone_timer: asyncio.TimerHandle | None = None

    async def run(self, adopted: tuple[dict, list[int]] | None, listen_fd: int | None) -> None:
        loop = asyncio.get_running_loop()
        self.done = loop.create_future()
        watch_children_without_threads()
        await self.server.start(listen_fd)
        if adopted is not None:
            self.hub.adopt_state(*adopted)
            log.info("PTY hub upgraded in place (pid %d): %d session(s) go on", os.getpid(),
                     len(self.hub.sessions))
        elif self.hub.fd_store is not None:
            self.adopt_stored()
        else:
            log.info("PTY hub serving on %s", self.server.path)
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.request_upgrade)
        loop.add_signal_handler(signal.SIGINT, lambda: None)
        self.check_alone()
        await self.done
        await self.server.close()
        await self.hub.shutdown()

    def adopt_stored(self) -> None:
        """Sessions of a hub that died, which the service manager kept for this one."""
        stored, broken = take_stored()
        for incarnation in broken:
            self.hub.fd_store.drop(incarnation)
        self.hub.adopt_orphans(stored)
        if stored or broken:
            log.warning("PTY hub serving on %s after a crash of the previous one: %d "
                        "session(s) adopted, %d stored entr%s unusable", self.server.path,
                        len(self.hub.sessions), len(broken), "y" if len(broken) == 1 else "ies")
        else:
            log.info("PTY hub serving on %s", self.server.path)

    def request_stop(self) -> None:
        if not self.done.done():
            log.info("PTY hub stopping: ending every session")
            self.done.set_result(None)

    def check_alone(self) -> None:
        """End once nothing is left to keep: no session and nobody connected."""
        if self._alone_timer is not None:
            self._alone_timer.cancel()
            self._alone_timer = None
        if self.config.get("until_stopped"):
            return
        if not self.hub.sessions and not self.server.links and not self.upgrading:
            self._alone_timer = asyncio.get_running_loop().call_later(ALONE_GRACE, self._alone)

    def _alone(self) -> None:
        self._alone_timer = None
        if not self.hub.sessions and not self.server.links and not self.done.done():
            log.info("PTY hub has no session and no daemon; ending")
            self.done.set_result(None)

    def request_upgrade(self) -> None:
        if not self.upgrading:
            self.upgrading = True
            asyncio.get_running_loop().create_task(self._upgrade())

    async def _upgrade(self) -> None:
        try:
            state, fds = self.hub.export_state()
            state["nfds"] = len(fds)
            problem = await _preflight(state)
            if problem:
                self.server.upgrades_refused += 1
                log.error("upgrade refused, nothing changed: the code now installed %s", problem)
                return
            if not await self.hub.take_back_leases(LEASE_TIMEOUT):
                log.warning("upgrade: a worker did not give back a lent session in %.0f s; "
                            "going on", LEASE_TIMEOUT)
            # Each worker stops sending (and holds its input) before the old image stops
            # reading, so nothing is lost in between.
            workers = [link for link in self.server.links if link.can_hold_leases]
            acks = [link.announce_upgrade() for link in workers]
            if acks:
                await asyncio.wait(acks, timeout=LEASE_TIMEOUT)
            state, fds = self.hub.export_state()
            state["nfds"] = len(fds)
            self._exec(state, fds)
        finally:
            self.upgrading = False

    def _exec(self, state: dict, fds: list[int]) -> None:
        for session in self.hub.sessions.values():
            if session.pump is not None:
                session.pump.close()
                session.pump = None
        carried = fds + [self.server.sock.fileno()]
        state_fd = _write_state(state)
        for fd in carried + [state_fd]:
            os.set_inheritable(fd, True)
        argv = [sys.executable, "-P", "-m", "cmuxd.hub_process",
                "--config", orjson.dumps(self.config).decode(),
                "--state-fd", str(state_fd), "--listen-fd", str(self.server.sock.fileno()),
                "--fds", ",".join(map(str, fds))]
        log.info("upgrading: re-executing in place with %d session(s)", len(state["sessions"]))
        try:
            os.execv(sys.executable, argv)
        except OSError as exc:
            log.error("upgrade failed, going on with the old code: exec: %s", exc)
            os.close(state_fd)
            for fd in carried:
                os.set_inheritable(fd, False)
            for session in self.hub.sessions.values():
                session.read_here()
            for link in self.server.links:
                if link.can_hold_leases:
                    link.upgrade_aborted()


async def _preflight(state: dict) -> str | None:
    """Import the code now installed in a fresh interpreter and have it check the state;
    the reason it cannot take over, or None."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-P", "-m", "cmuxd.hub_process", "--check-state",
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd="/")
    try:
        _, err = await asyncio.wait_for(proc.communicate(orjson.dumps(state)), PREFLIGHT_TIMEOUT)
    except TimeoutError:
        proc.kill()
        return f"did not answer the pre-flight check in {PREFLIGHT_TIMEOUT:.0f} s"
    if proc.returncode != 0:
        lines = err.decode("utf-8", "replace").strip().splitlines()
        return f"failed the pre-flight check: {lines[-1] if lines else proc.returncode}"
    return None


def _write_state(state: dict) -> int:
    data = orjson.dumps(state)
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("cmuxd-hub-state", 0)
    else:
        fd, path = tempfile.mkstemp(prefix="cmuxd-hub-state-")
        os.unlink(path)
    os.write(fd, data)
    return fd


def main(argv: list[str] | None = None) -> None:
    from .logs import setup_logging

    parser = argparse.ArgumentParser(prog="cmuxd.hub_process")
    parser.add_argument("--config", default="{}")
    parser.add_argument("--state-fd", type=int, default=None)
    parser.add_argument("--listen-fd", type=int, default=None)
    parser.add_argument("--fds", default="")
    parser.add_argument("--check-state", action="store_true")
    args = parser.parse_args(argv)
    if args.check_state:
        state = orjson.loads(sys.stdin.buffer.read())
        check_state(state, state.get("nfds", 0))
        return
    setup_logging(f"cmuxd hub [{os.getpid()}]")
    faulthandler.enable()
    return_large_blocks()
    adopted = None
    if args.state_fd is not None:
        with os.fdopen(args.state_fd, "rb") as f:
            f.seek(0)
            state = orjson.loads(f.read())
        fds = [int(fd) for fd in args.fds.split(",") if fd]
        for fd in fds + [args.listen_fd]:
            os.set_inheritable(fd, False)
        adopted = (state, fds)
    config = orjson.loads(args.config)
    if adopted is None:
        config["notify_socket"] = store_address()
    try:
        asyncio.run(HubProcess(config).run(adopted, args.listen_fd))
    except LocalSocketError as exc:
        log.error("%s", exc)
        sys.exit(1)


if __name__ == "__main__":
    main()
