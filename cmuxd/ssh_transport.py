"""SSH as a client transport: `ssh://[user@]host[:port]` runs the user's own `ssh` (their
~/.ssh/config, agent and known hosts), which starts `cmuxd-remote serve --stdio` on the far
side; the child's stdin and stdout are the connection.

ssh keeps the terminal: it asks for passwords and host keys on /dev/tty, so a client must
let it finish before putting the terminal in raw mode. Its stderr is kept (the last lines
only) to say why a connection failed.
"""

from __future__ import annotations

import asyncio
from collections import deque

REMOTE_COMMAND = "cmuxd-remote"
STDERR_LINES = 5
EXIT_GRACE = 2.0
"""Seconds ssh gets to exit on its own once its stdin is closed, before it is ended."""


def ssh_argv(host: str, user: str = "", port: int = 0,
             remote_command: str | None = None, interactive: bool = True) -> list[str]:
    """The ssh command line. `--` ends ssh's options, so a host (or user) that starts with
    `-` is a destination, never an option such as -oProxyCommand. `-T`: the protocol needs
    a clean pipe, whatever RequestTTY the user's config sets. Not `interactive` (a terminal
    in raw mode cannot answer), BatchMode makes ssh fail where it would ask."""
    argv = ["ssh", "-T"]
    if not interactive:
        argv += ["-o", "BatchMode=yes"]
    if port:
        argv += ["-p", str(port)]
    destination = f"{user}@{host}" if user else host
    return argv + ["--", destination, f"{remote_command or REMOTE_COMMAND} serve --stdio"]


class SshProcess:
    """One running ssh: its pipes are the connection; it is reaped when the client closes."""

    def __init__(self, process: asyncio.subprocess.Process, remote_command: str):
        self.process = process
        self.remote_command = remote_command
        self.stderr: deque[str] = deque(maxlen=STDERR_LINES)
        self._drain = asyncio.get_running_loop().create_task(self._keep_stderr())

    @classmethod
    async def start(cls, host: str, user: str, port: int, remote_command: str | None,
                    interactive: bool = True) -> "SshProcess":
        argv = ssh_argv(host, user, port, remote_command, interactive)
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, limit=1 << 22)
        return cls(process, remote_command or REMOTE_COMMAND)

    async def _keep_stderr(self) -> None:
        while line := await self.process.stderr.readline():
            self.stderr.append(line[:500].decode("utf-8", "replace").strip())

    async def why_closed(self) -> str:
        """Why the connection ended, once ssh has exited (or EXIT_GRACE has passed)."""
        try:
            code = await asyncio.wait_for(self.process.wait(), EXIT_GRACE)
            await asyncio.wait_for(self._drain, EXIT_GRACE)
        except TimeoutError:
            return "ssh closed the connection"
        said = next((line for line in reversed(self.stderr) if line), "")
        if code == 255:
            return f"ssh could not connect: {said or 'no reason given'}"
        if code == 127:
            return (f"the far side has no {self.remote_command} on its PATH; install cmuxd "
                    "there or give its path with --remote-command")
        if code == 0:
            return f"{self.remote_command} on the far side closed the connection"
        return f"ssh exited with status {code}" + (f": {said}" if said else "")

    async def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), EXIT_GRACE)
        except TimeoutError:
            try:
                self.process.kill()
            except ProcessLookupError:
                pass
            await self.process.wait()
        self._drain.cancel()
