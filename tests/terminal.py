"""A command run on a real pseudo-terminal, as a person at a terminal would run it."""

from __future__ import annotations

import os
import pty
import select
import time


class Terminal:
    def __init__(self, argv: list[str], env: dict):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            try:
                os.execvpe(argv[0], argv, env)
            finally:
                os._exit(127)
        self.out = b""
        self.status: int | None = None

    def read_until(self, want: bytes, timeout: float = 20) -> bytes:
        """Output so far, once `want` is in it; fails the test with the output otherwise."""
        deadline = time.monotonic() + timeout
        while want not in self.out and time.monotonic() < deadline:
            ready, _, _ = select.select([self.fd], [], [], 0.1)
            if ready:
                try:
                    data = os.read(self.fd, 65536)
                except OSError:
                    break
                if not data:
                    break
                self.out += data
        assert want in self.out, f"{want!r} not seen; the terminal showed {self.out!r}"
        return self.out

    def write(self, data: bytes) -> None:
        os.write(self.fd, data)

    def wait(self, timeout: float = 20) -> int:
        """The exit code, reading the terminal meanwhile so the command never blocks on it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
                self._drain()
                return self.status
            ready, _, _ = select.select([self.fd], [], [], 0.05)
            if ready:
                try:
                    self.out += os.read(self.fd, 65536)
                except OSError:
                    pass
        raise AssertionError(f"still running after {timeout} s; the terminal showed {self.out!r}")

    def _drain(self) -> None:
        while select.select([self.fd], [], [], 0)[0]:
            try:
                data = os.read(self.fd, 65536)
            except OSError:
                return
            if not data:
                return
            self.out += data

    def close(self) -> None:
        if self.status is None:
            try:
                os.kill(self.pid, 9)
                os.waitpid(self.pid, 0)
            except OSError:
                pass
        os.close(self.fd)
