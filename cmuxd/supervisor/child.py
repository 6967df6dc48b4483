"""One child process of the supervisor, known by its pid: started here, or adopted after the
supervisor re-executed itself (a child stays ours across exec, but no Popen object does).

Its exit is an event, not something found by polling: a pidfd (`os.pidfd_open`) becomes
readable when the process ends, and the loop calls `on_exit` then. A hung child is first sent
SIGABRT, so that the traceback its faulthandler writes reaches the log, and SIGKILL after.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Callable

ABORT_GRACE = 1.0
"""Seconds a hung child gets between SIGABRT (its traceback) and SIGKILL."""


class Child:
    def __init__(self, pid: int, popen: subprocess.Popen | None = None):
        self.pid = pid
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
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except OSError:
            # Reaped already (or no pidfd on this kernel): tell at the next loop pass.
            asyncio.get_running_loop().call_soon(self._exited)
            return
        asyncio.get_running_loop().add_reader(self._pidfd, self._exited)

    def _exited(self) -> None:
        if self.poll() is None:
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
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            self.returncode = 255  # reaped elsewhere: its status is unknown
            return self.returncode
        if pid:
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    @property
    def alive(self) -> bool:
        return self.poll() is None

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            try:
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
            self._kill_timer = asyncio.get_running_loop().call_later(ABORT_GRACE, self.kill)

    def wait(self) -> int:
        """Block until the process ends (only after kill(): it cannot take long)."""
        if self._popen is not None:
            self.returncode = self._popen.wait()
        elif self.returncode is None:
            try:
                self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
            except ChildProcessError:
                self.returncode = 255
        return self.returncode

    def forget(self) -> None:
        """Stop watching (the supervisor is about to re-execute: the new image watches)."""
        self._unwatch()
        self._on_exit = None
