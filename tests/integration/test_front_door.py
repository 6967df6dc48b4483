"""`serve --stdio` with a daemon of the same user running: the front door hands stdin and
stdout to a worker, sessions belong to the daemon; every failure falls back to in-process
serving with one line on stderr."""

from __future__ import annotations

import base64
import os
import pty
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from contextlib import closing
from pathlib import Path

import orjson
import psutil
import pytest

from helpers import FrameStream, StdioDaemon, daemon_command, wait_for
from listening import ListeningDaemon
from test_ssh_transport import sshd  # noqa: F401 (the private sshd, a fixture)

PING = {"id": 1, "method": "ping"}
FALLBACK = "serving in-process (sessions end with this connection)"
SHOW_ENV = ("printf 'conn=[%s] agent=[%s] lang=[%s]\\n' \"$SSH_CONNECTION\" "
            "\"$SSH_AUTH_SOCK\" \"$LANG\"; exec cat")


@pytest.fixture
def daemon():
    d = ListeningDaemon(env={"SSH_AUTH_SOCK": "/the/daemons/agent"}).wait_ready()
    try:
        yield d
    finally:
        d.close()


def front(d_or_dir, *extra: str, env: dict | None = None) -> StdioDaemon:
    state_dir = d_or_dir.state_dir if isinstance(d_or_dir, ListeningDaemon) else d_or_dir
    return StdioDaemon("--state-dir", str(state_dir), *extra, env=env, standalone=False)


def capabilities(stream) -> list[str]:
    reply = stream.call("hello", {})
    assert reply["ok"], reply
    return reply["result"]["capabilities"]


def joined(stream) -> bool:
    return "pty.session.persistent_daemon" in capabilities(stream)


def attach(stream, session: str, aid: str, **extra) -> dict:
    reply = stream.call("pty.attach", {"session_id": session, "attachment_id": aid,
                                       "client_attachment_token": "t", "cols": 80, "rows": 24,
                                       **extra}, timeout=15)
    assert reply["ok"], reply
    return reply["result"]


def output_until(stream, marker: bytes) -> bytes:
    out = bytearray()
    deadline = time.monotonic() + 15
    while marker not in out and time.monotonic() < deadline:
        out += base64.b64decode(stream.next_event("pty.data", timeout=15)["data_base64"])
    return bytes(out)


def ends_in_process(fd: StdioDaemon, reason: str) -> None:
    """The front fell back: one line on stderr naming `reason`, and it serves by itself."""
    assert not joined(fd)
    assert fd.call("ping")["result"] == {"pong": True}
    fd.close_stdin()
    assert fd.wait() == 0
    lines = fd.stderr_text().splitlines()
    assert len(lines) == 1, lines
    assert reason in lines[0] and lines[0].endswith(FALLBACK), lines[0]


def still_serves(d: ListeningDaemon) -> None:
    with closing(d.unix()) as s:
        assert s.call("ping")["result"] == {"pong": True}


# joined


def test_hello_is_the_daemons_and_stdin_eof_exits_0(daemon):
    with front(daemon) as fd:
        assert joined(fd)
        assert fd.call("ping")["result"] == {"pong": True}
        wait_for(lambda: daemon.status()["connections"] == 1)
        fd.close_stdin()
        assert fd.wait() == 0
        assert fd.stderr_text() == ""
    wait_for(lambda: daemon.status()["connections"] == 0)


def test_the_front_copies_no_bytes_and_holds_no_loop(daemon):
    """200 pipelined pings all answered; the front process itself never read them."""
    with front(daemon) as fd:
        assert joined(fd)
        fd.send_raw(b"".join(orjson.dumps({"id": i, "method": "ping"}) + b"\n"
                             for i in range(200)))
        assert [fd.next_response()["id"] for _ in range(200)] == list(range(200))
        io = Path(f"/proc/{fd.pid}/io").read_text()
        rchar = int(next(line for line in io.splitlines() if line.startswith("rchar")).split()[1])
        assert rchar < 2_000_000  # its own imports; 200 pings through it would add to this
        maps = Path(f"/proc/{fd.pid}/maps").read_text()
        assert "_asyncio" not in maps and "orjson" not in maps
        fd.close_stdin()
        assert fd.wait() == 0


