"""Socket activation with the real `systemd-socket-activate`: the daemon serves sockets it did
not bind, applies the same auth to them, keeps LISTEN_* away from its children, and refuses
sockets it cannot serve with a message that names the unit setting to fix.

The full service manager (units, notify, watchdog, restart) is covered by tests/system.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

from helpers import daemon_command, wait_for, write_token_file
from listening import RELAY_ID, ListeningDaemon, free_port, read_line, refused

ACTIVATE = shutil.which("systemd-socket-activate")
pytestmark = pytest.mark.skipif(ACTIVATE is None,
                                reason="systemd-socket-activate is not installed (apt: systemd)")


# Runs the CLI with systemd-python made unimportable, so the built-in LISTEN_FDS reader is
# the one that reads the sockets.
WITHOUT_SYSTEMD_PYTHON = ("import sys; sys.modules['systemd'] = None; "
                          "sys.argv[0] = 'cmuxd-remote'; from cmuxd.cli import main; main()")


def systemd_python_available() -> bool:
    try:
        import systemd.daemon  # noqa: F401
    except ImportError:
        return False
    return True


class ActivatedDaemon(ListeningDaemon):
    """`cmuxd-remote serve` exec'd by systemd-socket-activate on a TCP and a Unix socket it
    bound; the daemon's own --tcp flag names a different port, which must stay unbound."""

    def __init__(self, *, reader: str = "systemd-python", activate_args: list[str] | None = None,
                 env: dict | None = None):
        self.dir = Path(tempfile.mkdtemp(prefix="cmuxd-test-"))
        self.token_file = self.dir / "relay-token"
        self.token = write_token_file(self.token_file)
        self.port = free_port()
        self.state_dir = self.dir / "state"
        self.stderr_file = open(self.dir / "stderr.log", "w+b")
        self.env = dict(os.environ, HOME=str(self.dir), **(env or {}))
        self.socket_path = self.dir / "run" / "cmuxd.sock"
        self.socket_path.parent.mkdir(mode=0o700)
        self.flag_port = free_port()
        serve = ["serve", "--workers", "2", "--token-file", str(self.token_file),
                 "--relay-id", RELAY_ID, "--state-dir", str(self.state_dir),
                 "--tcp", f"127.0.0.1:{self.flag_port}"]
        if reader == "built-in":
            command = [sys.executable, "-c", WITHOUT_SYSTEMD_PYTHON, *serve]
        else:
            command = daemon_command(*serve)
        if activate_args is None:
            activate_args = ["-l", f"127.0.0.1:{self.port}", "-l", str(self.socket_path),
                             "--fdname=tcp:unix"]
        passed = [arg for name in (env or {}) for arg in ("-E", name)]
        self.proc = subprocess.Popen([ACTIVATE, *activate_args, *passed, *command],
                                     stdin=subprocess.DEVNULL, stdout=self.stderr_file,
                                     stderr=self.stderr_file, env=self.env)
        wait_for(lambda: "Listening on" in self.log() or self.proc.poll() is not None,
                 message="systemd-socket-activate to listen")


@pytest.fixture
def spawn():
    started = []

    def make(**kwargs) -> ActivatedDaemon:
        d = ActivatedDaemon(**kwargs)
        started.append(d)
        return d

    yield make
    for d in started:
        d.close()


def next_message_with(notify: socket.socket, field: str) -> list[str]:
    """The fields of the next notification that carries `field` (WATCHDOG=1 pings and
    STATUS= updates may come first)."""
    while True:
        fields = notify.recv(4096).decode().split("\n")
        if field in fields:
            return fields


def ping_ok(stream, id=1):
    assert stream.call("ping", id=id) == {"id": id, "ok": True, "result": {"pong": True}}


