"""Listening sockets handed over by a service manager: systemd, then launchd.

With socket activation the service manager owns the listening socket, so connections that
arrive while the daemon starts or restarts wait in its backlog instead of being refused, and
the daemon needs no privilege to listen on a low port or in a root-owned directory. Whatever
it hands over is checked here before the gate trusts it: a datagram socket, a connected
socket (`Accept=yes`) or a socket of another family would otherwise fail later, in a place
that says nothing about the unit file that caused it.

Each activated socket becomes an ordinary `Listener` classified by what it is, not by the name
the unit gave it, so a TCP socket gets the relay handshake even if it was named "unix".
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import sys

from .listeners import Listener, ListenerError, format_address

log = logging.getLogger("cmuxd.supervisor")

SD_LISTEN_FDS_START = 3
LISTEN_VARIABLES = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")
# The socket names the launchd plist declares (units.render_plist); one call each.
LAUNCHD_SOCKET_NAMES = ("tcp", "unix")

_STREAM_HINTS = {
    "systemd": "use ListenStream= (not ListenDatagram= or ListenSequentialPacket=)",
    "launchd": "set SockType to stream in the plist's Sockets entry",
}
_FAMILIES = {socket.AF_INET: "tcp", socket.AF_INET6: "tcp", socket.AF_UNIX: "unix"}


def activated_listeners(launchd_library: str | None = None) -> list[Listener] | None:
    """The service manager's sockets, or None when we were not socket-activated (the caller
    then binds --tcp/--socket itself). launchd is asked on macOS, or anywhere when
    `launchd_library` names a library that exports launch_activate_socket(3)."""
    listeners = systemd_listeners()
    if listeners is None and (sys.platform == "darwin" or launchd_library is not None):
        listeners = launchd_listeners(launchd_library)
    return listeners


# systemd


def systemd_listeners(environ=os.environ) -> list[Listener] | None:
    """Sockets from LISTEN_FDS, or None when there are none meant for this process.

    The variables are removed whatever they say: a worker or a shell started from a PTY must
    not believe that fds 3… are sockets meant for it.
    """
    if "LISTEN_FDS" not in environ:
        _forget_listen_variables(environ)
        return None
    try:
        named = _listen_fds_with_names(environ)
    finally:
        _forget_listen_variables(environ)
    if not named:
        return None
    listeners: list[Listener] = []
    try:
        for fd, name in named:
            listeners.append(adopt_socket(fd, name, "systemd"))
    except ListenerError:
        for listener in listeners:
            listener.close()
        raise
    return listeners


def _listen_fds_with_names(environ) -> list[tuple[int, str]]:
    try:
        from systemd.daemon import listen_fds_with_names
    except ImportError:
        return read_listen_fds(environ)
    if environ is not os.environ:
        return read_listen_fds(environ)  # libsystemd reads the process environment only
    try:
        return sorted(listen_fds_with_names(unset_environment=True).items())
    except OSError as exc:
        raise ListenerError(
            f"systemd passed sockets this daemon cannot read ({exc.strerror}); check the "
            "LISTEN_FDS and LISTEN_FDNAMES the service manager set"
        ) from None


def read_listen_fds(environ=os.environ) -> list[tuple[int, str]]:
    """sd_listen_fds_with_names(3) without libsystemd: [(fd, name)], empty when the variables
    name another process (a parent that forgot to unset them)."""
    pid_text = environ.get("LISTEN_PID", "")
    count_text = environ.get("LISTEN_FDS", "")
    try:
        pid = int(pid_text)
    except ValueError:
        raise ListenerError(f"LISTEN_PID={pid_text!r} is not a process id; the service "
                            "manager's environment is broken") from None
    if pid != os.getpid():
        return []
    try:
        count = int(count_text)
    except ValueError:
        raise ListenerError(f"LISTEN_FDS={count_text!r} is not a number; the service "
                            "manager's environment is broken") from None
    if count < 0:
        raise ListenerError(f"LISTEN_FDS={count} is negative; the service manager's "
                            "environment is broken")
    names_text = environ.get("LISTEN_FDNAMES")
    if names_text is None:
        names = ["unknown"] * count
    else:
        names = names_text.split(":") if names_text else []
        if len(names) != count:
            raise ListenerError(f"LISTEN_FDNAMES names {len(names)} sockets but LISTEN_FDS "
                                f"says {count}; the service manager's environment is broken")
    # (sd_listen_fds also marks the fds close-on-exec; adopt_socket does that here.)
    fds = range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count)
    return list(zip(fds, names))


def _forget_listen_variables(environ) -> None:
    for key in LISTEN_VARIABLES:
        environ.pop(key, None)  # os.environ.pop unsets it in the C environment too


# launchd


def launchd_listeners(library: str | None = None) -> list[Listener] | None:
    """Sockets from the plist's Sockets dictionary, or None when launchd did not start us or
    declared none of our names (the caller then binds --tcp/--socket, and says so)."""
    listeners: list[Listener] = []
    missing = []
    try:
        for name in LAUNCHD_SOCKET_NAMES:
            fds = launch_activate_socket(name, library)
            if fds is None:
                log.info("launchd did not start this process; binding --tcp/--socket")
                for listener in listeners:
                    listener.close()
                return None
            if not fds:
                missing.append(name)
            for i, fd in enumerate(fds):
                try:
                    listeners.append(adopt_socket(fd, name, "launchd"))
                except ListenerError:
                    for rest in fds[i + 1:]:
                        os.close(rest)
                    raise
    except ListenerError:
        for listener in listeners:
            listener.close()
        raise
    if not listeners:
        log.info("launchd passed no socket named %s (launch_activate_socket: ENOENT); binding "
                 "--tcp/--socket", " or ".join(map(repr, LAUNCHD_SOCKET_NAMES)))
        return None
    if missing:
        log.info("launchd passed no socket named %s; the plist's Sockets dictionary leaves it "
                 "out, so cmuxd serves the others only", " or ".join(map(repr, missing)))
    return listeners


def launch_activate_socket(name: str, library: str | None = None) -> list[int] | None:
    """launch_activate_socket(3) for one socket name: its fds, [] when the plist declares no
    socket of that name (ENOENT), None when this process was not started by launchd (ESRCH)
    or the function does not exist. `library` is the shared library that exports it; None
    means the process's own (libSystem on macOS). The only place that calls into liblaunch."""
    import ctypes

    try:
        lib = ctypes.CDLL(library, use_errno=True)
    except OSError as exc:
        raise ListenerError(f"cannot load {library}: {exc}; name a shared library that "
                            "exports launch_activate_socket(3)") from None
    try:
        activate = lib.launch_activate_socket
    except AttributeError:
        if library is None:
            return None
        raise ListenerError(f"{library} does not export launch_activate_socket; name the "
                            "library that does") from None
    activate.restype = ctypes.c_int
    activate.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.POINTER(ctypes.c_int)),
                         ctypes.POINTER(ctypes.c_size_t)]
    fds = ctypes.POINTER(ctypes.c_int)()
    count = ctypes.c_size_t(0)
    err = activate(name.encode(), ctypes.byref(fds), ctypes.byref(count))
    if err == errno.ESRCH:
        return None
    if err == errno.ENOENT:
        return []
    if err != 0:
        code = errno.errorcode.get(err, str(err))
        raise ListenerError(f"launchd could not hand over the socket {name!r} "
                            f"({os.strerror(err)}, {code}); check the Sockets dictionary "
                            "of the plist and that the job is loaded once")
    try:
        return [fds[i] for i in range(count.value)]
    finally:
        ctypes.CDLL(None).free(fds)