def test_session_outlives_the_front_is_attached_over_tcp_and_has_its_env(daemon):
    env = dict(os.environ, SSH_CONNECTION="192.0.2.1 50000 192.0.2.2 22",
               LANG="de_DE.UTF-8")
    env.pop("SSH_AUTH_SOCK", None)
    with front(daemon, env=env) as fd:
        attach(fd, "ssh", "front", command=SHOW_ENV)
        first = output_until(fd, b"lang=")
        fd.close_stdin()
        assert fd.wait() == 0
    assert b"conn=[192.0.2.1 50000 192.0.2.2 22]" in first
    # The daemon's own SSH_AUTH_SOCK is not the connection's: it had none.
    assert b"agent=[]" in first and b"lang=[de_DE.UTF-8]" in first
    with closing(daemon.authed()) as tcp:
        assert attach(tcp, "ssh", "tcp", require_existing=True)["replay_bytes"] > 0
        assert b"conn=[192.0.2.1" in output_until(tcp, b"lang=")


def test_a_session_started_over_tcp_is_attached_through_the_front(daemon):
    with closing(daemon.authed()) as tcp:
        attach(tcp, "from-tcp", "tcp", command="echo started-over-tcp; exec cat")
        output_until(tcp, b"started-over-tcp")
    with front(daemon) as fd:
        attach(fd, "from-tcp", "front", require_existing=True)
        assert b"started-over-tcp" in output_until(fd, b"started-over-tcp")
        fd.close_stdin()
        assert fd.wait() == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_the_end_of_the_front_process_ends_its_connection(daemon, sig):
    """Killed, or interrupted on a terminal: no worker goes on reading what it was given."""
    with front(daemon) as fd:
        assert joined(fd)
        wait_for(lambda: daemon.status()["connections"] == 1)
        fd.proc.send_signal(sig)
        assert fd.wait() == -sig
        assert fd.at_eof()  # the worker closed its copy of stdout too
        assert "Traceback" not in fd.stderr_text()
    wait_for(lambda: daemon.status()["connections"] == 0)
    still_serves(daemon)


def test_stdout_closed_by_its_reader_exits_1(daemon):
    proc = subprocess.Popen(daemon_command("serve", "--stdio", "--state-dir",
                                           str(daemon.state_dir)),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdin.write(orjson.dumps(PING) + b"\n")
    proc.stdin.flush()
    assert proc.stdout.readline() == b'{"id":1,"ok":true,"result":{"pong":true}}\n'
    proc.stdout.close()
    proc.stdin.write(b"".join(orjson.dumps(PING) + b"\n" for _ in range(100)))
    proc.stdin.close()
    assert proc.wait(15) == 1
    still_serves(daemon)


@pytest.mark.parametrize("kind", ["socketpair", "tty", "devnull"])
def test_stdin_of_every_kind(daemon, kind):
    args = daemon_command("serve", "--stdio", "--state-dir", str(daemon.state_dir))
    if kind == "socketpair":
        ours, theirs = socket.socketpair()
        proc = subprocess.Popen(args, stdin=theirs, stdout=theirs, stderr=subprocess.PIPE)
        theirs.close()
        with closing(FrameStream(ours)) as s:
            assert joined(s)
            s.close_write()
            assert s.at_eof()
    elif kind == "tty":
        master, slave = pty.openpty()
        os.system(f"stty -echo raw < {os.ttyname(slave)}")
        proc = subprocess.Popen(args, stdin=slave, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        os.close(slave)
        os.write(master, orjson.dumps(PING) + b"\n")
        assert proc.stdout.readline() == b'{"id":1,"ok":true,"result":{"pong":true}}\n'
        os.close(master)  # a hang-up: the end of stdin
    else:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        assert proc.stdout.read() == b""
    assert proc.wait(15) == 0
    assert proc.stderr.read() == b""
    still_serves(daemon)


def test_standalone_serves_in_process_beside_a_running_daemon(daemon):
    with front(daemon, "--standalone") as fd:
        assert not joined(fd)
        fd.close_stdin()
        assert fd.wait() == 0
        assert fd.stderr_text() == ""
    assert daemon.status()["counters"].get("authenticated", 0) == 0


def test_standalone_and_join_are_exclusive_and_need_stdio():
    for args in (["serve", "--stdio", "--standalone", "--join"], ["serve", "--standalone"]):
        done = subprocess.run(daemon_command(*args), capture_output=True, timeout=30,
                              stdin=subprocess.DEVNULL)
        assert done.returncode == 2
        assert b"--standalone" in done.stderr and b"Traceback" not in done.stderr


def test_options_of_the_full_command_line_join_too(daemon):
    """Past the quick path (an option it does not know), the command line joins the same."""
    with front(daemon, "--join", "--scrollback", "65536") as fd:
        assert joined(fd)
        fd.close_stdin()
        assert fd.wait() == 0


# fallbacks, one by one


def test_no_daemon(tmp_path):
    with front(tmp_path) as fd:
        ends_in_process(fd, f"no daemon runs in {tmp_path}")


def test_a_stale_socket_is_refused(tmp_path):
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "front.sock"))
    stale.close()
    with front(tmp_path) as fd:
        ends_in_process(fd, "no daemon answers on")


