"""The daemon with its listeners (`serve --tcp/--socket`) as a child process, and a raw
relay-auth client written from the spec, independent of cmuxd.auth."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import orjson
import psutil

from cmuxd.status import query_status

from helpers import (DEFAULT_TIMEOUT, FrameStream, daemon_command, end_hubs, hub_processes,
                     stop_process, wait_for, write_token_file)

RELAY_ID = "relay-test"


def free_port(family=socket.AF_INET, host="127.0.0.1") -> int:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def mac_for(token_hex: str, relay_id: str, nonce: str) -> str:
    msg = f"relay_id={relay_id}\nnonce={nonce}\nversion=1".encode()
    return hmac.new(bytes.fromhex(token_hex), msg, hashlib.sha256).hexdigest()


def proof_for(token_hex: str, relay_id: str, client_nonce: str, nonce: str) -> str:
    msg = (f"cmux-relay-server-proof\nrelay_id={relay_id}\nclient_nonce={client_nonce}\n"
           f"server_nonce={nonce}\nversion=1").encode()
    return hmac.new(bytes.fromhex(token_hex), msg, hashlib.sha256).hexdigest()


def read_line(sock: socket.socket, timeout: float = DEFAULT_TIMEOUT) -> bytes:
    """One LF-terminated line, read a byte at a time so nothing past it is consumed."""
    sock.settimeout(timeout)
    out = bytearray()
    while not out.endswith(b"\n"):
        b = sock.recv(1)
        if not b:
            break
        out += b
    sock.settimeout(None)
    return bytes(out)


class ListeningDaemon:
    """`cmuxd-remote serve` with its own token, state dir and free ports."""

    ready = False
    """Set once `wait_ready` saw every worker alive, so its signal handlers are in place."""

    def __init__(self, *extra: str, tcp: list[str] | None = None, v6: bool = False,
                 unix: bool = True, workers: int = 2, env: dict | None = None,
                 token_mode: int = 0o600, fd_limit: tuple[int, int] | None = None,
                 cwd: os.PathLike | None = None, token_in_env: bool = False,
                 wrap: list[str] | None = None):
        """`wrap` goes before the command line (`ip netns exec NAME`, say)."""
        self.dir = Path(tempfile.mkdtemp(prefix="cmuxd-test-"))
        self.token_file = self.dir / "relay-token"
        self.token = write_token_file(self.token_file, token_mode)
        self.port = free_port()
        self.tcp = tcp if tcp is not None else [f"127.0.0.1:{self.port}"]
        if v6:
            self.tcp.append(f"[::1]:{self.port}")
        self.socket_path = self.dir / "run" / "cmuxd.sock" if unix else None
        self.state_dir = self.dir / "state"
        args = ["serve", "--workers", str(workers), "--relay-id", RELAY_ID,
                "--state-dir", str(self.state_dir)]
        if not token_in_env:
            args += ["--token-file", str(self.token_file)]
        for spec in self.tcp:
            args += ["--tcp", spec]
        if self.socket_path is not None:
            args += ["--socket", str(self.socket_path)]
        args += list(extra)
        self.stderr_file = open(self.dir / "stderr.log", "w+b")
        full_env = dict(os.environ, HOME=str(self.dir))
        full_env.pop("CMUX_RELAY_TOKEN", None)
        full_env.pop("CMUX_RELAY_ID", None)
        if token_in_env:
            full_env["CMUX_RELAY_TOKEN"] = self.token
        full_env.update(env or {})
        self.env = full_env
        limit = None if fd_limit is None else (
            lambda: resource.setrlimit(resource.RLIMIT_NOFILE, fd_limit))
        self.proc = subprocess.Popen([*(wrap or ()), *daemon_command(*args)], stdin=subprocess.DEVNULL,
                                     stdout=self.stderr_file, stderr=self.stderr_file,
                                     env=full_env, preexec_fn=limit, cwd=cwd)

    def wait_ready(self) -> "ListeningDaemon":
        """Ready once the control socket answers with every worker alive."""
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            try:
                status = self.status()
            except OSError:
                return False
            return all(w["alive"] for w in status["workers"])
        wait_for(ready, timeout=15)
        self.ready = True
        return self

    def status(self) -> dict:
        return query_status(self.state_dir / "control.sock")

    def log(self) -> str:
        self.stderr_file.flush()
        return (self.dir / "stderr.log").read_text(errors="replace")

    # clients

    def tcp_connect(self, host: str = "127.0.0.1", port: int | None = None) -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(DEFAULT_TIMEOUT)
        sock.connect((host, port or self.port))
        sock.settimeout(None)
        return sock

    def challenge(self, sock: socket.socket) -> dict:
        line = read_line(sock)
        msg = json.loads(line)
        assert msg["protocol"] == "cmux-relay-auth" and msg["version"] == 1, msg
        assert msg["relay_id"] == RELAY_ID
        return msg

    def authed(self, host: str = "127.0.0.1", port: int | None = None, mutual: bool = True,
               pipelined: bytes = b"", sock: socket.socket | None = None) -> FrameStream:
        """A TCP connection past the handshake, as a FrameStream (over `sock`, connected
        already, when given)."""
        sock = sock or self.tcp_connect(host, port)
        nonce = self.challenge(sock)["nonce"]
        auth = {"mac": mac_for(self.token, RELAY_ID, nonce), "relay_id": RELAY_ID}
        client_nonce = secrets.token_hex(32)
        if mutual:
            auth["client_nonce"] = client_nonce
        sock.sendall(orjson.dumps(auth) + b"\n" + pipelined)
        reply = json.loads(read_line(sock))
        assert reply["ok"] is True, reply
        if mutual:
            assert reply["relay_mac"] == proof_for(self.token, RELAY_ID, client_nonce, nonce)
        else:
            assert "relay_mac" not in reply
        stream = FrameStream(sock)
        stream.local_port = sock.getsockname()[1]
        return stream

    def unix(self) -> FrameStream:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(self.socket_path))
        return FrameStream(sock)

    def client_env(self) -> dict:
        return dict(self.env, CMUX_RELAY_ID=RELAY_ID, CMUX_RELAY_TOKEN=self.token)

    def cli_command(self) -> list[str]:
        return daemon_command()

    def cli(self, *args: str, input: bytes | None = None, timeout: float = 30):
        return subprocess.run(daemon_command(*args), input=input, capture_output=True,
                              env=self.client_env(), timeout=timeout)

    def stop(self, sig=signal.SIGTERM, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def close(self) -> None:
        """Stop the daemon and its hubs at once. A ready daemon gets SIGQUIT, which skips the
        drain a SIGTERM grants open connections (a second with clients left open): a test that
        is done has no request to finish, and tests of a graceful stop call `stop()`."""
        hubs = hub_processes(str(self.dir))
        if self.ready and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
        for hub in hubs:
            try:
                hub.terminate()
            except psutil.Error:
                pass
        stop_process(self.proc)
        end_hubs(str(self.dir), hubs)
        self.stderr_file.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def refused(sock: socket.socket, timeout: float = 10) -> bytes:
    """Read everything until EOF; the daemon's last word on a refused handshake."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    sock.close()
    return data


def elapsed_since(t0: float) -> float:
    return time.monotonic() - t0
