"""The daemon with real listeners: TCP (v4, v6) and Unix, relay auth, workers, client CLI."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import orjson
import psutil
import pytest

from helpers import TcpServer, wait_for
from listening import RELAY_ID, ListeningDaemon, free_port, mac_for, read_line, refused
from netns import PeerNamespace, namespace_or_skip


@pytest.fixture(scope="module")
def shared():
    """One daemon for the read-only scenarios of this module."""
    d = ListeningDaemon(v6=True)
    d.wait_ready()
    yield d
    d.close()


@pytest.fixture
def daemon():
    d = ListeningDaemon()
    d.wait_ready()
    yield d
    d.close()


def ping_ok(stream, id=1):
    assert stream.call("ping", id=id) == {"id": id, "ok": True, "result": {"pong": True}}


def test_ping_over_tcp_v4_v6_and_unix(shared):
    for host in ("127.0.0.1", "::1"):
        stream = shared.authed(host)
        ping_ok(stream)
        hello = stream.call("hello", id=2)["result"]
        assert hello["name"] == "cmuxd-remote"
        stream.close()
    unix = shared.unix()
    # No challenge line on a Unix socket: the first thing read is the answer.
    ping_ok(unix)
    unix.close()


def test_v1_client_gets_plain_ok_and_pipelined_request_is_answered(shared):
    stream = shared.authed(mutual=False, pipelined=b'{"id":7,"method":"ping"}\n')
    assert stream.next_response() == {"id": 7, "ok": True, "result": {"pong": True}}
    stream.close()


@pytest.mark.parametrize("case", [
    "wrong_mac", "ascii_key_mac", "wrong_relay_id", "upper_client_nonce", "short_client_nonce",
    "rpc_instead", "garbage", "oversized",
])
def test_bad_handshakes_are_refused_while_a_good_client_keeps_working(shared, case):
    good = shared.authed()
    ping_ok(good)
    # The daemon sends its challenge only once the connection exists: timing from before
    # connect() bounds its delay from below, however late this thread is scheduled.
    t_before_connect = time.monotonic()
    sock = shared.tcp_connect()
    challenge = shared.challenge(sock)
    nonce = challenge["nonce"]
    right = mac_for(shared.token, RELAY_ID, nonce)
    lines = {
        "wrong_mac": {"mac": "00" * 32, "relay_id": RELAY_ID},
        "ascii_key_mac": {"mac": mac_for(shared.token.encode().hex()[:64], RELAY_ID, nonce),
                          "relay_id": RELAY_ID},
        "wrong_relay_id": {"mac": right, "relay_id": "other"},
        "upper_client_nonce": {"mac": right, "relay_id": RELAY_ID, "client_nonce": "AB" * 32},
        "short_client_nonce": {"mac": right, "relay_id": RELAY_ID, "client_nonce": "ab" * 15},
        "rpc_instead": {"id": 1, "method": "ping"},
    }
    if case == "garbage":
        payload = b"\x00\xffnot json at all\n"
    elif case == "oversized":
        payload = b"x" * 16385
    else:
        payload = orjson.dumps(lines[case]) + b"\n" + b'{"id":9,"method":"ping"}\n'
    sock.sendall(payload)
    data = refused(sock)
    waited = time.monotonic() - t_before_connect
    assert data == b'{"ok":false}\n'
    assert waited >= 0.05  # the failure reply never comes sooner than 50 ms after the challenge
    ping_ok(good, id=2)
    good.close()


def test_silent_connection_is_closed_after_five_seconds(shared):
    sock = shared.tcp_connect()
    shared.challenge(sock)
    t0 = time.monotonic()
    data = refused(sock, timeout=15)
    waited = time.monotonic() - t0
    assert data in (b"", b'{"ok":false}\n')
    assert 4.0 <= waited <= 8.0


def test_silent_connections_each_expire_on_their_own_deadline(shared):
    """Handshakes started a second apart are closed a second apart, while a client that
    authenticated in between keeps working."""
    first = shared.tcp_connect()
    shared.challenge(first)
    t0 = time.monotonic()
    time.sleep(1.0)
    second = shared.tcp_connect()
    shared.challenge(second)
    t1 = time.monotonic()
    good = shared.authed()
    refused(first, timeout=15)
    first_closed = time.monotonic()
    refused(second, timeout=15)
    second_closed = time.monotonic()
    assert 4.0 <= first_closed - t0 <= 8.0
    assert 4.0 <= second_closed - t1 <= 8.0
    assert second_closed - first_closed >= 0.5
    ping_ok(good, id=3)
    good.close()


def test_token_never_in_logs(shared):
    assert shared.token not in shared.log()
    assert RELAY_ID in shared.log()


def test_two_hundred_concurrent_clients_spread_over_all_workers():
    d = ListeningDaemon(workers=2)
    try:
        d.wait_ready()
        streams = []
        lock = threading.Lock()
        errors = []

        def connect_some(n):
            try:
                for _ in range(n):
                    s = d.authed()
                    with lock:
                        streams.append(s)
            except Exception as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=connect_some, args=(25,)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert len(streams) == 200
        for i, s in enumerate(streams):
            ping_ok(s, id=i)
        workers = d.status()["workers"]
        loads = [w["connections"] for w in workers]
        assert sum(loads) == 200
        assert all(load >= 50 for load in loads), loads  # least-loaded dispatch balances them
        for s in streams:
            s.close()
        wait_for(lambda: sum(w["connections"] for w in d.status()["workers"]) == 0)
    finally:
        d.close()


def test_sigterm_stops_cleanly(daemon):
    workers = [w["pid"] for w in daemon.status()["workers"]]
    stream = daemon.authed()
    ping_ok(stream)
    assert daemon.stop() == 0
    assert not daemon.socket_path.exists()
    assert not (daemon.state_dir / "control.sock").exists()
    for pid in workers:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert stream.at_eof()
    assert "listening on tcp 127.0.0.1" in daemon.log()


def test_worker_pid_reported_and_respawned_after_kill(daemon):
    before = {w["index"]: w["pid"] for w in daemon.status()["workers"]}
    victim = before[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: all(w["alive"] for w in daemon.status()["workers"])
             and daemon.status()["workers"][0]["pid"] != victim, timeout=10)
    stream = daemon.authed()
    ping_ok(stream)


def test_unix_peer_with_other_uid_is_refused(daemon):
    # Loosen the file mode so only the SO_PEERCRED check stands between uid 65534 and us.
    os.chmod(daemon.socket_path, 0o666)
    os.chmod(daemon.socket_path.parent, 0o755)
    os.chmod(daemon.dir, 0o755)
    script = (
        "import os,socket,sys,time\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.settimeout(5)\n"
        "try:\n"
        "    time.sleep(0.2); s.sendall(b'{\"id\":1,\"method\":\"ping\"}\\n'); print(repr(s.recv(100)))\n"
        "except (BrokenPipeError, ConnectionResetError):\n"
        "    print(repr(b''))\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(daemon.socket_path)],
                         capture_output=True, text=True, timeout=20)
    assert out.stdout.strip() == "b''", out
    wait_for(lambda: daemon.status()["counters"].get("refused_peer_uid") == 1)
    ping_ok(daemon.unix())


def test_unix_auth_token_requires_the_handshake():
    d = ListeningDaemon("--unix-auth", "token", tcp=[])
    try:
        d.wait_ready()
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(d.socket_path))
        challenge = json.loads(read_line(sock))
        assert challenge["protocol"] == "cmux-relay-auth"
        sock.sendall(orjson.dumps({"mac": mac_for(d.token, RELAY_ID, challenge["nonce"]),
                                   "relay_id": RELAY_ID}) + b"\n" + b'{"id":1,"method":"ping"}\n')
        assert json.loads(read_line(sock)) == {"ok": True}
        assert json.loads(read_line(sock)) == {"id": 1, "ok": True, "result": {"pong": True}}
        sock.close()
        result = d.cli("ping", f"unix://{d.socket_path}", "--unix-auth", "-c", "1")
        assert result.returncode == 0, result.stderr
    finally:
        d.close()


@pytest.fixture
def peer():
    """A network namespace to connect from, so the daemon sees an address other than
    loopback (which it never backs off)."""
    tag = str(os.getpid() % 100000)
    with namespace_or_skip(f"cmuxd-peer-{tag}-probe", lambda: PeerNamespace(tag)) as ns:
        yield ns


def peer_connect(ns: PeerNamespace, d: ListeningDaemon) -> socket.socket:
    """A connection from the namespace to the daemon's listener on our side of it."""
    sock = ns.socket()
    sock.settimeout(10)
    sock.connect((ns.root_address, int(d.tcp[0].rsplit(":", 1)[1])))
    sock.settimeout(None)
    return sock


