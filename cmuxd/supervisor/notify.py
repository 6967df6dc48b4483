"""Service manager notifications (sd_notify(3)): readiness, status, reload, stop, watchdog.

Under `Type=notify` systemd holds back units ordered after ours, and `systemctl start` itself,
until READY=1, so sending it only once the workers run means "started" really is "serving".
The watchdog is what turns a hung supervisor into a restart: systemd kills the service when
WATCHDOG=1 stops coming, so it is sent only while the supervisor can see live workers, never
by a timer that would keep ticking in a daemon that can no longer serve anyone.

Everything is a no-op without NOTIFY_SOCKET (started by hand, or under launchd). The
variables are taken out of the environment so that workers and the shells they start do not
inherit a channel to the service manager meant for this process only.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Callable

log = logging.getLogger("cmuxd.supervisor")

NOTIFY_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
STATUS_INTERVAL = 2.0


class Notifier:
    def __init__(self, environ=os.environ):
        self._inherited = {k: environ[k] for k in NOTIFY_VARIABLES if k in environ}
        for key in NOTIFY_VARIABLES:
            environ.pop(key, None)
        self.address = _socket_address(self._inherited.get("NOTIFY_SOCKET", ""))
        self.watchdog_interval = _watchdog_interval(self._inherited)
        self._sock: socket.socket | None = None
        self._announced_pid: int | None = None
        self._last_status: str | None = None
        self._status_fn: Callable[[], str] | None = None
        self._healthy_fn: Callable[[], bool] | None = None
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._withheld = False
        self._failed = False

    @property
    def inherited(self) -> dict[str, str]:
        """The variables this process was given, for its next image after a re-exec."""
        return dict(self._inherited)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    # messages

    def ready(self, status: str | None = None) -> None:
        """READY=1, with MAINPID when this process is not the one last announced."""
        fields = ["READY=1"]
        pid = os.getpid()
        if pid != self._announced_pid:
            fields.append(f"MAINPID={pid}")
            self._announced_pid = pid
        if status is None and self._status_fn is not None:
            status = self._status_fn()
        if status is not None:
            fields.append(f"STATUS={status}")
            self._last_status = status
        self.send(*fields)

    def reloading(self) -> None:
        """RELOADING=1 with the CLOCK_MONOTONIC timestamp that Type=notify-reload (systemd
        253) requires; follow with ready() once the reload is done."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=Reloading")
        self._last_status = "Reloading"

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=Stopping")
        self._last_status = "Stopping"

    def status(self, text: str) -> None:
        """STATUS=, sent only when it changed, so the periodic tick costs nothing when idle."""
        if text != self._last_status:
            self._last_status = text
            self.send(f"STATUS={text}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def send(self, *fields: str) -> bool:
        """One datagram; False (and one log line, not one per tick) when it cannot be sent."""
        if self.address is None:
            return False
        message = "\n".join(fields).encode()
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                sock.settimeout(1.0)  # the manager reads promptly; never stall the loop long
                sock.connect(self.address)
                self._sock = sock
            self._sock.send(message)
        except OSError as exc:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            if not self._failed:
                log.warning("cannot notify the service manager (%s)", exc.strerror or exc)
                self._failed = True
            return False
        self._failed = False
        return True

    # periodic status and watchdog

    def start(self, status: Callable[[], str], healthy: Callable[[], bool]) -> None:
        """Send STATUS= when it changes, and WATCHDOG=1 while `healthy()` says so."""
        self._status_fn = status
        self._healthy_fn = healthy
        if not self.enabled:
            return
        self._schedule("status", STATUS_INTERVAL, self._status_tick)
        if self.watchdog_interval is not None:
            self._schedule("watchdog", 0.0, self._watchdog_tick)

    def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _schedule(self, name: str, delay: float, callback) -> None:
        self._timers[name] = asyncio.get_running_loop().call_later(delay, callback)

    def _status_tick(self) -> None:
        try:
            self.status(self._status_fn())
        finally:
            self._schedule("status", STATUS_INTERVAL, self._status_tick)

    def _watchdog_tick(self) -> None:
        try:
            if self._healthy_fn():
                self.watchdog()
                if self._withheld:
                    log.info("workers are alive again; watchdog pings resumed")
                self._withheld = False
            elif not self._withheld:
                log.warning("no worker is alive; withholding the watchdog ping, so the "
                            "service manager restarts the daemon if this lasts")
                self._withheld = True
        finally:
            self._schedule("watchdog", self.watchdog_interval, self._watchdog_tick)


def status_line(listeners, pool) -> str:
    """What `systemctl status` shows: open connections, serving workers, listeners."""
    connections = pool.total_load()
    serving = [w for w in pool.serving() if w.alive]
    where = ", ".join(f"{l.kind} {l.address}" for l in listeners) or "no listeners"
    return (f"{connections} connection{'s' if connections != 1 else ''}, "
            f"{len(serving)}/{pool.config.workers} workers, listening on {where}")


def pool_healthy(pool) -> bool:
    """At least one serving worker runs and has answered its heartbeats: the daemon can
    still serve a new connection."""
    now = time.monotonic()
    return any(w.answering(now, pool.config.worker_timeout) for w in pool.serving())


def _socket_address(text: str) -> str | None:
    if text.startswith("@"):
        return "\0" + text[1:]  # abstract namespace
    if text.startswith("/"):
        return text
    if text:
        log.warning("NOTIFY_SOCKET=%s is not a Unix socket address; not notifying", text)
    return None


def _watchdog_interval(env: dict[str, str]) -> float | None:
    """Half of WATCHDOG_USEC in seconds, as sd_watchdog_enabled(3) advises; None when the
    watchdog is off or meant for another process."""
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid_text = env.get("WATCHDOG_PID")
    if pid_text is not None:
        try:
            if int(pid_text) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 2_000_000
