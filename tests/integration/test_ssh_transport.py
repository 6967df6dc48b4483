"""`ssh://` as a client transport, against a private OpenSSH server on loopback (the one the
benchmarks start: its own host key and authorized key). The client runs plain `ssh`, which
finds the test's config through a wrapper first on PATH, as a user's ~/.ssh/config would be
found; `--remote-command` names this checkout's cmuxd, which is on no PATH over there."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from bench.bench import Processes, SSHServer
from helpers import daemon_command
from terminal import Terminal

SSH = shutil.which("ssh")
SSHD = "/usr/sbin/sshd"
REMOTE = shlex.join(daemon_command())
PING = b'{"id":1,"method":"ping"}\n'


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """(server, env): the server, and an environment whose `ssh` reaches it."""
    if SSH is None or not os.path.exists(SSHD):
        pytest.skip("needs OpenSSH: apt-get install -y openssh-client openssh-server")
    tmp = tmp_path_factory.mktemp("sshd")
    procs = Processes()
    server = SSHServer(tmp, procs).start()
    config = tmp / "ssh_config"
    config.write_text(f"""\
Host *
    User {server.user}
    IdentityFile {tmp / 'client_ed25519'}
    IdentitiesOnly yes
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    BatchMode yes
    LogLevel ERROR
    ConnectTimeout 10
""")
    bindir = tmp / "bin"
    bindir.mkdir()
    wrapper = bindir / "ssh"
    wrapper.write_text(f'#!/bin/sh\nexec {SSH} -F {config} "$@"\n')
    wrapper.chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", HOME=str(tmp))
    env.pop("CMUX_FLEET", None)
    try:
        yield server, env
    finally:
        server.stop()
        procs.close()


def cli(*args: str, env: dict, cwd: Path | None = None, input: bytes | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(daemon_command(*args), capture_output=True, env=env, cwd=cwd,
                          input=input, stdin=None if input is not None else subprocess.DEVNULL,
                          timeout=timeout)


def test_ping_rpc_sessions_and_connect_over_ssh(sshd):
    server, env = sshd
    uri = f"ssh://{server.user}@127.0.0.1:{server.port}"
    result = cli("ping", uri, "-c", "2", "-i", "0", "--remote-command", REMOTE, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(b"pong from " + uri.encode()) == 2
    result = cli("rpc", uri, "hello", "--remote-command", REMOTE, env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["name"] == "cmuxd-remote"
    result = cli("sessions", uri, "--json", "--remote-command", REMOTE, env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["hosts"] == [
        {"name": uri, "address": uri, "state": "up", "error": None, "sessions": []}]
    result = cli("connect", uri, "--stdio", "--remote-command", REMOTE, env=env, input=PING)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"id": 1, "ok": True, "result": {"pong": True}}


def test_attach_over_ssh_is_interactive_and_exits_with_the_status(sshd):
    server, env = sshd
    term = Terminal(daemon_command(
        "attach", f"ssh://127.0.0.1:{server.port}", "s", "--remote-command", REMOTE,
        "--command", "echo ready; read line; echo got-$line; exit 4"), env)
    try:
        term.read_until(b"ready")
        term.write(b"hello\r")
        term.read_until(b"got-hello")
        assert term.wait() == 4
        assert b"[exited with 4: session s]" in term.out
    finally:
        term.close()


def test_a_host_starting_with_dash_is_a_destination_never_an_option(sshd, tmp_path):
    _, env = sshd
    # ssh takes it as the destination (after `--`), and this ssh refuses such a host name.
    result = cli("ping", "ssh://-dash", "-c", "1", "--remote-command", REMOTE, env=env)
    assert result.returncode == 3
    assert result.stderr.startswith(b"cmuxd-remote: ssh://-dash: ssh could not connect: ")
    assert result.stderr.count(b"\n") == 1  # one sentence: ssh's own reason
    # Had it been an option, ssh would run this ProxyCommand and create the file.
    result = cli("ping", "ssh://-oProxyCommand=touch injected", "-c", "1", env=env,
                 cwd=tmp_path)
    assert result.returncode == 3
    assert not (tmp_path / "injected").exists()
    assert result.stderr.startswith(b"cmuxd-remote: ssh://-oProxyCommand=touch injected: ssh "
                                    b"could not connect: ")
    result = cli("ping", "ssh://-oProxyCommand=touch injected@127.0.0.1", "-c", "1", env=env,
                 cwd=tmp_path)
    assert result.returncode == 3
    assert not (tmp_path / "injected").exists()


def test_ssh_failures_are_sentences(sshd):
    server, env = sshd
    uri = f"ssh://127.0.0.1:{server.port}"
    # No cmuxd-remote on the far side's PATH.
    result = cli("ping", uri, "-c", "1", env=env)
    assert result.returncode == 3
    assert b"the far side has no cmuxd-remote on its PATH" in result.stderr
    assert b"--remote-command" in result.stderr
    # Something that is not the protocol answers.
    result = cli("ping", uri, "-c", "1", "--remote-command", "echo welcome; cat; true", env=env)
    assert result.returncode == 3
    assert b"not the cmux protocol" in result.stderr
    # Nothing listens there.
    result = cli("ping", "ssh://127.0.0.1:1", "-c", "1", env=env)
    assert result.returncode == 3
    assert b"ssh could not connect: " in result.stderr and b"refused" in result.stderr
    # A path is no part of an ssh address.
    result = cli("ping", "ssh://host/path", env=env)
    assert result.returncode == 2 and b"ssh://[user@]host[:port]" in result.stderr