# checks shared by both


def adopt_socket(fd: int, name: str, origin: str) -> Listener:
    """A checked, non-blocking, non-inheritable Listener for an fd the service manager passed."""
    what = f"{origin} socket {name!r} (fd {fd})"
    try:
        st = os.fstat(fd)
    except OSError:
        raise ListenerError(f"{what} is not an open file; check the socket unit") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenerError(f"{what} is not a socket; cmuxd needs ListenStream= sockets, "
                            "not files, FIFOs or devices")
    sock = socket.socket(fileno=fd)
    try:
        kind = _FAMILIES.get(sock.family)
        if kind is None:
            raise ListenerError(f"{what} is an {_family_name(sock.family)} socket; cmuxd "
                                "listens only on TCP (IPv4, IPv6) and Unix sockets")
        if sock.type != socket.SOCK_STREAM:
            raise ListenerError(f"{what} is not a stream socket; {_STREAM_HINTS[origin]}")
        if not _is_listening(sock):
            raise ListenerError(f"{what} is not listening; the socket unit needs Accept=no "
                                "(cmuxd accepts connections itself)")
        sock.set_inheritable(False)
        sock.setblocking(False)
        address = _describe(sock)
    except BaseException:
        sock.close()
        raise
    return Listener(sock, kind, address, origin=origin, name=name)


def _is_listening(sock: socket.socket) -> bool:
    option = getattr(socket, "SO_ACCEPTCONN", None)
    if option is None:
        return True  # cannot tell here; accept() will fail loudly if it is not
    return bool(sock.getsockopt(socket.SOL_SOCKET, option))


def _family_name(family: int) -> str:
    try:
        return socket.AddressFamily(family).name
    except ValueError:
        return f"address family {family}"


def _describe(sock: socket.socket) -> str:
    address = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        if isinstance(address, bytes):  # abstract namespace
            return "@" + address[1:].decode(errors="replace")
        return address or "(unnamed)"
    return format_address(sock.family, address)