@pytest.mark.parametrize("reader", ["systemd-python", "built-in"])
def test_first_connection_starts_the_daemon_on_activated_tcp_and_unix(spawn, reader):
    if reader == "systemd-python" and not systemd_python_available():
        pytest.skip("systemd-python is not installed; `apt-get install libsystemd-dev "
                    "pkg-config` (as .ci/run does), then ./scripts/setup adds it")
    d = spawn(reader=reader)
    # Nothing runs yet: this connection waits in the backlog of the activated socket.
    stream = d.authed()
    ping_ok(stream)
    d.wait_ready()
    unix = d.unix()
    ping_ok(unix, id=2)
    status = d.status()
    assert sorted((l["kind"], l["origin"]) for l in status["listeners"]) == [
        ("tcp", "systemd"), ("unix", "systemd")]
    assert {l["address"] for l in status["listeners"]} == {
        f"127.0.0.1:{d.port}", str(d.socket_path)}
    # Activated sockets win over --tcp: the flag's port was never bound.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", d.flag_port), timeout=5).close()
    assert "passed by systemd; --tcp/--socket addresses are not bound" in d.log()
    stream.close()
    unix.close()
    assert d.stop() == 0
    # The socket file belongs to whoever bound it (the service manager), not to us.
    assert d.socket_path.exists()


def test_activated_tcp_still_requires_the_relay_handshake(spawn):
    d = spawn()
    sock = d.tcp_connect()
    challenge = json.loads(read_line(sock))
    assert challenge["protocol"] == "cmux-relay-auth"
    sock.sendall(b'{"id":1,"method":"ping"}\n')
    assert refused(sock) == b'{"ok":false}\n'
    ping_ok(d.authed())


def test_listen_and_notify_variables_do_not_reach_workers(spawn):
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"cmuxd-activation-test-{secrets.token_hex(8)}"  # abstract names are host-wide
    notify.bind("\0" + name)
    notify.settimeout(15)
    try:
        d = spawn(env={"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "60000000"})
        ping_ok(d.authed())
        d.wait_ready()
        assert f"MAINPID={d.proc.pid}" in next_message_with(notify, "READY=1")
        workers = {w["pid"] for w in d.status()["workers"]}
        children = psutil.Process(d.proc.pid).children(recursive=True)  # workers, PTY hub
        assert workers and workers <= {child.pid for child in children}
        for child in children:
            environ = open(f"/proc/{child.pid}/environ", "rb").read().split(b"\0")
            names = {entry.split(b"=", 1)[0].decode() for entry in environ if entry}
            leaked = names & {"LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET",
                              "WATCHDOG_USEC", "WATCHDOG_PID"}
            assert not leaked, f"{child.cmdline()[:3]} (pid {child.pid}) inherited {leaked}"
        d.proc.send_signal(signal.SIGTERM)
        next_message_with(notify, "STOPPING=1")
        assert d.proc.wait(15) == 0
    finally:
        notify.close()


def test_datagram_socket_is_refused_with_the_setting_to_fix(spawn):
    port = free_port()
    d = spawn(activate_args=["--datagram", "-l", f"127.0.0.1:{port}"])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.sendto(b"wake up", ("127.0.0.1", port))
    assert d.proc.wait(15) == 1
    log = d.log()
    assert "is not a stream socket; use ListenStream=" in log
    assert d.token not in log


def test_connected_socket_from_accept_yes_is_refused(spawn):
    port = free_port()
    d = spawn(activate_args=["--accept", "-l", f"127.0.0.1:{port}"])
    conn = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        wait_for(lambda: "is not listening" in d.log(), timeout=15,
                 message="the daemon to refuse the connected socket")
        assert "Accept=no" in d.log()
    finally:
        conn.close()


def test_listen_variables_for_another_process_are_ignored(tmp_path):
    """A parent that forgot to unset LISTEN_*: the daemon binds its flags instead."""
    d = ListeningDaemon(env={"LISTEN_FDS": "1", "LISTEN_PID": str(os.getpid()),
                             "LISTEN_FDNAMES": "stale"})
    try:
        d.wait_ready()
        ping_ok(d.authed())
        assert [l["origin"] for l in d.status()["listeners"]] == ["bound", "bound"]
    finally:
        d.close()


def test_the_connection_that_starts_the_daemon_gets_keepalives_too(spawn):
    """It was queued before the daemon could set options on the listener."""
    d = spawn()
    stream = d.authed()
    ping_ok(stream)

    def keepalive():
        out = subprocess.run(["ss", "-tno", "state", "established", f"( sport = :{d.port} )"],
                             capture_output=True, text=True, timeout=10).stdout
        ours = [line for line in out.splitlines() if f":{stream.local_port}" in line]
        return ours and "keepalive" in ours[0]

    wait_for(keepalive, timeout=10, message="a keepalive timer on the first connection")
    stream.close()