def test_a_daemon_of_another_uid():
    if os.geteuid() != 0:
        pytest.skip("needs root to listen as another user")
    shared = Path(tempfile.mkdtemp(prefix="cmuxd-front-"))  # /tmp, which others can reach
    shared.chmod(0o777)
    path = shared / "front.sock"
    listener = subprocess.Popen(
        ["python3", "-c", "import socket,sys,time; s=socket.socket(socket.AF_UNIX); "
         f"s.bind({str(path)!r}); s.listen(); print(flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, user=65534, group=65534)
    try:
        listener.stdout.readline()
        with front(shared) as fd:
            ends_in_process(fd, "runs as uid 65534, not as this user")
    finally:
        listener.kill()
        listener.wait()
        shutil.rmtree(shared)


def test_a_daemon_at_max_connections():
    d = ListeningDaemon("--max-connections", "1").wait_ready()
    try:
        with closing(d.unix()) as held:
            assert held.call("ping")["ok"]
            with front(d) as fd:
                ends_in_process(fd, "--max-connections")
        wait_for(lambda: d.status()["connections"] == 0)
        still_serves(d)
    finally:
        d.close()


def test_a_daemon_under_unix_auth_token():
    d = ListeningDaemon("--unix-auth", "token").wait_ready()
    try:
        with front(d) as fd:
            ends_in_process(fd, "--unix-auth token")
            assert d.token not in fd.stderr_text()
        assert d.status()["counters"]["refused_front_unix_auth"] == 1
    finally:
        d.close()


def test_a_daemon_that_does_not_answer(daemon):
    """Stopping, or stuck mid-reload: the front gives up after its deadline."""
    os.kill(daemon.proc.pid, signal.SIGSTOP)
    try:
        with front(daemon) as fd:
            ends_in_process(fd, "did not answer within")
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)
    still_serves(daemon)


class WorkerKiller(threading.Thread):
    """Kills every worker of the daemon as soon as it appears: the pool replaces a dead
    worker at once, so only workers that keep dying (its back-off then grows) leave it with
    none."""

    def __init__(self, d: ListeningDaemon):
        super().__init__(daemon=True)
        self.supervisor = psutil.Process(d.proc.pid)
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            for child in self.supervisor.children():
                try:
                    if "cmuxd.worker" in " ".join(child.cmdline()):
                        child.kill()
                except psutil.Error:
                    pass
            time.sleep(0.002)


def test_a_daemon_with_no_worker(daemon):
    """Workers that keep crashing: the supervisor says so and the front serves by itself."""
    killer = WorkerKiller(daemon)
    killer.start()
    try:
        wait_for(lambda: daemon.status()["counters"].get("worker_restarts", 0) >= 6,
                 timeout=30)
        with front(daemon) as fd:
            assert not joined(fd)
            fd.close_stdin()
            fd.wait()
            line = fd.stderr_text()
        assert line.count("\n") == 1 and line.rstrip().endswith(FALLBACK)
    finally:
        killer.stop.set()
        killer.join()
        wait_for(lambda: all(w["alive"] for w in daemon.status()["workers"])
                 and len(daemon.status()["workers"]) == 2, timeout=30)
    still_serves(daemon)


def test_a_daemon_too_old_for_the_front_door(daemon):
    (daemon.state_dir / "front.sock").unlink()
    with front(daemon) as fd:
        ends_in_process(fd, "is too old to take stdin and stdout")
    still_serves(daemon)


def test_a_socket_activated_daemon_is_started_by_the_front(tmp_path):
    """systemd-socket-activate holds the daemon's Unix socket; the front's connection to
    it starts the daemon, which then opens its front door."""
    activate = "/usr/bin/systemd-socket-activate"
    if not os.path.exists(activate):
        pytest.skip("needs systemd-socket-activate (apt-get install -y systemd)")
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    token = tmp_path / "token"
    token.write_text("ab" * 32)
    token.chmod(0o600)
    proc = subprocess.Popen([activate, "-l", str(state / "cmuxd.sock"), *daemon_command(
        "serve", "--workers", "1", "--token-file", str(token), "--state-dir", str(state))],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (state / "cmuxd.sock").exists())
        with front(state) as fd:
            assert joined(fd)
            fd.close_stdin()
            assert fd.wait() == 0
            assert fd.stderr_text() == ""
    finally:
        proc.terminate()
        proc.wait(15)
        subprocess.run(daemon_command("hub", "stop", "--state-dir", str(state)),
                       capture_output=True, timeout=30)


# what a local attacker gets


def raw_front(d: ListeningDaemon) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(15)
    sock.connect(str(d.state_dir / "front.sock"))
    assert sock.recv(100) == b'{"front":1}\n'
    return sock


def refusal(sock: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    reply = orjson.loads(data)
    assert reply["ok"] is False
    assert sock.recv(1) == b""
    return reply["error"]["message"]


@pytest.mark.parametrize("header, fds, says", [
    (b"not json\n", 2, "is not JSON"),
    (b'{"v":99,"env":{}}\n', 2, "front door version 1"),
    (b'{"v":1,"env":{}}\n', 1, "2 fds; 1 came"),
    (b'{"v":1,"env":{}}\n', 3, "2 fds; more came"),
    (b'{"v":1,"env":[]}\n', 2, "object of strings"),
    (b'{"v":1,"env":{"LD_PRELOAD":"/tmp/evil.so"}}\n', 2, "'LD_PRELOAD' is not one of them"),
    (b'{"v":1,"env":{"LANG":7}}\n', 2, "LANG must be a string"),
    (b'{"v":1,"env":{"LANG":"C\\u0000x"}}\n', 2, "without NUL"),
])
def test_bad_handoffs_are_refused_and_the_daemon_goes_on(daemon, header, fds, says):
    r, w = os.pipe()
    try:
        with raw_front(daemon) as sock:
            socket.send_fds(sock, [header], [r, w, r][:fds])
            assert says in refusal(sock)
    finally:
        os.close(r)
        os.close(w)
    still_serves(daemon)
    wait_for(lambda: daemon.status()["connections"] == 0)
    assert "refused a front door handoff" in daemon.log()


def test_an_oversized_header_is_refused(daemon):
    with raw_front(daemon) as sock:
        sock.sendall(b'{"v":1,"env":{"LANG":"' + b"x" * 70000)
        assert "at most 65536 bytes" in refusal(sock)
    still_serves(daemon)


@pytest.fixture
def impatient_daemon():
    """A daemon giving a front 2 s for its header instead of 10 s."""
    d = ListeningDaemon(env={"CMUXD_FRONT_HEADER_TIMEOUT": "2"}).wait_ready()
    try:
        yield d
    finally:
        d.close()


@pytest.mark.parametrize("sends", [b"", b'{"v":1,'])
def test_a_silent_front_is_closed_and_keeps_no_fd(impatient_daemon, sends):
    daemon = impatient_daemon
    # Each worker linked to the hub and settled: fronts open at once go one to each worker.
    fronts = [front(daemon) for _ in daemon.status()["workers"]]
    try:
        for n, fd in enumerate(fronts):
            attach(fd, "settle", f"a{n}", command="exec cat")
        assert all(w["connections"] == 1 for w in daemon.status()["workers"])
        for fd in fronts:
            fd.close_stdin()
            assert fd.wait() == 0
    finally:
        for fd in fronts:
            fd.close()
    wait_for(lambda: daemon.status()["connections"] == 0)
    pids = [w["pid"] for w in daemon.status()["workers"]]

    def fds() -> dict:
        return {pid: psutil.Process(pid).num_fds() for pid in pids}

    def settled() -> dict | None:
        """The workers may still be letting go of the settling session's fds."""
        first = fds()
        time.sleep(0.2)
        return first if fds() == first else None

    before = wait_for(settled, message="steady fd counts")
    r, w = os.pipe()
    try:
        with raw_front(daemon) as sock:
            if sends:
                socket.send_fds(sock, [sends], [r, w])
            sock.settimeout(30)
            assert sock.recv(1) == b""  # HEADER_TIMEOUT (2 s here), well before this deadline
    finally:
        os.close(r)
        os.close(w)
    wait_for(lambda: daemon.status()["connections"] == 0)
    wait_for(lambda: fds() == before, message=f"fd counts back to {before}")
    still_serves(daemon)


def test_another_user_cannot_reach_the_front_door(daemon):
    if os.geteuid() != 0:
        pytest.skip("needs root to connect as another user")
    probe = subprocess.run(
        ["python3", "-c", "import socket; s=socket.socket(socket.AF_UNIX); "
         f"s.connect({str(daemon.state_dir / 'front.sock')!r})"],
        user=65534, group=65534, capture_output=True, timeout=30)
    assert probe.returncode != 0 and b"PermissionError" in probe.stderr
    assert oct((daemon.state_dir / "front.sock").stat().st_mode & 0o777) == "0o600"


# over a real sshd


def test_over_ssh_a_session_outlives_the_killed_client_and_sees_ssh_connection(daemon, sshd):
    server, env = sshd
    remote = shlex.join(daemon_command("serve", "--stdio", "--state-dir",
                                       str(daemon.state_dir)))
    ssh = subprocess.Popen(["ssh", "-p", str(server.port), "127.0.0.1", remote],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, env=env)
    with closing(FrameStream(ssh.stdout, ssh.stdin)) as s:
        assert joined(s)
        attach(s, "over-ssh", "ssh", command=SHOW_ENV)
        first = output_until(s, b"lang=")
        ssh.kill()
        ssh.wait(15)
    assert b"conn=[127.0.0.1 " in first and f" {server.port}]".encode() in first
    wait_for(lambda: daemon.status()["connections"] == 0)
    with closing(daemon.authed()) as tcp:
        assert attach(tcp, "over-ssh", "tcp", require_existing=True)["replay_bytes"] > 0
        assert b"conn=[127.0.0.1 " in output_until(tcp, b"lang=")


def test_over_ssh_exit_status_and_standalone(daemon, sshd):
    server, env = sshd
    for extra, persistent in (((), True), (("--standalone",), False)):
        remote = shlex.join(daemon_command("serve", "--stdio", "--state-dir",
                                           str(daemon.state_dir), *extra))
        done = subprocess.run(["ssh", "-p", str(server.port), "127.0.0.1", remote],
                              input=b'{"id":1,"method":"hello"}\n', capture_output=True,
                              env=env, timeout=60)
        assert done.returncode == 0, done.stderr
        assert (b"pty.session.persistent_daemon" in done.stdout) is persistent
        assert done.stderr == b""
