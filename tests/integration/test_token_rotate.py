"""`token rotate` against a real daemon: the new token works at once, the old one for the
grace period only, open connections stay open, and nobody but the daemon's user can rotate."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time

import orjson
import pytest

from cmuxd.status import control_request
from helpers import wait_for
from listening import RELAY_ID, ListeningDaemon, mac_for, read_line, refused


@pytest.fixture
def daemon():
    d = ListeningDaemon()
    d.wait_ready()
    yield d
    d.close()


def handshake(d: ListeningDaemon, token: str) -> tuple[socket.socket, dict]:
    """A v1 handshake with `token`; the socket and the daemon's reply."""
    sock = d.tcp_connect()
    nonce = d.challenge(sock)["nonce"]
    sock.sendall(orjson.dumps({"mac": mac_for(token, RELAY_ID, nonce), "relay_id": RELAY_ID})
                 + b"\n")
    return sock, json.loads(read_line(sock) or b"{}")


def accepted(d: ListeningDaemon, token: str) -> bool:
    sock, reply = handshake(d, token)
    if reply.get("ok") is True:
        sock.close()
        return True
    assert reply == {"ok": False}, reply
    assert refused(sock) == b""
    return False


def ping(sock: socket.socket, id: int) -> dict:
    sock.sendall(orjson.dumps({"id": id, "method": "ping"}) + b"\n")
    return json.loads(read_line(sock))


def rotate(d: ListeningDaemon, *args: str) -> subprocess.CompletedProcess:
    return d.cli("token", "rotate", *args, "--state-dir", str(d.state_dir))


def file_token(d: ListeningDaemon) -> str:
    return d.token_file.read_text().strip()


def assert_no_secret(d: ListeningDaemon, proc: subprocess.CompletedProcess, *tokens: str):
    for token in tokens:
        for text in (proc.stdout.decode(), proc.stderr.decode(), d.log(), " ".join(proc.args)):
            assert token not in text


def test_rotate_with_grace_accepts_both_then_only_the_new(daemon):
    old = daemon.token
    open_sock, reply = handshake(daemon, old)
    assert reply == {"ok": True}
    proc = rotate(daemon, "--grace", "3")
    assert proc.returncode == 0, proc.stderr
    new = file_token(daemon)
    assert new != old and len(new) == 64
    assert os.stat(daemon.token_file).st_mode & 0o777 == 0o600
    assert b"still accepted for new connections until" in proc.stdout
    assert accepted(daemon, new) and accepted(daemon, old)
    until = daemon.status()["previous_token_until"]
    assert until is not None and 0 < until - time.time() <= 3
    wait_for(lambda: not accepted(daemon, old), timeout=15, interval=0.2,
             message="the old token to be refused after its grace")
    assert accepted(daemon, new)
    assert daemon.status()["previous_token_until"] is None
    # Authenticated before the rotation with the old token: still served.
    assert ping(open_sock, 1) == {"id": 1, "ok": True, "result": {"pong": True}}
    open_sock.close()
    assert_no_secret(daemon, proc, old, new)
    assert "previous relay token is no longer accepted" in daemon.log()


def test_rotate_with_no_grace_refuses_the_old_token_at_once(daemon):
    old = daemon.token
    open_sock, _ = handshake(daemon, old)
    session = daemon.authed()  # mutual, with a PTY session running on it
    attach = {"session_id": "keep", "attachment_id": "a", "client_attachment_token": "t"}
    assert session.call("pty.attach", dict(attach, cols=80, rows=24, command="cat"),
                        id=1)["ok"] is True
    proc = rotate(daemon, "--grace", "0")
    assert proc.returncode == 0, proc.stderr
    assert b"refused from now on" in proc.stdout
    new = file_token(daemon)
    assert not accepted(daemon, old)
    assert accepted(daemon, new)
    assert daemon.status()["previous_token_until"] is None
    assert ping(open_sock, 2)["ok"] is True
    listed = session.call("pty.list", {}, id=2)["result"]["sessions"]
    assert [s["session_id"] for s in listed] == ["keep"]
    daemon.token = new
    assert daemon.authed().call("ping", id=3)["ok"] is True
    assert_no_secret(daemon, proc, old, new)


