"""Test helpers: a frame client over pipes or sockets, a stdio daemon, loopback TCP servers,
and a strict JSON matcher.

`FrameStream` speaks the wire protocol (one JSON text per LF-terminated line) over any byte
stream: a connected socket, or a pair of binary file-likes such as a child's stdout/stdin.
Events (frames with an `event` key) and responses are separated, so a test can wait for the
next response while events pile up on the side, and the other way round.
"""

from __future__ import annotations

import collections
import json
import os
import secrets
import re
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable

DEFAULT_TIMEOUT = 10.0
MAX_FRAME = 4 * 1024 * 1024


# ---------------------------------------------------------------------------------------------
# JSON


def _reject_constant(name: str):
    raise ValueError(f"daemon wrote the non-JSON token {name}")


def loads_strict(line: bytes) -> Any:
    """Parse one daemon frame; NaN/Infinity and invalid UTF-8 are errors."""
    return json.loads(line.decode("utf-8"), parse_constant=_reject_constant)


def dumps(obj: Any) -> bytes:
    """One request frame: compact JSON and a single LF."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n"


def wait_for(predicate: Callable[[], Any], timeout: float = DEFAULT_TIMEOUT, interval=0.005,
             message: str = "condition"):
    """Poll until `predicate()` is truthy; return its value or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------
# Matching parsed JSON


class Matcher:
    def matches(self, value: Any) -> bool:  # pragma: no cover - interface
        raise NotImplementedError


class _Kind(Matcher):
    def __init__(self, name: str, check: Callable[[Any], bool]):
        self.name = name
        self.check = check

    def matches(self, value):
        return self.check(value)

    def __repr__(self):
        return f"<{self.name}>"


def _is_int(v):
    return type(v) is int or (type(v) is float and v.is_integer())


ANY = _Kind("any", lambda v: True)
ANY_STR = _Kind("string", lambda v: type(v) is str)
NONEMPTY_STR = _Kind("non-empty string", lambda v: type(v) is str and v != "")
ANY_INT = _Kind("integer", _is_int)
POSITIVE_INT = _Kind("integer > 0", lambda v: _is_int(v) and v > 0)
STR_LIST = _Kind("list of strings", lambda v: type(v) is list and all(type(s) is str for s in v))

_RFC3339_Z = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{0,8}[1-9])?Z")


