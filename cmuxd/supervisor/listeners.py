"""Listening sockets: parsing --tcp/--socket addresses and binding them safely.

Every listener, however it was obtained, ends up as a `Listener`: a non-blocking listening
socket, whether it is TCP or Unix, and where it came from. The gate applies the same auth
policy to all of them.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from dataclasses import dataclass, field
from pathlib import Path

from ..config import runtime_dir
from ..tailnet import TCP_KEYWORDS, TailnetError, tailnet_addresses

log = logging.getLogger("cmuxd.supervisor")

BACKLOG = 1024


class ListenerError(Exception):
    """A listener could not be set up; the message says what to change."""


@dataclass
class Listener:
    sock: socket.socket
    kind: str  # "tcp" or "unix"
    address: str  # for people: 127.0.0.1:5555, [::1]:5555, /run/user/0/cmuxd.sock
    origin: str = "bound"  # bound, systemd or launchd
    path: Path | None = None  # a Unix socket file we created and must remove
    name: str = ""
    inode: tuple[int, int] | None = field(default=None, repr=False)

    def close(self) -> None:
        self.sock.close()
        if self.path is not None and self.inode is not None:
            try:
                st = self.path.stat()
                if (st.st_dev, st.st_ino) == self.inode:
                    self.path.unlink()
            except FileNotFoundError:
                pass


def format_address(family: int, sockaddr) -> str:
    if family == socket.AF_INET6:
        return f"[{sockaddr[0]}]:{sockaddr[1]}"
    if family == socket.AF_INET:
        return f"{sockaddr[0]}:{sockaddr[1]}"
    return str(sockaddr)


def parse_tcp(spec: str) -> tuple[str | None, int]:
    """`:5555` (every address), `host:5555`, `[v6]:5555`, `tailscale:5555` → (host or None,
    port); the tailscale, tailscale4 and tailscale6 hosts are keywords bind_tcp resolves."""
    host, sep, port_text = spec.rpartition(":")
    if not sep:
        raise ListenerError(f"--tcp {spec!r}: expected HOST:PORT, [IPV6]:PORT or :PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise ListenerError(f"--tcp {spec!r}: the port must be a number") from None
    if not 0 <= port <= 65535:
        raise ListenerError(f"--tcp {spec!r}: the port must be between 0 and 65535")
    return (host or None), port


def bind_tcp(spec: str) -> list[Listener]:
    host, port = parse_tcp(spec)
    if host in TCP_KEYWORDS:
        return _bind_tailnet(spec, TCP_KEYWORDS[host], port)
    if host is None:
        # Every address, IPv6 and IPv4 on one dual-stack socket where the host allows it.
        try:
            return [_bind_tcp_one(socket.AF_INET6, ("::", port), spec, dual=True)]
        except OSError:
            return [_bind_tcp_one(socket.AF_INET, ("0.0.0.0", port), spec)]
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenerError(f"--tcp {spec!r}: cannot resolve {host!r}: {exc.strerror}") from None
    seen = set()
    listeners = []
    for family, _, _, _, sockaddr in infos:
        key = (family, sockaddr[:2])
        if key in seen:
            continue
        seen.add(key)
        listeners.append(_bind_tcp_one(family, sockaddr, spec))
    return listeners


def _bind_tailnet(spec: str, versions: tuple[int, ...], port: int) -> list[Listener]:
    """`tailscale:PORT`: one socket per tailnet address, so nothing else on the host (a LAN
    address, a public one) ever listens."""
    try:
        addresses = tailnet_addresses(versions)
    except TailnetError as exc:
        raise ListenerError(f"--tcp {spec}: {exc}") from None
    listeners: list[Listener] = []
    try:
        for address in addresses:
            if ":" in address:
                listeners.append(_bind_tcp_one(socket.AF_INET6, (address, port, 0, 0), spec))
            else:
                listeners.append(_bind_tcp_one(socket.AF_INET, (address, port), spec))
    except ListenerError:
        for listener in listeners:
            listener.close()
        raise
    return listeners


def _bind_tcp_one(family: int, sockaddr, spec: str, dual: bool = False) -> Listener:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual else 1)
        sock.bind(sockaddr)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ListenerError(
                f"--tcp {spec}: {format_address(family, sockaddr)} is already in use; "
                "stop the other daemon or choose another port"
            ) from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise ListenerError(
                f"--tcp {spec}: {sockaddr[0]} is not an address of this host"
            ) from None
        raise ListenerError(f"--tcp {spec}: {exc.strerror}") from None
    sock.setblocking(False)
    return Listener(sock, "tcp", format_address(family, sock.getsockname()))


def bind_unix(path_text: str, label: str = "--socket") -> Listener:
    """Create the socket 0600 (its directory 0700 when we create it), replacing a stale file
    only when nothing answers on it. `label` names the socket in errors as the user knows it:
    the option that gave it, or what it is for."""
    path = Path(path_text).expanduser()
    if not path.is_absolute():
        path = Path.cwd() / path
    try:
        return _bind_unix(path, label)
    except OSError as exc:  # the directory cannot be made, the stale file removed, …
        raise ListenerError(f"{label} {path}: {exc.strerror or exc}") from None


def _bind_unix(path: Path, label: str) -> Listener:
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True)
    if path.exists() or path.is_symlink():
        st = path.lstat()
        if not stat.S_ISSOCK(st.st_mode):
            raise ListenerError(f"{label} {path}: the path exists and is not a socket")
        if _answers(path):
            raise ListenerError(
                f"{label} {path}: another daemon is listening there; stop it first"
            )
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(BACKLOG)
        st = path.stat()
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    sock.setblocking(False)
    return Listener(sock, "unix", str(path), path=path, inode=(st.st_dev, st.st_ino))


def _answers(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def default_socket_path() -> Path:
    return runtime_dir() / "cmuxd.sock"