def test_no_daemon_running_rotates_nothing(daemon):
    daemon.stop()
    before = daemon.token_file.read_bytes()
    proc = rotate(daemon)
    assert proc.returncode == 3
    err = proc.stderr.decode()
    assert "no daemon answers" in err and "token was not rotated" in err
    assert "token new --force" in err
    assert daemon.token_file.read_bytes() == before


def test_another_file_than_the_daemons_is_refused(daemon, tmp_path):
    other = tmp_path / "other-token"
    other.write_text(secrets.token_hex(32) + "\n")
    other.chmod(0o600)
    before = other.read_bytes()
    proc = rotate(daemon, str(other))
    assert proc.returncode == 1
    assert f"the daemon reads its token from {daemon.token_file}" in proc.stderr.decode()
    assert other.read_bytes() == before and file_token(daemon) == daemon.token
    assert accepted(daemon, daemon.token)


def test_a_token_file_with_loose_modes_is_refused(daemon):
    daemon.token_file.chmod(0o644)
    proc = rotate(daemon)
    assert proc.returncode == 1
    assert "chmod 600" in proc.stderr.decode() and "not rotated" in proc.stderr.decode()
    assert file_token(daemon) == daemon.token
    assert accepted(daemon, daemon.token)


@pytest.mark.parametrize("request_, message", [
    ({"method": "rotate_token", "token": "zz" * 32, "grace": 10}, "not a hex string"),
    ({"method": "rotate_token", "token": "ab" * 8, "grace": 10}, "at least 16 are needed"),
    ({"method": "rotate_token", "grace": 10}, "is empty"),
    ({"method": "rotate_token", "token": "ab" * 32, "grace": -1}, "grace period"),
    ({"method": "rotate_token", "token": "ab" * 32, "grace": "600"}, "grace period"),
    ({"method": "no_such_thing"}, "unknown control method"),
    ({"method": "rotate_token", "token": "ab" * 40000, "grace": 0}, "at most 65536 bytes"),
])
def test_bad_control_requests_get_a_sentence_and_change_nothing(daemon, request_, message):
    with pytest.raises(OSError) as err:
        control_request(daemon.state_dir / "control.sock", request_)
    assert message in str(err.value)
    assert "ab" * 32 not in str(err.value)
    assert accepted(daemon, daemon.token)
    assert daemon.status()["previous_token_until"] is None


def test_the_same_token_again_is_refused(daemon):
    with pytest.raises(OSError, match="uses already"):
        control_request(daemon.state_dir / "control.sock",
                        {"method": "rotate_token", "token": daemon.token, "grace": 0})
    assert accepted(daemon, daemon.token)


STRANGER = r"""
import os, socket, sys
os.setgid(65534); os.setgroups([]); os.setuid(65534)
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.settimeout(10)
try:
    s.sendall(b'{"method":"rotate_token","token":"' + b"ab" * 32 + b'","grace":0}\n')
    print(repr(s.recv(4096)))
except (BrokenPipeError, ConnectionResetError):  # closed before or after our request
    print(repr(b""))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
def test_a_control_client_of_another_uid_is_refused(daemon):
    # Open the directory and the socket to everyone, so only the peer uid check stands
    # between a stranger and the daemon.
    control = daemon.state_dir / "control.sock"
    daemon.dir.chmod(0o711)
    daemon.state_dir.chmod(0o711)
    control.chmod(0o666)
    out = subprocess.run([sys.executable, "-c", STRANGER, str(control)], capture_output=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == b"b''"  # closed without a word
    assert accepted(daemon, daemon.token)
    assert not accepted(daemon, "ab" * 32)
    assert daemon.status()["previous_token_until"] is None


AS_NOBODY = r"""
import os, sys
from cmuxd import cli, status, token_rotation  # imported first: nobody cannot read root's venv
os.setgid(65534); os.setgroups([]); os.setuid(65534)
sys.argv = ["cmuxd-remote", *sys.argv[1:]]
cli.main()
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the command as another uid")
def test_the_command_as_another_user_says_whose_daemon_it_is(daemon):
    proc = subprocess.run(
        [sys.executable, "-c", AS_NOBODY, "token", "rotate", str(daemon.token_file),
         "--state-dir", str(daemon.state_dir)],
        capture_output=True, timeout=30, env=daemon.client_env(), cwd="/")
    assert proc.returncode == 3, proc.stderr
    assert "belongs to another user" in proc.stderr.decode()
    assert file_token(daemon) == daemon.token