def test_backoff_refuses_an_address_after_repeated_failures(peer):
    d = ListeningDaemon("--backoff-failures", "3", tcp=[f"{peer.root_address}:{free_port()}"])
    try:
        d.wait_ready()
        for _ in range(3):
            sock = peer_connect(peer, d)
            d.challenge(sock)
            sock.sendall(b'{"mac":"00","relay_id":"x"}\n')
            assert refused(sock) == b'{"ok":false}\n'
        sock = peer_connect(peer, d)
        assert refused(sock) == b""  # closed at accept: no challenge, no handshake work
        wait_for(lambda: d.status()["counters"].get("refused_backoff", 0) >= 1)
        ping_ok(d.unix())  # other peers are not affected
        # The block is short at first; a good client gets in again once it has passed.
        time.sleep(1.1)
        ping_ok(d.authed(sock=peer_connect(peer, d)))
    finally:
        d.close()


def test_loopback_is_never_backed_off():
    """Every local user shares loopback: failures there must not lock the others out."""
    d = ListeningDaemon("--backoff-failures", "3")
    try:
        d.wait_ready()
        for _ in range(5):
            sock = d.tcp_connect()
            d.challenge(sock)
            sock.sendall(b'{"mac":"00","relay_id":"x"}\n')
            assert refused(sock) == b'{"ok":false}\n'
        ping_ok(d.authed())
        assert "refused_backoff" not in d.status()["counters"]
    finally:
        d.close()


