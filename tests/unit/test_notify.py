"""The built-in LISTEN_FDS reader and the sd_notify sender, on real sockets."""

from __future__ import annotations

import os
import socket

import pytest

from cmuxd.supervisor.activation import adopt_socket, read_listen_fds, systemd_listeners
from cmuxd.supervisor.listeners import ListenerError
from cmuxd.supervisor.notify import Notifier


def test_reader_ignores_variables_meant_for_another_process():
    env = {"LISTEN_FDS": "2", "LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDNAMES": "a:b"}
    assert read_listen_fds(env) == []


def test_reader_names_fds_and_defaults_to_unknown():
    pid = str(os.getpid())
    assert read_listen_fds({"LISTEN_FDS": "0", "LISTEN_PID": pid}) == []
    env = {"LISTEN_FDS": "2", "LISTEN_PID": pid, "LISTEN_FDNAMES": "tcp:unix"}
    assert read_listen_fds(env) == [(3, "tcp"), (4, "unix")]
    assert read_listen_fds({"LISTEN_FDS": "1", "LISTEN_PID": pid}) == [(3, "unknown")]


@pytest.mark.parametrize("env, message", [
    ({"LISTEN_FDS": "x", "LISTEN_PID": "self"}, "LISTEN_FDS='x' is not a number"),
    ({"LISTEN_FDS": "1", "LISTEN_PID": "nope"}, "LISTEN_PID='nope' is not a process id"),
    ({"LISTEN_FDS": "2", "LISTEN_PID": "self", "LISTEN_FDNAMES": "one"},
     "LISTEN_FDNAMES names 1 sockets but LISTEN_FDS says 2"),
])
def test_reader_explains_a_broken_environment(env, message):
    env = {k: (str(os.getpid()) if v == "self" else v) for k, v in env.items()}
    with pytest.raises(ListenerError, match=message):
        read_listen_fds(env)


def test_variables_are_removed_even_when_not_for_us():
    env = {"LISTEN_FDS": "1", "LISTEN_PID": "1", "LISTEN_FDNAMES": "x", "OTHER": "kept"}
    assert systemd_listeners(env) is None
    assert env == {"OTHER": "kept"}


def test_adopt_checks_what_the_fd_is():
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    adopted = adopt_socket(os.dup(listening.fileno()), "tcp", "systemd")
    try:
        assert (adopted.kind, adopted.origin) == ("tcp", "systemd")
        assert adopted.address == "127.0.0.1:%d" % listening.getsockname()[1]
        assert not adopted.sock.getblocking() and not adopted.sock.get_inheritable()
    finally:
        adopted.sock.close()
        listening.close()
    bound_only = socket.socket()
    bound_only.bind(("127.0.0.1", 0))
    with pytest.raises(ListenerError, match="is not listening; the socket unit needs Accept=no"):
        adopt_socket(bound_only.detach(), "x", "systemd")
    read_end, write_end = os.pipe()
    os.close(write_end)
    with pytest.raises(ListenerError, match="is not a socket"):
        adopt_socket(read_end, "x", "systemd")
    os.close(read_end)


@pytest.fixture(params=["abstract", "path"])
def manager(request, tmp_path):
    """A datagram socket standing in for the service manager's notify socket."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "abstract":
        name = f"cmuxd-notify-{os.getpid()}-{id(sock)}"
        sock.bind("\0" + name)
        address = "@" + name
    else:
        address = str(tmp_path / "notify")
        sock.bind(address)
    sock.settimeout(5)
    yield sock, address
    sock.close()


def fields(sock) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_notifier_messages(manager):
    sock, address = manager
    env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "4000000",
           "WATCHDOG_PID": str(os.getpid()), "PATH": "/bin"}
    notifier = Notifier(env)
    assert env == {"PATH": "/bin"}  # nothing for children to inherit
    assert notifier.enabled and notifier.watchdog_interval == 2.0
    notifier.ready("serving")
    assert fields(sock) == ["READY=1", f"MAINPID={os.getpid()}", "STATUS=serving"]
    notifier.ready("serving")
    assert fields(sock) == ["READY=1", "STATUS=serving"]  # MAINPID only when it changes
    notifier.reloading()
    reloading = fields(sock)
    assert reloading[0] == "RELOADING=1" and reloading[1].startswith("MONOTONIC_USEC=")
    assert int(reloading[1].split("=")[1]) > 0
    notifier.status("same")
    assert fields(sock) == ["STATUS=same"]
    notifier.status("same")  # unchanged: nothing sent
    notifier.watchdog()
    assert fields(sock) == ["WATCHDOG=1"]
    notifier.stopping()
    assert fields(sock)[0] == "STOPPING=1"
    notifier.close()


def test_notifier_without_socket_or_with_foreign_watchdog_does_nothing():
    assert not Notifier({}).enabled
    assert Notifier({}).send("READY=1") is False
    foreign = Notifier({"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "1000000",
                        "WATCHDOG_PID": "1"})
    assert foreign.watchdog_interval is None
    assert foreign.send("READY=1") is False  # unreachable socket: logged once, not raised
