"""systemd's file descriptor store (FileDescriptorStoreMax=), which carries the hub's
sessions through a crash of the hub.

The hub stores each session's PTY master, ring and a small description of it (a memfd of
JSON) with the service manager. When the hub dies, even by SIGKILL, the unit's
`KillMode=process` leaves the shells running (they are reparented to the service manager),
and the automatic restart hands the stored fds to the next hub, which adopts every session
whose process still runs. Only what the ring holds and what the PTY buffered meanwhile
carries over: input queued in the dead hub is lost, and the exit status of an adopted
process is unknown, since it is no longer the hub's child.

The service manager drops a stored PTY master by itself once the PTY hangs up, and forgets
the whole store when the unit stops for good. Without NOTIFY_SOCKET (a hub the daemon
started itself, or one started by hand) nothing is stored, and a crash of the hub ends its
sessions.
"""

from __future__ import annotations

import array
import logging
import os
import socket
import stat

import orjson

log = logging.getLogger("cmuxd.hub")

SD_LISTEN_FDS_START = 3
PARTS = ("master", "ring", "meta")
"""The fds stored for one session, each under the name `<incarnation>.<part>`."""
META_MAX = 1 << 20


class FdStore:
    """The hub's end of the store: what it sends the service manager."""

    def __init__(self, address: str):
        self.address = address
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    def keep(self, session) -> None:
        """Store a session that has just started (its process id is known)."""
        meta = {"session_id": session.id, "pid": session.pid,
                "start": process_start(session.pid), "command": session.command,
                "script": session.script, "cli_path": session.cli_path}
        meta_fd = _memfd(orjson.dumps(meta))
        try:
            for part, fd in zip(PARTS, (session.master, session.ring.fd, meta_fd)):
                self._send(f"FDSTORE=1\nFDNAME={session.incarnation}.{part}", [fd])
        finally:
            os.close(meta_fd)

    def drop(self, incarnation: str) -> None:
        for part in PARTS:
            self._send(f"FDSTOREREMOVE=1\nFDNAME={incarnation}.{part}", [])

    def _send(self, message: str, fds: list[int]) -> None:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            self._sock.sendmsg([message.encode()], ancillary, 0, self.address)
        except OSError as exc:
            log.warning("could not reach the service manager's fd store (%s); a crash of the "
                        "hub would end this session", exc.strerror or exc)

    def close(self) -> None:
        self._sock.close()


def store_address(environ=os.environ) -> str | None:
    """The address of the service manager that runs this process, if any. NOTIFY_SOCKET is
    taken out of the environment: the shells must not inherit a channel to it."""
    text = environ.pop("NOTIFY_SOCKET", "")
    if text.startswith("@"):
        return "\0" + text[1:]
    return text if text.startswith("/") else None


def take_stored(environ=os.environ) -> tuple[list[tuple[dict, int, int]], list[str]]:
    """The sessions the service manager handed back at this start: [(description, master,
    ring fd)], and the incarnations of incomplete or unreadable entries, which the caller
    drops from the store. Every fd not returned is closed."""
    named = _listen_fds(environ)
    groups: dict[str, dict[str, int]] = {}
    for fd, name in named:
        os.set_inheritable(fd, False)
        incarnation, _, part = name.rpartition(".")
        if part in PARTS and incarnation and part not in groups.setdefault(incarnation, {}):
            groups[incarnation][part] = fd
        else:
            os.close(fd)
    sessions, broken = [], []
    for incarnation, fds in groups.items():
        meta = _read_meta(fds.get("meta"))
        master = fds.get("master")
        if (meta is None or master is None or "ring" not in fds
                or not stat.S_ISCHR(os.fstat(master).st_mode)):
            broken.append(incarnation)
            for fd in fds.values():
                os.close(fd)
            continue
        os.close(fds["meta"])
        sessions.append((meta, master, fds["ring"]))
    return sessions, broken


def _read_meta(fd: int | None) -> dict | None:
    if fd is None:
        return None
    try:
        data = os.pread(fd, META_MAX, 0)
        meta = orjson.loads(data)
    except (OSError, orjson.JSONDecodeError):
        return None
    if (type(meta) is not dict or type(meta.get("session_id")) is not str
            or type(meta.get("pid")) is not int or type(meta.get("start")) is not int
            or type(meta.get("command")) is not str):
        return None
    return meta


def _listen_fds(environ) -> list[tuple[int, str]]:
    """sd_listen_fds_with_names(3): [(fd, name)] meant for this process; the variables are
    removed either way, so the shells do not take fds 3… for theirs."""
    pid, count, names = (environ.pop(k, "") for k in ("LISTEN_PID", "LISTEN_FDS",
                                                       "LISTEN_FDNAMES"))
    if not pid.isdigit() or int(pid) != os.getpid() or not count.isdigit():
        return []
    names_list = names.split(":") if names else []
    if len(names_list) != int(count):
        log.warning("LISTEN_FDNAMES does not name every stored fd; adopting no session")
        names_list = [""] * int(count)
    return list(zip(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)), names_list))


def process_start(pid: int) -> int:
    """When the process started, in clock ticks since boot (field 22 of /proc/<pid>/stat):
    with the pid, it names one process, not whatever reuses the pid later. 0 where there is
    no /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return 0
    return int(data.rsplit(b")", 1)[1].split()[19])


def _memfd(data: bytes) -> int:
    fd = os.memfd_create("cmuxd-pty-meta", os.MFD_CLOEXEC)
    os.write(fd, data)
    return fd
