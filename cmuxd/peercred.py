"""Who is on the other end of a Unix socket: the one place that asks the kernel."""

from __future__ import annotations

import socket
import struct


def peer_uid(sock: socket.socket) -> int:
    """The peer process's uid: SO_PEERCRED on Linux, getpeereid on macOS and the BSDs;
    -1 when the system cannot tell."""
    if hasattr(socket, "SO_PEERCRED"):
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", creds)[1]
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    uid = ctypes.c_uint32()
    gid = ctypes.c_uint32()
    if libc.getpeereid(sock.fileno(), ctypes.byref(uid), ctypes.byref(gid)) != 0:
        return -1
    return uid.value
