"""One process the supervisor watches, known by its pid: a child started here, a child
adopted after the supervisor re-executed itself (a child stays ours across exec, but no Popen
object does), or a process that is not our child at all (a PTY hub started by its own unit).

Its exit is an event, not something found by polling: a pidfd (`os.pidfd_open`) becomes
readable when the process ends, and the loop calls `on_exit` then. Signals go through the
pidfd too, so they can never reach another process that got the pid meanwhile. A hung process
is first sent SIGABRT, so that the traceback its faulthandler writes reaches the log, and
SIGKILL after.
"""

from __future__ import annotations

import asyncio
import os
import select
import signal
import subprocess
from collections.abc import Callable

ABORT_GRACE = 1.0
"""Seconds a hung child gets between SIGABRT (its traceback) and SIGKILL."""
UNWATCHABLE_POLL = 0.5
"""Without a pidfd (the fd limit, an old kernel) the exit is looked for this often."""
UNKNOWN_STATUS = 255
"""The exit status of a process that was not ours to reap."""


class Child:
    def __init__(self, pid: int, popen: subprocess.Popen | None = None, ours: bool = True):
        self.pid = pid
        self.ours = ours
        """Our child, reaped here; else only watched and signalled."""
        self.returncode: int | None = None
        # A Popen is kept while it exists: dropped, it would reap the child behind our back.
        self._popen = popen
        self._pidfd: int | None = None
        self._on_exit: Callable[[Child], None] | None = None
        self._kill_timer: asyncio.TimerHandle | None = None

    @classmethod
    def start(cls, cmd: list[str], **popen_args) -> "Child":
        popen = subprocess.Popen(cmd, **popen_args)
        return cls(popen.pid, popen)

    def watch(self, on_exit: Callable[["Child"], None]) -> None:
        """Call `on_exit(self)` from the running loop once the process has ended."""
        self._on_exit = on_exit
        if self._open() is None:
            asyncio.get_running_loop().call_soon(self._exited)
            return
        asyncio.get_running_loop().add_reader(self._pidfd, self._exited)

    def _open(self) -> int | None:
        if self._pidfd is None and self.returncode is None:
            try:
                self._pidfd = os.pidfd_open(self.pid)
            except ProcessLookupError:
                if not self.ours:
                    self.returncode = UNKNOWN_STATUS
            except OSError:
                pass
        return self._pidfd

    def _exited(self) -> None:
        if self.poll() is None:
            if self._pidfd is None and self._on_exit is not None:
                asyncio.get_running_loop().call_later(UNWATCHABLE_POLL, self._exited)
            return
        self._unwatch()
        callback, self._on_exit = self._on_exit, None
        if callback is not None:
            callback(self)

    def _unwatch(self) -> None:
        if self._pidfd is not None:
            asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        if self._kill_timer is not None:
            self._kill_timer.cancel()
            self._kill_timer = None

    def poll(self) -> int | None:
        """The exit status (negative: the signal), reaping the process; None while it runs."""
        if self.returncode is not None:
            return self.returncode
        if self._popen is not None:
            self.returncode = self._popen.poll()
            return self.returncode
        if not self.ours:
            pidfd = self._open()
            if pidfd is not None and select.select([pidfd], [], [], 0)[0]:
                self.returncode = UNKNOWN_STATUS
            return self.returncode
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            self.returncode = UNKNOWN_STATUS  # reaped elsewhere
            return self.returncode
        if pid:
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    @property
    def alive(self) -> bool:
        return self.poll() is None

    def send_signal(self, signum: int) -> None:
        if self.poll() is not None:
            return
        try:
            pidfd = self._open()
            if pidfd is not None:
                signal.pidfd_send_signal(pidfd, signum)
            else:
                os.kill(self.pid, signum)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def abort(self) -> None:
        """A hung child: SIGABRT now (faulthandler prints where it is stuck), SIGKILL if it
        is still there ABORT_GRACE later."""
        self.send_signal(signal.SIGABRT)
        if self._kill_timer is None:
            self._kill_timer = asyncio.get_running_loop().call_later(ABORT_GRACE, self._abort_due)

    def _abort_due(self) -> None:
        self._kill_timer = None
        self.kill()
        if self._on_exit is None:
            self._unwatch()  # nobody watches its exit: the pidfd is not needed any more

    def wait(self) -> int:
        """Block until the process ends (only after kill(): it cannot take long)."""
        if self._popen is not None:
            self.returncode = self._popen.wait()
        elif self.returncode is None:
            try:
                self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
            except ChildProcessError:
                self.returncode = UNKNOWN_STATUS
        return self.returncode

    def forget(self) -> None:
        """Stop watching (the supervisor is about to re-execute: the new image watches)."""
        self._unwatch()
        self._on_exit = None
