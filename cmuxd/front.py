"""The front door of `serve --stdio`: hand stdin and stdout to the running daemon of this user.

`ssh host cmuxd-remote serve --stdio` then costs an interpreter start and one handoff, and
its PTY sessions belong to the daemon (they outlive the SSH connection and can be attached
over TCP). This process copies no bytes: it sends its stdin and stdout fds (SCM_RIGHTS) over
the daemon's `front.sock`, waits until the worker serving them is done, and exits with the
status the worker reports. When anything fails before the worker took the fds, it says why
in one line on stderr and the caller serves in-process.

The exchange on front.sock, one JSON line each:

    daemon → front   {"front":1}                      a worker is ready (or a refusal:
                                                       {"ok":false,"error":{"message":…}})
    front → daemon   {"v":1,"env":{…}} + [stdin, stdout] as SCM_RIGHTS
    daemon → front   {"ok":true}                      the worker took them and serves
    daemon → front   {"exit":0}                       done: 0 after stdin's end, 1 after
                                                       a fatal I/O error

This module runs before anything heavy is imported: no asyncio, argh, orjson or psutil.
"""

from __future__ import annotations

import os
import signal
import socket
import sys

from .paths import SYSTEM_STATE_DIR, front_socket_path, runtime_dir
from .peercred import peer_uid

PROTOCOL = 1
READY = b'{"front":1}\n'
TAKEN = b'{"ok":true}\n'
MAX_HEADER = 65536
"""The front's header line at most (its environment); the daemon refuses a longer one."""
HANDOFF_TIMEOUT = 5.0
"""Seconds a daemon may take to have a worker answer; a stopping daemon never does."""
ACTIVATION_TIMEOUT = 10.0
"""Seconds a socket-activated daemon may take to start and open its front door."""

FORWARDED_NAMES = frozenset({"SSH_CONNECTION", "SSH_CLIENT", "SSH_AUTH_SOCK", "LANG",
                             "LANGUAGE", "TZ"})


def forwarded(name: str) -> bool:
    """The variables of the SSH connection, not of the daemon, that sessions started through
    the front door get: what sshd sets for a login shell of that connection, and the locale
    the client sent (SendEnv LANG LC_*)."""
    return name in FORWARDED_NAMES or name.startswith("LC_")


class Refused(Exception):
    """The daemon cannot take this connection; the message says why, as a sentence part."""


def join(state_dir: str | None) -> int | None:
    """Hand stdin and stdout to the daemon: the exit status this process should have once the
    daemon is done with them, or None (after one line on stderr) to serve in-process."""
    dirs = [state_dir] if state_dir else [str(runtime_dir()), SYSTEM_STATE_DIR]
    reasons = []
    # An interrupt ends this process quietly, and with it the connection it handed over.
    interrupted = signal.signal(signal.SIGINT, signal.SIG_DFL)
    for directory in dict.fromkeys(dirs):
        try:
            sock = _connect(directory)
        except Refused as exc:
            reasons.append(str(exc))
            continue
        try:
            return _hand_over(sock, str(front_socket_path(directory)))
        except Refused as exc:
            reasons.append(str(exc))
            break
        finally:
            sock.close()
    signal.signal(signal.SIGINT, interrupted)
    _say(f"{'; '.join(reasons)}; serving in-process (sessions end with this connection)")
    return None


def _connect(directory: str) -> socket.socket:
    """A connection to the front door of the daemon of `directory`, run by this user."""
    path = str(front_socket_path(directory))
    try:
        sock = _dial(path)
    except FileNotFoundError:
        sock = _wait_for_activation(directory, path)
    except OSError as exc:
        raise Refused(f"no daemon answers on {path} ({exc.strerror or exc})") from None
    uid = peer_uid(sock)
    if uid != os.getuid():
        sock.close()
        raise Refused(f"the daemon on {path} runs as uid {uid}, not as this user")
    return sock


