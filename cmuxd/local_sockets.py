"""The state directory's sockets (control, PTY hub) and who may be on their other ends.

They are found by path alone, so the directory is checked whenever a socket is created or
dialed in it (it may have been removed and recreated by someone else since we last looked),
and each end checks the other's uid with SO_PEERCRED: the daemon's own user, or root.
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

from .peercred import peer_uid


class LocalSocketError(OSError):
    """The state directory or the process on a local socket is not ours: the message says
    what is wrong and what to do."""


def trusted_peer(sock: socket.socket) -> bool:
    return peer_uid(sock) in (os.geteuid(), 0)


def check_state_dir(path: os.PathLike | str) -> None:
    """Refuse a state directory another user owns or can write to; a missing one passes
    (nothing can be dialed in it, and it is created 0700 before anything is bound in it)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    uid = os.geteuid()
    if not stat.S_ISDIR(st.st_mode):
        raise LocalSocketError(f"state directory {path} is not a directory; pass another "
                               "--state-dir")
    if st.st_uid != uid:
        raise LocalSocketError(f"state directory {path} belongs to uid {st.st_uid}, not to this "
                               f"daemon's user (uid {uid}); remove it or pass another --state-dir")
    if st.st_mode & 0o022:
        raise LocalSocketError(f"state directory {path} can be written by other users (mode "
                               f"{stat.S_IMODE(st.st_mode):04o}); run chmod 700 {path} or pass "
                               "another --state-dir")


def make_state_dir(path: os.PathLike | str) -> None:
    """Create the state directory 0700 if it is missing, then check it as it is now."""
    try:
        Path(path).mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise LocalSocketError(f"state directory {path} cannot be created "
                               f"({exc.strerror or exc}); pass another --state-dir") from None
    check_state_dir(path)


def check_server(sock, path: Path) -> None:
    if not trusted_peer(sock):
        raise LocalSocketError(f"{path} is served by uid {peer_uid(sock)}, not by this "
                               "daemon's user: someone else took over its state directory; stop "
                               "the daemon, remove the directory and start the daemon again")


def connect_trusted(path: Path, timeout: float) -> socket.socket:
    """A connection to a socket in the state directory, refused unless the directory and
    the listening process are ours (for the command line)."""
    check_state_dir(path.parent)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(str(path))
        check_server(sock, path)
    except BaseException:
        sock.close()
        raise
    return sock
