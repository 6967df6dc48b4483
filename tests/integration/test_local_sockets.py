"""The control and PTY hub sockets are trusted only while their state directory is the
daemon's alone, and only with a process of the daemon's user (or root) on the other end."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import psutil
import pytest

from cmuxd.hub_link import RemoteHub
from helpers import daemon_command, wait_for
from listening import ListeningDaemon


def as_user(user: tuple[int, int], code: str, *args: str, **kwargs) -> subprocess.Popen:
    """Python code run by a process of the other user (it drops root before anything else)."""
    uid, gid = user
    # Modules first: the interpreter's own files may lie where the other user cannot read.
    script = (f"import os, socket, sys\nos.setgroups([]); os.setgid({gid}); os.setuid({uid})\n"
              + code)
    return subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


IMPOSTOR = textwrap.dedent("""
    server = socket.socket(socket.AF_UNIX)
    server.bind(sys.argv[1])
    server.listen()
    print("listening", flush=True)
    server.settimeout(float(sys.argv[2]))
    got = b""
    try:
        conn, _ = server.accept()
        conn.settimeout(2)
        try:
            conn.sendall(b'{"hello":{"persistent":[],"local":[]}}\\n')
            while chunk := conn.recv(65536):
                got += chunk
        except (TimeoutError, ConnectionResetError, BrokenPipeError):
            pass
        print("connected", len(got), flush=True)
    except TimeoutError:
        print("nobody came", flush=True)
""")


@pytest.fixture
def reachable(tmp_path):
    """A private directory the other user can pass through (tmp_path's parents are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="cmuxd-test-"))
    os.chmod(path, 0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def children(daemon: ListeningDaemon, module: str) -> list[psutil.Process]:
    found = []
    for child in psutil.Process(daemon.proc.pid).children():
        try:
            if module in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            pass
    return found


def test_a_state_dir_recreated_by_another_user_is_refused(other_user):
    d = ListeningDaemon(workers=2).wait_ready()
    impostor = None
    try:
        survivor = d.authed()
        assert survivor.call("pty.list", id=1)["ok"] is True
        # Someone removes the state directory and makes it again, theirs and open to all,
        # with their own "hub" listening in it.
        os.chmod(d.dir, 0o711)
        shutil.rmtree(d.state_dir)
        d.state_dir.mkdir(mode=0o777)
        os.chmod(d.state_dir, 0o777)
        os.chown(d.state_dir, *other_user)
        impostor = as_user(other_user, IMPOSTOR, str(d.state_dir / "hub.sock"), "6")
        assert impostor.stdout.readline().strip() == "listening"
        # A respawned worker dials the hub, and a respawned hub binds its socket.
        [hub] = children(d, "cmuxd.hub_process")
        hub.kill()
        [victim] = [w for w in children(d, "cmuxd.worker")
                    if not any(c.laddr and c.laddr.port == d.port and c.raddr
                               and c.raddr.port == survivor.local_port
                               for c in w.net_connections("tcp"))]
        victim.kill()
        wait_for(lambda: f"state directory {d.state_dir} belongs to uid {other_user[0]}, not "
                 "to this daemon's user" in d.log(), timeout=15)
        wait_for(lambda: "not connecting to the PTY hub: state directory" in d.log(), timeout=15)
        out, _ = impostor.communicate(timeout=30)
        assert out.strip() == "nobody came", d.log()
        # The connection to the worker still alive keeps working.
        assert survivor.call("ping", id=2)["ok"] is True
        assert "Traceback" not in d.log()
    finally:
        if impostor is not None:
            impostor.kill()
        d.close()


def test_a_worker_refuses_a_hub_of_another_uid(reachable, other_user):
    state = reachable / "state"
    state.mkdir(mode=0o700)
    os.chmod(state, 0o777)  # only while the impostor binds its socket
    impostor = as_user(other_user, IMPOSTOR, str(state / "hub.sock"), "10")
    try:
        assert impostor.stdout.readline().strip() == "listening"
        os.chmod(state, 0o700)  # ours again, but the socket in it is not

        async def dial() -> bool:
            hub = RemoteHub(state / "hub.sock")
            hub.add_peer(lambda event: None)  # announced to the hub as soon as it connects
            hub.start()
            try:
                await asyncio.wait_for(hub.connected.wait(), 3)
                return True
            except TimeoutError:
                return False
            finally:
                hub._runner.cancel()

        assert asyncio.run(dial()) is False
        out, _ = impostor.communicate(timeout=30)
        assert out.strip() == "connected 0"  # it was dialed, and told nothing
    finally:
        impostor.kill()


def test_the_hub_refuses_a_link_from_another_uid(other_user):
    d = ListeningDaemon(workers=1).wait_ready()
    try:
        # Open the way, so that only the peer uid check stands between the other user and
        # the hub.
        wait_for(lambda: (d.state_dir / "hub.sock").exists())
        os.chmod(d.dir, 0o711)
        os.chmod(d.state_dir, 0o711)
        os.chmod(d.state_dir / "hub.sock", 0o666)
        code = textwrap.dedent("""
            s = socket.socket(socket.AF_UNIX)
            s.connect(sys.argv[1])
            s.settimeout(10)
            got = b""
            try:
                while chunk := s.recv(65536):
                    got += chunk
            except ConnectionResetError:
                pass
            print(len(got))
        """)
        out, err = as_user(other_user, code, str(d.state_dir / "hub.sock")).communicate(timeout=30)
        assert out.strip() == "0", (out, err)  # closed without even the hello
        wait_for(lambda: f"refused a PTY hub link from uid {other_user[0]}" in d.log())
        assert d.authed().call("pty.list", id=1)["ok"] is True
    finally:
        d.close()


def test_status_refuses_a_state_dir_others_can_write(tmp_path, other_user):
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, 0o777)
    out = subprocess.run(daemon_command("status", "--state-dir", str(state)),
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert f"run chmod 700 {state}" in out.stderr, out
    os.chmod(state, 0o700)
    os.chown(state, *other_user)
    out = subprocess.run(daemon_command("status", "--state-dir", str(state)),
                         capture_output=True, text=True, timeout=30)
    assert f"belongs to uid {other_user[0]}" in out.stderr, out


def test_status_refuses_a_control_socket_of_another_uid(reachable, other_user):
    state = reachable / "state"
    state.mkdir(mode=0o700)
    os.chmod(state, 0o777)
    impostor = as_user(other_user, IMPOSTOR, str(state / "control.sock"), "10")
    try:
        assert impostor.stdout.readline().strip() == "listening"
        os.chmod(state, 0o700)
        out = subprocess.run(daemon_command("status", "--state-dir", str(state)),
                             capture_output=True, text=True, timeout=30)
        assert out.returncode != 0
        assert f"is served by uid {other_user[0]}" in out.stderr, out
        assert impostor.communicate(timeout=30)[0].strip() == "connected 0"
    finally:
        impostor.kill()


def test_the_daemon_refuses_to_start_in_a_state_dir_of_another_user(tmp_path, other_user):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, *other_user)
    out = subprocess.run(daemon_command("serve", "--socket", str(tmp_path / "s.sock"),
                                        "--state-dir", str(state)),
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert f"belongs to uid {other_user[0]}" in out.stderr and "--state-dir" in out.stderr
    assert "Traceback" not in out.stderr


def test_the_state_dir_is_created_private():
    d = ListeningDaemon(workers=1)
    try:
        d.wait_ready()
        assert (d.state_dir.stat().st_mode & 0o777) == 0o700
    finally:
        d.close()