def _dial(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    return sock


def _wait_for_activation(directory: str, path: str) -> socket.socket:
    """No front door: a daemon older than it (its control socket answers), none at all, or
    one that a connection to its listening socket starts (systemd socket activation)."""
    try:
        _dial(os.path.join(directory, "control.sock")).close()
    except OSError:
        pass
    else:
        raise Refused(f"the daemon of {directory} is too old to take stdin and stdout "
                      "(it has no front.sock); restart it to upgrade")
    try:
        trigger = _dial(os.path.join(directory, "cmuxd.sock"))
    except OSError:
        raise Refused(f"no daemon runs in {directory}") from None
    try:
        return _poll_dial(path)
    finally:
        trigger.close()


def _poll_dial(path: str) -> socket.socket:
    import time

    deadline = time.monotonic() + ACTIVATION_TIMEOUT
    while True:
        try:
            return _dial(path)
        except OSError:
            if time.monotonic() > deadline:
                raise Refused(f"the daemon started on its socket but opened no {path} within "
                              f"{ACTIVATION_TIMEOUT:.0f} s; see its log") from None
            time.sleep(0.005)


def _hand_over(sock: socket.socket, path: str) -> int:
    sock.settimeout(HANDOFF_TIMEOUT)
    lines = _Lines(sock, path)
    first = lines.next()
    if first != READY:
        raise Refused(_refusal(first, path))
    env = {k: v for k, v in os.environ.items() if forwarded(k)}
    import json

    header = json.dumps({"v": PROTOCOL, "env": env}, separators=(",", ":")).encode() + b"\n"
    try:
        socket.send_fds(sock, [header], [sys.stdin.fileno(), sys.stdout.fileno()])
        taken = lines.next()
        while taken == READY:  # the first worker died with the handoff; another has it
            taken = lines.next()
    except OSError as exc:
        raise Refused(f"the handoff to {path} failed ({exc.strerror or exc})") from None
    if taken != TAKEN:
        raise Refused(_refusal(taken, path))
    # From here the worker owns the pipes: no more falling back, however this ends.
    sock.settimeout(None)
    try:
        done = lines.next()
    except OSError:
        done = b""
    if done.startswith(b'{"exit":') and done[8:-2].isdigit():
        return int(done[8:-2])
    _say("the daemon's worker serving this connection ended without a word; see the "
         "daemon's log")
    return 1


def _refusal(line: bytes, path: str) -> str:
    if not line:
        return (f"the daemon on {path} closed the front door without an answer (it may be "
                "stopping)")
    import json

    try:
        message = json.loads(line)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = "it answered what this version does not understand; upgrade both"
    return f"the daemon on {path} refused the handoff: {message}"


class _Lines:
    """Lines read from the front door socket."""

    def __init__(self, sock: socket.socket, path: str):
        self.sock = sock
        self.path = path
        self.buf = b""

    def next(self) -> bytes:
        """The next line with its newline, or b"" at the end."""
        while b"\n" not in self.buf:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                raise Refused(f"the daemon on {self.path} did not answer within "
                              f"{HANDOFF_TIMEOUT:.0f} s (it may be stopping or overloaded)"
                              ) from None
            if not data:
                return b""
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"


def _say(message: str) -> None:
    sys.stderr.write(f"cmuxd-remote: {message}\n")
    sys.stderr.flush()


def quick_join(argv: list[str]) -> None:
    """The console script's first step: for a plain `serve --stdio` (with at most --join and
    --state-dir), join the daemon and exit, before the command line's machinery is imported.
    After a fallback, the full command line serves in-process. Any other command returns at
    once."""
    if argv[:1] != ["serve"] or "--stdio" not in argv:
        return
    state_dir = None
    rest = list(argv[1:])
    while rest:
        arg = rest.pop(0)
        if arg in ("--stdio", "--join"):
            continue
        if arg == "--state-dir" and rest:
            state_dir = rest.pop(0)
        elif arg.startswith("--state-dir="):
            state_dir = arg.split("=", 1)[1]
        else:
            return
    status = join(state_dir)
    if status is not None:
        sys.exit(status)
    sys.argv[1:] = ["serve", "--stdio", "--standalone"]