def test_group_readable_token_file_is_refused_with_a_fix():
    d = ListeningDaemon(token_mode=0o644)
    try:
        assert d.proc.wait(15) == 1
        log = d.log()
        assert "chmod 600" in log
        assert d.token not in log
    finally:
        d.close()


def test_stale_socket_is_replaced_and_live_one_is_not(daemon):
    # A live daemon holds the socket: a second one must refuse to start.
    other = ListeningDaemon(tcp=[])
    try:
        other.proc.kill()
        other.proc.wait()
        out = subprocess.run(
            [sys.executable, "-m", "cmuxd", "serve", "--socket", str(daemon.socket_path),
             "--state-dir", str(other.dir / "s2")],
            capture_output=True, text=True, timeout=20, env=other.env)
        assert out.returncode == 1
        assert "another daemon is listening" in out.stderr
        ping_ok(daemon.unix())
        # A stale file (nothing answers) is replaced.
        stale = other.dir / "stale.sock"
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(stale))
        s.close()
        proc = subprocess.Popen(
            [sys.executable, "-m", "cmuxd", "serve", "--socket", str(stale), "--workers", "1",
             "--state-dir", str(other.dir / "s3")], env=other.env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            def answers():
                try:
                    c = socket.socket(socket.AF_UNIX)
                    c.connect(str(stale))
                    c.sendall(b'{"id":1,"method":"ping"}\n')
                    c.settimeout(5)
                    return b"pong" in c.recv(100)
                except OSError:
                    return False
            wait_for(answers, timeout=15)
            assert oct(stale.stat().st_mode & 0o777) == "0o600"
        finally:
            proc.terminate()
            proc.wait(15)
        assert not stale.exists()
    finally:
        other.close()


@pytest.mark.parametrize("args, code, message", [
    (["connect", "127.0.0.1:1"], 2, "connect needs --stdio"),
    (["serve", "--stdio", "--tcp", "127.0.0.1:1"], 2, "cannot be combined with --tcp"),
    (["serve", "--tcp", "127.0.0.1:1", "--scrollback", "0"], 2, "--scrollback"),
    (["units", "install", "--systemd", "--launchd"], 2, "choose one of --systemd and --launchd"),
    (["token", "new", "{existing}"], 1, "already exists"),
], ids=["connect", "stdio-tcp", "scrollback", "units", "token"])
def test_cli_failures_are_one_line_with_their_exit_code(tmp_path, args, code, message):
    existing = tmp_path / "token"
    existing.write_text("x\n")
    args = [a.replace("{existing}", str(existing)) for a in args]
    out = subprocess.run([sys.executable, "-m", "cmuxd", *args], capture_output=True,
                         text=True, timeout=30, env=dict(os.environ, HOME=str(tmp_path)))
    assert out.returncode == code, out.stderr
    assert out.stderr.startswith("cmuxd-remote: ") and message in out.stderr, out.stderr
    assert "Error" not in out.stderr.split(":")[0] and "Traceback" not in out.stderr


def test_cli_ping_rpc_and_errors(shared):
    uri = f"cmux://127.0.0.1:{shared.port}"
    out = shared.cli("ping", uri, "--count", "3", "--interval", "0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode().count("pong from") == 3
    assert "rtt min/avg/max" in out.stdout.decode()
    out = shared.cli("ping", f"[::1]:{shared.port}", "-c", "1")
    assert out.returncode == 0, out.stderr
    out = shared.cli("rpc", uri, "session.open", '{"session_id":"dev"}')
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["session_id"] == "dev"
    out = shared.cli("rpc", uri, "nope")
    assert out.returncode == 1 and b"method_not_found" in out.stderr
    out = shared.cli("rpc", uri, "ping", "[1]")
    assert out.returncode == 2
    closed = free_port()
    out = shared.cli("ping", f"127.0.0.1:{closed}", "-c", "1")
    assert out.returncode == 3 and b"connection refused" in out.stderr
    env_bad = dict(shared.client_env(), CMUX_RELAY_TOKEN="ab" * 32)
    out = subprocess.run([sys.executable, "-m", "cmuxd", "ping", uri, "-c", "1"],
                         capture_output=True, env=env_bad, timeout=30)
    assert out.returncode == 4 and b"refused" in out.stderr
    assert shared.token.encode() not in out.stderr + out.stdout


def test_connect_stdio_bridge_carries_pipelined_requests_and_events(shared):
    with TcpServer(lambda conn: (conn.sendall(conn.recv(100)), conn.sendall(b"tail"))) as server:
        requests = b"".join(orjson.dumps(r) + b"\n" for r in [
            {"id": 1, "method": "ping"},
            {"id": 2, "method": "proxy.open", "params": {"host": "127.0.0.1", "port": server.port}},
            {"id": 3, "method": "proxy.stream.subscribe", "params": {"stream_id": "s-1"}},
            {"id": 4, "method": "proxy.write", "params": {"stream_id": "s-1", "data_base64": "aGVsbG8="}},
        ])
        proc = subprocess.Popen(
            [sys.executable, "-m", "cmuxd", "connect", f"cmux://127.0.0.1:{shared.port}", "--stdio"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=shared.client_env())
        proc.stdin.write(requests)
        proc.stdin.flush()
        frames = []
        data = b""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            frames.append(json.loads(line))
            if any(f.get("event") == "proxy.stream.eof" for f in frames):
                break
        proc.stdin.close()
        assert proc.wait(20) == 0
        responses = {f["id"]: f for f in frames if "id" in f}
        assert responses[1]["result"] == {"pong": True}
        assert responses[2]["result"] == {"stream_id": "s-1"}
        assert responses[4]["result"] == {"written": 5}
        data = b"".join(base64.b64decode(f["data_base64"]) for f in frames
                        if f.get("event") == "proxy.stream.data")
        assert data == b"hellotail"


def test_token_from_the_environment_reaches_no_child():
    d = ListeningDaemon(env={"CMUX_RELAY_TOKEN": "cd" * 32}, tcp=None)
    try:
        # --token-file wins for the handshake, but the variable is still taken out.
        d.wait_ready()
        children = psutil.Process(d.proc.pid).children(recursive=True)
        assert len(children) >= 3  # two workers and the PTY hub
        for child in children:
            environ = open(f"/proc/{child.pid}/environ", "rb").read()
            assert b"CMUX_RELAY_TOKEN" not in environ, child.cmdline()
    finally:
        d.close()


def test_a_second_daemon_on_the_same_state_dir_refuses_to_start(daemon):
    out = subprocess.run(
        [sys.executable, "-m", "cmuxd", "serve", "--socket", str(daemon.dir / "other.sock"),
         "--state-dir", str(daemon.state_dir)],
        capture_output=True, text=True, timeout=20, env=daemon.env)
    assert out.returncode == 1
    assert "another daemon is listening" in out.stderr and "--state-dir" in out.stderr
    ping_ok(daemon.unix())


@pytest.mark.parametrize("where", ["state", "socket"])
def test_an_impossible_path_is_a_sentence_not_a_traceback(tmp_path, where):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    state, sock = tmp_path / "state", tmp_path / "s.sock"
    if where == "state":
        state = blocker / "state"
    else:
        sock = blocker / "run" / "s.sock"
    out = subprocess.run(
        [sys.executable, "-m", "cmuxd", "serve", "--socket", str(sock), "--state-dir",
         str(state)], capture_output=True, text=True, timeout=20)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert "Not a directory" in out.stderr
    assert ("--state-dir" if where == "state" else f"--socket {sock}") in out.stderr
    assert not (tmp_path / "s.sock").exists()


def test_a_state_dir_others_can_write_is_refused(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o777)
    os.chmod(state, 0o777)
    out = subprocess.run(
        [sys.executable, "-m", "cmuxd", "serve", "--socket", str(tmp_path / "s.sock"),
         "--state-dir", str(state)], capture_output=True, text=True, timeout=20)
    assert out.returncode == 1
    assert "chmod 700" in out.stderr
    assert not (tmp_path / "s.sock").exists()


def test_accepted_tcp_connections_carry_keepalives(shared):
    """A peer that vanishes while idle must not hold its connection forever."""
    stream = shared.authed()
    ping_ok(stream)
    def timer():
        # ss shows one timer per socket: the retransmit timer while a reply is unacked, then
        # the keepalive timer.
        out = subprocess.run(["ss", "-tno", "state", "established",
                              f"( sport = :{shared.port} )"],
                             capture_output=True, text=True, timeout=10).stdout
        ours = [line for line in out.splitlines() if f":{stream.local_port}" in line]
        return ours and "keepalive" in ours[0]

    wait_for(timer, timeout=10, message="a keepalive timer on the daemon's socket")
    stream.close()