def is_rfc3339_z(value: Any) -> bool:
    """RFC 3339 UTC with a Z suffix; fraction of 1-9 digits without trailing zeros."""
    if type(value) is not str or not _RFC3339_Z.fullmatch(value):
        return False
    from datetime import datetime

    try:
        datetime.strptime(value[:19], "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        return False
    return True


RFC3339 = _Kind("RFC 3339 time with Z", is_rfc3339_z)


def match(actual: Any, expected: Any, path: str = "$") -> None:
    """Assert `actual` equals `expected` as parsed JSON.

    Stricter than `==`: booleans never equal numbers, and objects must have exactly the same
    keys. Numbers compare by value (1000 equals 1e3). Values in `expected` may be Matchers.
    """
    if isinstance(expected, Matcher):
        assert expected.matches(actual), f"{path}: {actual!r} is not {expected!r}"
        return
    if type(expected) is bool or type(actual) is bool or expected is None or actual is None:
        assert type(actual) is type(expected) and actual == expected, (
            f"{path}: {actual!r} != {expected!r}"
        )
        return
    if type(expected) in (int, float):
        assert type(actual) in (int, float) and actual == expected, (
            f"{path}: {actual!r} != {expected!r}"
        )
        return
    if type(expected) is dict:
        assert type(actual) is dict, f"{path}: {actual!r} is not an object"
        assert actual.keys() == expected.keys(), (
            f"{path}: keys {sorted(actual)} != {sorted(expected)} in {actual!r}"
        )
        for key in expected:
            match(actual[key], expected[key], f"{path}.{key}")
        return
    if type(expected) is list:
        assert type(actual) is list, f"{path}: {actual!r} is not an array"
        assert len(actual) == len(expected), f"{path}: {actual!r} != {expected!r}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            match(a, e, f"{path}[{i}]")
        return
    assert type(actual) is type(expected) and actual == expected, (
        f"{path}: {actual!r} != {expected!r}"
    )


def check_envelope(msg: Any) -> None:
    """Every frame the daemon writes is an event or a well-formed response (§3.3, §3.4)."""
    assert type(msg) is dict, f"frame is not an object: {msg!r}"
    if "event" in msg:
        assert type(msg["event"]) is str, msg
        assert "id" not in msg and "ok" not in msg, f"event with id/ok: {msg!r}"
        for key, value in msg.items():
            assert value != "" and not (type(value) is int and value == 0), (
                f"event field {key} should have been omitted: {msg!r}"
            )
        return
    assert type(msg.get("ok")) is bool, f"response without boolean ok: {msg!r}"
    assert "id" not in msg or msg["id"] is not None, f"response with null id: {msg!r}"
    if msg["ok"]:
        assert type(msg.get("result")) is dict and "error" not in msg, msg
    else:
        err = msg.get("error")
        assert "result" not in msg, msg
        assert type(err) is dict and type(err.get("code")) is str, msg
        assert type(err.get("message")) is str, msg


def error(code: str, message: Any, id: Any = ...) -> dict:
    msg = {"ok": False, "error": {"code": code, "message": message}}
    if id is not ...:
        msg["id"] = id
    return msg


def ok(result: dict, id: Any = ...) -> dict:
    msg = {"ok": True, "result": result}
    if id is not ...:
        msg["id"] = id
    return msg


INVALID_JSON = error("invalid_request", "invalid JSON request")
OVERSIZED = error("invalid_request", "request frame exceeds maximum size")


# ---------------------------------------------------------------------------------------------
# Frames over a byte stream


class FrameStream:
    """LF-framed JSON over a socket, or over a (reader, writer) pair of binary file-likes.

    Reads are pull-based: nothing is read until the test asks, so a test can stop reading to
    exert back-pressure on the peer.
    """

    def __init__(self, reader, writer=None):
        if isinstance(reader, socket.socket):
            sock = self.sock = reader
            self._fd = sock.fileno()
            self._recv = sock.recv
            self._send = sock.sendall
            self._shut = lambda: sock.shutdown(socket.SHUT_WR)
            self._closers = [sock.close]
        else:
            writer = reader if writer is None else writer
            try:
                self._fd = reader.fileno()
            except (AttributeError, OSError, ValueError):
                self._fd = None
            if self._fd is not None:
                fd = self._fd
                self._recv = lambda n: os.read(fd, n)
            else:
                read = getattr(reader, "read1", None) or reader.read
                self._recv = read
            self._send = lambda data: _write_all(writer, data)
            self._shut = writer.close
            self._closers = [writer.close, reader.close]
        self._buf = bytearray()
        self._eof = False
        self.events: collections.deque = collections.deque()
        self.responses: collections.deque = collections.deque()
        self.frames_read = 0
        self._next_id = 1000

    # writing

    def send_raw(self, data: bytes) -> None:
        self._send(data)

    def send(self, obj: Any) -> None:
        self._send(dumps(obj))

    def send_in_background(self, data: bytes) -> threading.Thread:
        """Write `data` from a thread, for inputs larger than the pipes can hold while the
        test reads the replies."""
        errors: list = []

        def run():
            try:
                self._send(data)
            except BaseException as exc:  # noqa: BLE001 - reported by join_writer
                errors.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.errors = errors
        thread.start()
        return thread

    def close_write(self) -> None:
        """Signal EOF to the peer (close stdin, or shut down the socket's write side)."""
        self._shut()

    def close(self) -> None:
        for close in self._closers:
            try:
                close()
            except OSError:
                pass

    # reading

    def _fill(self, timeout: float | None) -> bool:
        """Read once; False at EOF. Raises TimeoutError if nothing arrives in time."""
        if self._eof:
            return False
        if self._fd is not None and timeout is not None:
            ready, _, _ = select.select([self._fd], [], [], max(timeout, 0))
            if not ready:
                raise TimeoutError(f"no data from the daemon within {timeout}s")
        data = self._recv(1 << 20)
        if not data:
            self._eof = True
            return False
        self._buf += data
        return True

    def recv_line(self, timeout: float = DEFAULT_TIMEOUT) -> bytes:
        """The next raw line without its LF. EOFError at end of stream."""
        deadline = time.monotonic() + timeout
        start = 0
        while True:
            cut = self._buf.find(b"\n", start)
            if cut >= 0:
                line = bytes(self._buf[:cut])
                del self._buf[: cut + 1]
                self.frames_read += 1
                return line
            start = len(self._buf)
            if not self._fill(deadline - time.monotonic()):
                if self._buf:
                    raise AssertionError(f"stream ended inside a frame: {bytes(self._buf[:200])!r}")
                raise EOFError("the daemon closed its output")

    def recv_frame(self, timeout: float = DEFAULT_TIMEOUT) -> dict:
        """The next frame, event or response, checked for well-formedness."""
        line = self.recv_line(timeout)
        assert b"\r" not in line, f"raw CR in a daemon frame: {line[:200]!r}"
        msg = loads_strict(line)
        check_envelope(msg)
        return msg

    def next_response(self, timeout: float = DEFAULT_TIMEOUT) -> dict:
        """The next response in order; events read meanwhile are kept in `self.events`."""
        if self.responses:
            return self.responses.popleft()
        deadline = time.monotonic() + timeout
        while True:
            msg = self.recv_frame(deadline - time.monotonic())
            if "event" in msg:
                self.events.append(msg)
            else:
                return msg

    def next_event(self, name: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                   where: Callable[[dict], bool] | None = None) -> dict:
        """The first event (optionally named `name` and satisfying `where`), taking stashed
        events first; other frames read meanwhile are stashed for later."""
        def wanted(msg):
            return (name is None or msg["event"] == name) and (where is None or where(msg))

        for i, msg in enumerate(self.events):
            if wanted(msg):
                del self.events[i]
                return msg
        deadline = time.monotonic() + timeout
        while True:
            msg = self.recv_frame(deadline - time.monotonic())
            if "event" not in msg:
                self.responses.append(msg)
            elif wanted(msg):
                return msg
            else:
                self.events.append(msg)

    def call(self, method: str | None = None, params: Any = ..., id: Any = ...,
             timeout: float = DEFAULT_TIMEOUT, **extra) -> dict:
        """Send one request and return its response (which must echo the id)."""
        if id is ...:
            self._next_id += 1
            id = self._next_id
        req: dict = {"id": id}
        if method is not None:
            req["method"] = method
        if params is not ...:
            req["params"] = params
        req.update(extra)
        self.send(req)
        resp = self.next_response(timeout)
        if id is None:
            assert "id" not in resp, resp
        else:
            assert "id" in resp, f"response lost its id {id!r}: {resp!r}"
            match(resp["id"], id, "$.id")
        return resp

    def expect(self, request: dict, expected: dict, timeout: float = DEFAULT_TIMEOUT) -> dict:
        """Send `request` and match the next response against `expected`."""
        self.send(request)
        resp = self.next_response(timeout)
        match(resp, expected)
        return resp

    def read_until_eof(self, timeout: float = DEFAULT_TIMEOUT) -> list[dict]:
        """Every remaining frame (stashed ones first) until the daemon closes its output."""
        frames = list(self.responses) + list(self.events)
        self.responses.clear()
        self.events.clear()
        deadline = time.monotonic() + timeout
        while True:
            try:
                frames.append(self.recv_frame(deadline - time.monotonic()))
            except EOFError:
                return frames

    def at_eof(self, timeout: float = DEFAULT_TIMEOUT) -> bool:
        """True once the peer closed its output with no frame left unread."""
        try:
            line = self.recv_line(timeout)
        except EOFError:
            return True
        raise AssertionError(f"expected EOF, got {line[:200]!r}")


def _write_all(writer, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = writer.write(view)
        if n is None:  # buffered writers write everything
            break
        view = view[n:]
    flush = getattr(writer, "flush", None)
    if flush is not None:
        flush()


# ---------------------------------------------------------------------------------------------
# The daemon under stdio


def write_token_file(path, mode: int = 0o600) -> str:
    """A fresh hex relay token in a file created with `mode` from the start; the token."""
    token = secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    os.write(fd, (token + "\n").encode())
    os.close(fd)
    os.chmod(path, mode)  # exact, whatever the umask
    return token


def stop_process(proc: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM, so a daemon cleans up after itself; SIGKILL if it does not exit in time."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


def hub_processes(under: str) -> list:
    """The PTY hubs (psutil processes) serving a state directory under `under`."""
    import psutil

    hubs = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or ())
        if "cmuxd.hub_process" in cmdline and under in cmdline:
            hubs.append(proc)
    return hubs


def end_hubs(under: str, hubs: list | None = None) -> None:
    """End the PTY hubs (and their sessions) serving a state directory under `under`: a hub
    outlives the daemon that started it, on purpose, so a test that is done must end it.
    `hubs` already sent SIGTERM are waited for, and any other hub found is ended too."""
    import psutil

    signalled = list(hubs or ())
    for proc in hub_processes(under):
        if proc not in signalled:
            try:
                proc.terminate()
            except psutil.Error:
                continue
            signalled.append(proc)
    for proc in signalled:
        try:
            proc.wait(10)
        except psutil.TimeoutExpired:
            proc.kill()
        except psutil.Error:
            pass


def daemon_command(*args: str) -> list[str]:
    """How to run the daemon: $CMUXD_REMOTE (a binary) if set, else this interpreter's cmuxd."""
    binary = os.environ.get("CMUXD_REMOTE")
    if binary:
        return [binary, *args]
    return [sys.executable, "-P", "-m", "cmuxd", *args]


class StdioDaemon(FrameStream):
    """`cmuxd-remote serve --stdio` as a child process, spoken to through its pipes, or with
    `over_socket`, through one end of a socketpair that is both its stdin and its stdout (the
    way inetd-style launchers run it). In-process (--standalone) unless `standalone` is
    False: a daemon running on the machine must not answer in its place."""

    def __init__(self, *extra_args: str, env: dict | None = None, over_socket: bool = False,
                 standalone: bool = True):
        self.stderr_file = tempfile.TemporaryFile()
        if over_socket:
            ours, theirs = socket.socketpair()
            stdin = stdout = theirs
        else:
            stdin = stdout = subprocess.PIPE
        self.proc = subprocess.Popen(
            daemon_command("serve", "--stdio", *(["--standalone"] if standalone else []),
                           *extra_args),
            stdin=stdin,
            stdout=stdout,
            stderr=self.stderr_file,
            bufsize=0,
            env=env,
        )
        if over_socket:
            theirs.close()
            super().__init__(ours)
        else:
            super().__init__(self.proc.stdout, self.proc.stdin)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close_stdin(self) -> None:
        self.close_write()

    def wait(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        return self.proc.wait(timeout)

    def stderr_text(self) -> str:
        self.stderr_file.seek(0)
        return self.stderr_file.read().decode("utf-8", "replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(DEFAULT_TIMEOUT)
        super().close()
        self.stderr_file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------------------------
# Loopback TCP servers for the proxy methods


class TcpServer:
    """A loopback TCP server running `handler(conn)` in a thread for each connection.

    Handler exceptions are collected and re-raised by `close()`, so a server-side failure
    fails the test.
    """

    def __init__(self, handler: Callable[[socket.socket], None], host: str = "127.0.0.1",
                 rcvbuf: int | None = None):
        self.handler = handler
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if rcvbuf is not None:
            # Inherited by accepted sockets: a small window makes the peer's writes block.
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.listener.bind((host, 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        self.errors: list[BaseException] = []
        self.threads: list[threading.Thread] = []
        self.conns: list[socket.socket] = []
        self._closing = False
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    def _accept_loop(self) -> None:
        while not self._closing:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            if self._closing:
                conn.close()
                return
            self.conns.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()
            self.threads.append(thread)
            self.accepted += 1

    def _serve(self, conn: socket.socket) -> None:
        try:
            self.handler(conn)
        except BaseException as exc:  # noqa: BLE001 - re-raised by close()
            if not self._closing:
                self.errors.append(exc)
        finally:
            conn.close()

    def join(self, connections: int = 1, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Wait until `connections` were accepted and every handler has finished."""
        deadline = time.monotonic() + timeout
        wait_for(lambda: self.accepted >= connections, timeout, message="accepted connections")
        for thread in list(self.threads):
            thread.join(max(deadline - time.monotonic(), 0))
            assert not thread.is_alive(), "server handler did not finish"

    def close(self) -> None:
        self._closing = True
        try:
            # Wake the acceptor.
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            pass
        self.listener.close()
        self._acceptor.join(DEFAULT_TIMEOUT)
        for conn in self.conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self.threads:
            thread.join(DEFAULT_TIMEOUT)
        if self.errors:
            raise self.errors[0]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def recv_exactly(conn: socket.socket, n: int, timeout: float = DEFAULT_TIMEOUT) -> bytes:
    conn.settimeout(timeout)
    data = bytearray()
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise EOFError(f"peer closed after {len(data)} of {n} bytes")
        data += chunk
    return bytes(data)


def recv_until_eof(conn: socket.socket, timeout: float = DEFAULT_TIMEOUT) -> bytes:
    conn.settimeout(timeout)
    data = bytearray()
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            return bytes(data)
        data += chunk


def closed_port() -> int:
    """A loopback port with no listener (bound then released, never listened on)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port
