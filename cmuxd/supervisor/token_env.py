"""Keeping a token given as CMUX_RELAY_TOKEN out of /proc/<pid>/environ.

Removing it from os.environ does not change the kernel's copy of the environment the process
started with, which /proc/<pid>/environ shows to the same user and root for as long as the
process lives (a PTY shell of the daemon could print it from there). So the supervisor
re-executes itself once without the variable, and hands the token to its new image through
an inherited pipe, named by fd number in CMUXD_TOKEN_FD; the token never enters argv.
"""

from __future__ import annotations

import os
import sys

from ..auth import AuthError

TOKEN_ENV = "CMUX_RELAY_TOKEN"
FD_ENV = "CMUXD_TOKEN_FD"
PIPE_LIMIT = 60000
"""Bytes a pipe takes without a reader on every system we run on (a token needs 64)."""


def take_token_from_environment() -> dict[str, str]:
    """The token variable, for the credentials lookup and reloads, now held in memory only.

    Returns only in a process whose environment never held the token: when the variable is
    set, this re-executes the process and does not return."""
    fd_text = os.environ.pop(FD_ENV, None)
    if fd_text is not None:
        with os.fdopen(int(fd_text), "rb") as pipe:
            return {TOKEN_ENV: pipe.read().decode()}
    value = os.environ.pop(TOKEN_ENV, None)
    if not value:
        return {}
    data = value.encode()
    if len(data) > PIPE_LIMIT:
        raise AuthError(f"{TOKEN_ENV} is far too long to hold a relay token; set it to the "
                        "hex token, or unset it")
    read_end, write_end = os.pipe()
    os.write(write_end, data)
    os.close(write_end)
    os.set_inheritable(read_end, True)
    env = dict(os.environ, **{FD_ENV: str(read_end)})
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
